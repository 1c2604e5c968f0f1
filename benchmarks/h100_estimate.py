"""An H100 SXM time estimate from SASS (no GPU): per-pipe issue model of a kernel's hot loop.

Labelled an estimate everywhere it is shown. It turns what the compiler produced into milliseconds so
that a kernel change shows its effect; it is not a measurement.

Machine (H100 SXM, sm_90): 132 SMs, 4 schedulers (SM sub-partitions) per SM, 1.755 GHz. A warp
instruction occupies its pipe on one scheduler for (per warp instruction, per scheduler):
  * issue     1 cycle, every instruction (one dispatch per scheduler per cycle)
  * fp32      FADD/FMUL/FFMA/HADD2/HMUL2/HFMA2: 32 lanes, 1 cycle. IMAD* runs only on the heavy half
              of the FMA pipe (16 lanes): fma cycles = max(fp32 + imad, 2 x imad)
  * alu       integer, compare, select, min/max, logic, shifts, conversions (IADD3, LOP3, ISETP,
              FSETP, SEL, FSEL, FMNMX, IMNMX, SHF, LEA, PRMT, F2I, I2F, P2R, MOV...): 16 lanes, 2 cycles
  * mufu      MUFU.EX2/RCP/...: 4 lanes, 8 cycles
  * lsu       LDS/STS/LDSM/STSM/SHFL/REDUX/ATOMS (shared memory, MIO) and LDG/STG/LDGSTS/ATOMG/RED (L1):
              128 B per SM cycle shared by the 4 schedulers: 4 cycles per 32-bit warp access, x width / 32
              for wider ones (LDS.128: 16)
  * tensor    HGMMA.64xNxK: 2*64*N*K FLOP per warpgroup, a quarter per warp, at 1024 dense 16-bit
              FLOP per cycle per scheduler (4096 per SM, ~950 TFLOPS); HMMA.mnk: 2*m*n*k per warp at
              the same rate (optimistic for mma.sync); tf32 at half rate
  * barrier   BAR/DEPBAR/WARPGROUP/MEMBAR/FENCE, and the uniform datapath, branches, moves from
              special registers ("other"): issue only
One tile (an iteration of a kernel's hot loop, executed by every warp of the CTA) costs, per
scheduler, warps / 4 x the per-warp cycles of each pipe; `issue` = the largest of them.

Bounds of a kernel making T tile iterations per CTA, with P CTAs (programs) and C resident per SM:
  low  = T x issue x max(P / SMs, 1) / clock: every pipe saturated, the work evenly spread, nothing exposed.
  high = ceil(P / (SMs x C)) x T x max(C' x issue, chain) / clock, C' = min(C, ceil(P / SMs)) the CTAs
         actually sharing an SM, and chain = one CTA's latency path per tile, summed where the SASS shows
         no overlap: the non-tensor pipes + (the tensor batch + WGMMA_LATENCY when the tile waits for its
         own wgmma, `WARPGROUP.DEPBAR.LE gsb0, 0x0`) + BARRIER_CYCLES per BAR + L2_LATENCY when the tile
         loads from global memory without cp.async/TMA (LDG only: nothing double-buffers it).
  tensor floor = T x tensor cycles x max(P / SMs, 1) / clock (the tensor pipe alone).
Not modelled: DRAM/L2 bandwidth (the SupCon tiles are L2-resident re-reads), instruction cache,
dual-issue, bank conflicts, register-dependency stalls beyond the listed ones; work outside the hot
loops (prologue, per-pass row selection) is left out.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass

CLOCK_HZ = 1.755e9
SMS = 132
SCHEDULERS = 4
HBM_BYTES_PER_S = 3.35e12
TENSOR_FLOP_PER_CYCLE = 1024          # dense 16-bit, per scheduler
LSU_CYCLES_32BIT = 4                  # 128 B per SM cycle shared by the 4 schedulers
WGMMA_LATENCY = 128                   # cycles from the last wgmma of a batch to its result (high bound)
BARRIER_CYCLES = 24                   # arrival skew + release of one BAR.SYNC (high bound)
L2_LATENCY = 400                      # an L2 hit, near and far partitions averaged (high bound)

PIPES = ("issue", "fp32", "alu", "mufu", "lsu", "tensor")
CLASSES = ("tensor", "fp32", "imad", "alu", "mufu", "shared", "global", "barrier", "other")
_TENSOR = re.compile(r"^(?:HGMMA|HMMA|IMMA|QGMMA|IGMMA|DMMA|BMMA)\b")
_SHAPE_GMMA = re.compile(r"^HGMMA\.(\d+)x(\d+)x(\d+)")
_SHAPE_MMA = re.compile(r"^[HIDB]MMA\.(\d+)")
MMA_SHAPES = {"16816": (16, 8, 16), "1688": (16, 8, 8), "16832": (16, 8, 32), "884": (8, 8, 4), "8816": (8, 8, 16),
              "8832": (8, 8, 32), "1684": (16, 8, 4), "16864": (16, 8, 64)}
STEMS = {
    "fp32": {"FADD", "FMUL", "FFMA", "HADD2", "HMUL2", "HFMA2", "FSWZADD", "FADD32I", "FMUL32I", "FFMA32I"},
    "imad": {"IMAD", "IMUL", "IDP", "IMAD32I"},
    "alu": {"IADD3", "IADD", "VIADD", "VIADDMNMX", "LOP3", "LOP", "PLOP3", "ISETP", "FSETP", "HSETP2", "SEL",
            "FSEL", "FMNMX", "IMNMX", "VIMNMX", "HMNMX2", "SHF", "SHL", "SHR", "LEA", "PRMT", "POPC", "FLO", "BREV",
            "SGXT", "BMSK", "P2R", "R2P", "MOV", "IABS", "F2I", "I2F", "I2FP", "F2F", "F2FP", "FRND", "FCHK",
            "ISCADD", "CSET", "CSETP", "BFE", "BFI"},
    "mufu": {"MUFU"},
    "shared": {"LDS", "STS", "LDSM", "STSM", "ATOMS", "SHFL", "REDUX", "MATCH", "VOTE"},
    "global": {"LDG", "STG", "LDGSTS", "ATOMG", "ATOM", "RED", "LD", "ST", "UTMALDG", "UTMASTG", "UBLKCP", "LDL",
               "STL"},
    "barrier": {"BAR", "DEPBAR", "LDGDEPBAR", "WARPGROUP", "MEMBAR", "FENCE", "WARPSYNC", "ARRIVES", "SYNCS"},
}
CLASS_OF_STEM = {stem: cls for cls, stems in STEMS.items() for stem in stems}


def opcode(instruction: str) -> str:
    """'@!P0 LDG.E.128 R4, desc[UR4][R2.64]' -> 'LDG.E.128' (predicate dropped)."""
    return re.sub(r"^@!?U?P\w+\s+", "", instruction.strip()).split(" ", 1)[0]


def classify(instruction: str) -> str:
    op = opcode(instruction)
    if _TENSOR.match(op):
        return "tensor"
    return CLASS_OF_STEM.get(op.split(".", 1)[0], "other")


def tensor_cycles(op: str) -> float:
    """Per-warp cycles of one tensor instruction on its scheduler's tensor core."""
    if m := _SHAPE_GMMA.match(op):
        flop = 2 * int(m.group(1)) * int(m.group(2)) * int(m.group(3)) / 4      # a warp's quarter of the warpgroup's
    elif (m := _SHAPE_MMA.match(op)) and m.group(1) in MMA_SHAPES:
        flop = 2 * math.prod(MMA_SHAPES[m.group(1)])
    else:
        flop = 2 * 16 * 8 * 16
    return flop / TENSOR_FLOP_PER_CYCLE * (2 if "TF32" in op else 1)


def dot_macs(instruction: str) -> float:
    """Multiply-adds one warp instruction contributes to a dot: FFMA 32, an MMA its share."""
    op = opcode(instruction)
    if _TENSOR.match(op):
        return tensor_cycles(op) * TENSOR_FLOP_PER_CYCLE / 2 / (2 if "TF32" in op else 1)
    return 32.0 if op.startswith("FFMA") else 0.0


def lsu_cycles(op: str) -> float:
    """Per-warp scheduler cycles of a shared / L1 access: 4 per 32 bits per lane."""
    parts = op.split(".")
    bits = max([int(p) for p in parts[1:] if p in ("64", "128")] + [32])
    if parts[0] in ("LDSM", "STSM"):                  # .4 / .2 8x8 16-bit matrices per lane group
        bits = {"4": 128, "2": 64}.get(parts[-1], 32)
    return LSU_CYCLES_32BIT * bits / 32


@dataclass
class PipeCounts:
    """Instructions per warp by class, and the per-warp cycles they cost on the tensor and LSU pipes."""
    classes: Counter
    tensor: float = 0.0
    lsu: float = 0.0
    barriers: float = 0.0         # BAR.SYNC / BAR.ARV etc. (not DEPBAR): the exposed synchronisations
    sync_wgmma: bool = False      # the loop waits for its own wgmma batch (nothing in flight across tiles)
    async_copy: bool = False      # cp.async / TMA present: global loads overlap the previous tile's work
    global_loads: bool = False

    @property
    def total(self) -> float:
        return sum(self.classes.values())

    def plus(self, other: "PipeCounts", factor: float) -> "PipeCounts":
        classes = Counter(self.classes)
        for k, v in other.classes.items():
            classes[k] += v * factor
        return PipeCounts(classes, self.tensor + factor * other.tensor, self.lsu + factor * other.lsu,
                          self.barriers + factor * other.barriers, self.sync_wgmma or other.sync_wgmma,
                          self.async_copy or other.async_copy, self.global_loads or other.global_loads)


def count_pipes(instructions) -> PipeCounts:
    """PipeCounts of a list of SASS instruction texts (one warp's stream)."""
    classes, tensor, lsu, bars = Counter({c: 0 for c in CLASSES}), 0.0, 0.0, 0
    sync = asyncc = loads = False
    for ins in instructions:
        op, cls = opcode(ins), classify(ins)
        classes[cls] += 1
        if cls == "tensor":
            tensor += tensor_cycles(op)
        elif cls in ("shared", "global"):
            lsu += lsu_cycles(op)
            asyncc |= op.startswith(("LDGSTS", "UTMALDG", "UBLKCP"))
            loads |= op.startswith(("LDG.", "LDG ")) or op == "LDG"
        elif op.startswith("BAR.") or op == "BAR":
            bars += 1
        if op.startswith("WARPGROUP.DEPBAR") and re.search(r"gsb0,\s*0x0\b", ins):
            sync = True
    return PipeCounts(classes, tensor, lsu, bars, sync, asyncc, loads)


def scheduler_cycles(counts: PipeCounts, warps: int) -> dict:
    """Cycles per tile on each pipe of one scheduler, the CTA's warps spread over the 4 schedulers."""
    per = warps / SCHEDULERS
    c = counts.classes
    return {"issue": per * counts.total,
            "fp32": per * max(c["fp32"] + c["imad"], 2 * c["imad"]),
            "alu": per * 2 * c["alu"],
            "mufu": per * 8 * c["mufu"],
            "lsu": per * counts.lsu,
            "tensor": per * counts.tensor}


def chain_cycles(counts: PipeCounts, warps: int) -> float:
    """One CTA's latency path per tile (the high bound's): see the module docstring."""
    cycles = scheduler_cycles(counts, warps)
    other = max(v for k, v in cycles.items() if k != "tensor")
    chain = other + cycles["tensor"] + WGMMA_LATENCY if counts.sync_wgmma else max(other, cycles["tensor"])
    exposed_l2 = counts.global_loads and not counts.async_copy
    return chain + BARRIER_CYCLES * counts.barriers + (L2_LATENCY if exposed_l2 else 0)


@dataclass
class Estimate:
    low_s: float
    high_s: float
    tensor_floor_s: float
    bound_by: str                  # the busiest pipe of the low bound


def estimate(loops, warps: int, programs: int, ctas_per_sm: int) -> Estimate:
    """loops: [(PipeCounts of one tile, tiles per program)]; programs: CTAs launched in all; see the docstring."""
    if programs <= 0:
        return Estimate(0.0, 0.0, 0.0, "-")
    spread = max(programs / SMS, 1.0)
    waves = math.ceil(programs / (SMS * max(ctas_per_sm, 1)))
    sharing = min(max(ctas_per_sm, 1), math.ceil(programs / SMS))
    low = high = floor = 0.0
    busiest = Counter()
    for counts, tiles in loops:
        cycles = scheduler_cycles(counts, warps)
        issue = max(cycles.values())
        low += tiles * issue * spread
        floor += tiles * cycles["tensor"] * spread
        high += waves * tiles * max(sharing * issue, chain_cycles(counts, warps))
        busiest[max(cycles, key=cycles.get)] += tiles * issue
    bound = max(busiest, key=busiest.get) if busiest else "-"
    return Estimate(low / CLOCK_HZ, high / CLOCK_HZ, floor / CLOCK_HZ, bound)


# ------------------------------------------------------------------ hot loops of a SASS function
@dataclass
class TileLoop:
    """A tile loop: its body (nested loops included once), the K loop inside it (run k_steps times per
    tile) and its other nested loops (run a data-dependent number of times per tile, e.g. candidate trips)."""
    body: list
    k_body: list
    nested: list

    def per_tile(self, k_steps: int = 1, trips: float = 1.0) -> PipeCounts:
        out = count_pipes(self.body)
        if self.k_body:
            out = out.plus(count_pipes(self.k_body), k_steps - 1)
        for loop in self.nested:
            out = out.plus(count_pipes(loop), trips - 1)
        return out


def dot_predicate(instrs):
    """Is an instruction part of the similarity product: an MMA, or (no MMA in the kernel: an FMA dot) FFMA."""
    if any(_TENSOR.match(opcode(ins)) for _, ins in instrs):
        return lambda ins: bool(_TENSOR.match(opcode(ins)))
    return lambda ins: opcode(ins).startswith("FFMA")


def tile_loops(instrs, k_loop: bool, find_loops) -> list:
    """The tile loops of a function ([(address, text)]), in program order. A dot loop is an innermost
    loop holding a dot instruction (dot_predicate; an FMA dot: >= 64 FFMA); with k_loop, the dot loop is
    the K loop and its parent the tile loop. `find_loops` = static_analysis.find_loops (the loop nest)."""
    is_dot = dot_predicate(instrs)
    min_dot = 1 if any(_TENSOR.match(opcode(ins)) for _, ins in instrs) else 64

    def text(start, end):
        return [ins for addr, ins in instrs if start <= addr <= end]

    def dots(node):
        return sum(map(is_dot, text(node[0], node[1])))

    out = []

    def walk(nest, parent=None):
        for node in nest:
            if dots(node) < min_dot:
                continue
            inner = [kid for kid in node[3] if dots(kid) >= min_dot]
            if inner:
                walk(inner, node)
                continue
            if k_loop and parent is not None:
                others = [text(k[0], k[1]) for k in parent[3] if k is not node]
                out.append(TileLoop(text(parent[0], parent[1]), text(node[0], node[1]), others))
            elif not k_loop:
                out.append(TileLoop(text(node[0], node[1]), [], [text(k[0], k[1]) for k in node[3]]))
    walk(find_loops(instrs))
    return out
