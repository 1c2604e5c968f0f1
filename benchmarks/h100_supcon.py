"""The SupCon op on an H100 SXM, estimated from any checkout's compiled code (benchmarks/h100_estimate.py).

Forward (Triton, sm_90): each kernel the launcher launches at N (recorded at min(N, 32768), the launcher's
row chunk; CTAs scaled by N / 32768 above), compiled as static_report.py compiles a launch; its tile
loops (h100_estimate.tile_loops) are mapped to sweeps over the N columns:
  * a kernel named *sample*: its tile loop once per sample chunk (supcon_selection_model.sample_chunks);
  * a kernel named *final*: once per column tile per final pass; a loop nested in the tile loop runs once
    per candidate trip (the tile's largest count of window values in one row, from the model);
  * any other (counting) kernel: its tile loops in program order are pass 1, the value-binned counting
    passes (up to VALUE_PASSES - 1), the key-binned ones; one loop only: the sweeps its name says
    (pass1/first, value, key), else every counting sweep. Other shapes get no estimate ("no pass mapping").
Sweeps per program come from the checkout's own benchmarks/supcon_selection_model.py on its
"random" embeddings (programs sampled at random; low bound: their mean, high bound: their maximum).
Backward (CUDA, csrc/supcon_mma.cu for 16-bit, csrc/supcon_simt.cu for float32): nvcc -cubin for sm_90;
the tile loop = the outermost loop holding the dot, once per kBN column tile of the kBM-row block.
The eager reference: a traffic model at 3.35 TB/s (low) and 60% of it (high), see EAGER_BYTES.
"""
from __future__ import annotations

import hashlib
import importlib.util
import math
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import h100_estimate as he
import static_analysis as sa

SIZES = (384, 32768, 262144, 1048576)
M, D = 3, 128
PROGRAMS = {384: None, 32768: 4, 262144: 2, 1048576: 1}        # model programs sampled per N (None: all)
DELTA = 2.0 ** -18
# bytes moved per element of an N x N matrix by the eager reference (mcncl_fast.reference.ops, fp32 sim):
EAGER_BYTES = {
    "forward": (("sim = z @ z.T", 4), ("masks (same, positive, negative)", 8), ("masked_fill", 9),
                ("sort values + int64 indices (CUB segmented radix sort)", 168), ("hard mask", 6),
                ("logits = sim / tau", 8), ("in_denominator", 4), ("masked logsumexp", 17),
                ("positive logit sum", 13)),
    "backward": (("softmax of the logsumexp", 12), ("masked_fill", 9), ("positive term", 5), ("sum of grads", 12),
                 ("/ tau", 8), ("two matmuls read the N x N grad", 8)),
}
HBM_BYTES = 80e9
EAGER_LIVE_BYTES = 20          # sim + masked copy + sorted values + int64 indices per element


def eager_seconds(n: int, m: int = M):
    """(low, high) seconds of the eager forward + backward, or None when its N x N buffers exceed 80 GB."""
    if n * n * EAGER_LIVE_BYTES > HBM_BYTES:
        return None
    per_element = sum(b for part in EAGER_BYTES.values() for _, b in part)
    seconds = m * n * n * per_element / he.HBM_BYTES_PER_S
    return seconds, seconds / 0.6


# ------------------------------------------------------------------ compiled kernels
@dataclass
class Kernel:
    name: str
    dtype: str
    config: str
    regs: int
    smem: int
    warps: int
    ctas: int
    limit: str
    bm: int
    bn: int
    k_steps: int
    loops: list = field(default_factory=list)        # [h100_estimate.TileLoop]
    nested_trips: float = 1.0                        # runs of the loops nested in a backward tile loop
    grid: int = 0                                    # CTAs the launcher launched at launch_n (0: unknown)
    launch_n: int = 0
    straight: bool = False       # no tile loop left (a loop of one trip, specialised away): the body runs once

    def programs(self, n: int, m: int = M) -> int:
        """CTAs at N: the recorded launches' (scaled by N / launch_n above it), else one per BM rows."""
        if self.grid:
            return self.grid if n <= self.launch_n else math.ceil(self.grid * n / self.launch_n)
        return math.ceil(n / self.bm) * m

    def role(self) -> str:
        return next((r for r in ("sample", "final", "backward") if r in self.name), "count")


RECORD_MAX_N = 32768       # launches recorded at N up to this; above, its launch (the launcher's row chunk)
_COMPILED = {}


def forward_kernels(root: Path, dtype: str, n: int = 32768, capability: int = 90, log=print) -> list:
    """The forward's Triton kernels of a checkout that its launcher launches at N (min(N, RECORD_MAX_N)),
    compiled for sm_90 as launched; one per kernel (its first variant), grid = its CTAs over all launches."""
    import torch
    from triton.backends.compiler import GPUTarget

    import static_report as sr
    pkg = sa.load_kernels(root)
    target = GPUTarget("cuda", capability, 32)
    n = min(n, RECORD_MAX_N)
    grids, chosen = {}, {}
    for _, fn, values in sr.supcon_launches(pkg, getattr(torch, dtype), n):
        with sa.record_launches(pkg) as launches:
            sa.call_by_name(fn, values)
        for variant in (v for rec in launches for v in sa.expand(rec, target)):
            name = sr.short(variant.jit.__name__)
            chosen.setdefault(name, variant)
            if variant.label == chosen[name].label:
                grids[name] = grids.get(name, 0) + variant.grid
    out = []
    for name, variant in chosen.items():
        key = (str(root), dtype, name, variant.label, repr(sorted(variant.constexprs.items())),
               repr(sorted(variant.attrs.items())), repr(sorted(variant.signature.items())))
        if key not in _COMPILED:
            _COMPILED[key] = _compile(variant, name, dtype, target, capability, log)
        kernel = _COMPILED[key]
        out.append(Kernel(**{**kernel.__dict__, "grid": grids[name], "launch_n": n}))
    return out


def _compile(variant, name: str, dtype: str, target, capability: int, log) -> Kernel:
    log(f"estimate: sm_{capability} {name} {dtype} {variant.label}")
    compiled = sa.compile_variant(variant, target)
    usage = sa.ptxas_usage(compiled, capability)
    [instrs] = sa.split_functions(sa.cuobjdump(compiled.asm["cubin"], "-sass")).values()
    cx = {variant.jit.arg_names[key[0]]: value for key, value in variant.constexprs.items()}
    warps = compiled.metadata.num_warps
    ctas, limit = sa.occupancy(sa.ARCHS[capability], usage["regs"], 32 * warps, compiled.metadata.shared)
    k_steps = 1 if cx.get("ONE_K", True) else math.ceil(D / cx.get("BK", D))
    loops = he.tile_loops(instrs, k_steps > 1, sa.find_loops)
    straight = not loops and any(he.dot_macs(ins) for _, ins in instrs)
    if straight:              # e.g. the sample kernel at one chunk (n_chunks == 1 becomes a constexpr)
        k_loop = he.tile_loops(instrs, False, sa.find_loops) if k_steps > 1 else []     # a K loop may remain
        loops = [he.TileLoop([ins for _, ins in instrs], k_loop[0].body if k_loop else [], [])]
    return Kernel(name, dtype, variant.label, usage["regs"], compiled.metadata.shared, warps, ctas, limit,
                  cx.get("BM", 1), cx.get("BN", 1), k_steps, loops, straight=straight)


BACKWARD = {"bfloat16": ("supcon_mma", "supcon_backward_bf16_cpasync"),
            "float32": ("supcon_simt", "supcon_backward_f32_cpasync")}


def backward_kernel(root: Path, dtype: str, capability: int = 90, log=print):
    """The CUDA backward kernel for dtype, compiled by nvcc for sm_90, or None (no such source / no nvcc)."""
    import os
    import shutil
    stem, entry = BACKWARD[dtype]
    source, header = root / "csrc" / f"{stem}.cu", root / "csrc" / f"{stem}.cuh"
    nvcc = os.environ.get("CUDACXX") or shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    if not (source.exists() and header.exists() and Path(nvcc).exists()):
        return None
    shape = {k: int(v) for k, v in re.findall(r"constexpr int (kBM|kBN|kThreads) = (\d+);", header.read_text())}
    log(f"estimate: sm_{capability} nvcc csrc/{source.name}")
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cmd = [nvcc, "-cubin", "-O3", "-std=c++17", "-I", str(root / "csrc"), "-DMCNCL_WITH_CUDA=1", "-Xptxas=-v",
               f"-gencode=arch=compute_{capability},code=sm_{capability}", str(source), "-o", str(cubin)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(f"nvcc failed: {proc.stderr[-2000:]}")
        functions = sa.split_functions(sa.cuobjdump(cubin.read_bytes(), "-sass"))
    usage = sa.parse_ptxas_log(proc.stderr + proc.stdout)
    name = next((f for f in functions if entry in f), None)
    if name is None or not {"kBM", "kBN", "kThreads"} <= set(shape):
        return None
    instrs, u = functions[name], usage[name]
    warps = shape["kThreads"] // 32
    ctas, limit = sa.occupancy(sa.ARCHS[capability], u["regs"], shape["kThreads"], u["smem"])
    loop = column_loop(instrs)
    if loop is None:
        return None
    # the nested (K) loops run as often as it takes the tile to do S = Z_I Z_J^T and dZ_I += A Z_J:
    # 2 BM BN D multiply-adds per tile, split over the warps (the source's trip counts are not in the SASS)
    need = 2 * shape["kBM"] * shape["kBN"] * D / warps
    outside = sum(map(he.dot_macs, loop.body)) - sum(he.dot_macs(i) for body in loop.nested for i in body)
    inside = sum(he.dot_macs(i) for body in loop.nested for i in body)
    trips = max(need - outside, 0.0) / inside if inside else 1.0
    return Kernel(entry, dtype, f"{shape['kThreads']} threads", u["regs"], u["smem"], warps, ctas, limit,
                  shape["kBM"], shape["kBN"], 1, [loop], trips)


def column_loop(instrs):
    """The outermost loop holding the dot (a CUDA kernel's loop over column tiles), nested loops apart."""
    is_dot = he.dot_predicate(instrs)

    def text(start, end):
        return [i for a, i in instrs if start <= a <= end]
    nest = [node for node in sa.find_loops(instrs) if sum(map(is_dot, text(node[0], node[1]))) >= 8]
    if not nest:
        return None
    start, end, _, kids = max(nest, key=lambda node: node[2])
    return he.TileLoop(text(start, end), [], [text(k[0], k[1]) for k in kids])


# ------------------------------------------------------------------ sweeps per program (the selection model)
def load_model(root: Path):
    path = root / "benchmarks" / "supcon_selection_model.py"
    path = path if path.exists() else Path(__file__).with_name("supcon_selection_model.py")
    name = "selection_model_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        sys.modules[name] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules[name]


def counting_and_window(model, s, neg, pos, k, nneg, delta=DELTA):
    """The model's counting passes (supcon_selection_model.program_passes up to its final pass, step for
    step) -> (counting sweeps, window [R, N] of the first final pass: the values collected as candidates)."""
    f32 = np.float32
    k, nneg = k.astype(np.int64), nneg.astype(np.int64)
    key, has = model.keys(s), k > 0
    lo, hi = model.sample_bracket(s, neg, k, nneg)
    counts, params, w = model.count_pass(s, key, neg, has, lo, hi, True)
    maxall = np.where(neg | pos, s, -np.inf).max(1, initial=-np.inf).astype(f32)
    minneg = np.where(neg, s, np.inf).min(1, initial=np.inf).astype(f32)
    lo_all, hi_all = model.canonical(model.keys(minneg), model.keys(maxall))
    lo, hi, c_gt, c_in = model.narrow(counts, lo_all, hi_all, np.zeros_like(k), nneg, k, has & (w != 0), params, True)
    known = has & ((k == nneg) | (lo == hi))
    passes, active = 1, has & ~known & (c_in > model.READY)
    while active.any():
        value = passes < model.VALUE_PASSES
        counts, params, w = model.count_pass(s, key, neg, active, lo, hi, value)
        lo, hi, c_gt, c_in = model.narrow(counts, lo, hi, c_gt, c_in, k, active & (w != 0) if value else active,
                                          params, value)
        known |= active & (lo == hi)
        active = has & ~known & (c_in > model.READY)
        passes += 1
        if passes >= model.VALUE_PASSES + model.KEY_PASSES:
            break
    collect = has & ~known
    low = np.where(collect, (model.from_key(lo) - f32(delta)).astype(f32), np.inf).astype(f32)
    above_from = model.from_key((hi.astype(np.int64) + 1).astype(np.uint32))
    return passes, neg & (s >= low[:, None]) & (s < above_from[:, None])


def trips_per_tile(window: np.ndarray, bn: int) -> float:
    """Mean over column tiles of the largest count of window values in one row of the tile."""
    r, n = window.shape
    padded = np.zeros((r, -(-n // bn) * bn), bool)
    padded[:, :n] = window
    return float(padded.reshape(r, -1, bn).sum(2).max(0).mean())


@dataclass
class Sweeps:
    counting: list        # per sampled program: counting sweeps (pass 1 included)
    final: list           # per sampled program: final sweeps
    trips: dict           # column tile BN -> candidate trips per final-pass tile (mean; nan: unknown)
    chunks: int           # sample chunks per program
    value_passes: int     # the model's VALUE_PASSES: counting passes 1 .. VALUE_PASSES bin by value


def selection_sweeps(root: Path, n: int, bm: int = 128, bns=(32,), programs=None, seed: int = 0) -> Sweeps:
    """Sweeps of `programs` random programs of bm rows; the model's candidate tile is bns[0], trips per
    tile are counted for every column tile in bns (the final kernels of several dtypes)."""
    model = load_model(root)
    bn = bns[0]
    z, labels = model.embeddings(n, kind="random", seed=seed)
    k, nneg = model.hard_counts(labels, 0.3)
    counting, final, trips = [], [], {b: [] for b in bns}
    for rows in model.program_rows(n, bm, programs, seed):
        s, neg, pos = model.similarities(z, labels, rows)
        total = model.program_passes(s, neg, pos, k[rows], nneg[rows], DELTA, bn)
        try:
            c, window = counting_and_window(model, s, neg, pos, k[rows], nneg[rows])
            for b in bns:
                trips[b].append(trips_per_tile(window, b))
        except (AttributeError, TypeError, ValueError):   # a model whose steps differ: one final pass, trips unknown
            c = total - 1
            for b in bns:
                trips[b].append(float("nan"))
        counting.append(c)
        final.append(total - c)
    return Sweeps(counting, final, {b: float(np.mean(t)) for b, t in trips.items()}, model.sample_chunks(n),
                  model.VALUE_PASSES)


# ------------------------------------------------------------------ kernel x N -> seconds
def kernel_loops(kernel: Kernel, n: int, sweeps: Sweeps, worst: bool) -> list:
    """[(PipeCounts per tile, tiles per program)] of a kernel at N; None: no pass mapping for it."""
    pick = max if worst else (lambda xs: float(np.mean(xs)))
    tiles = math.ceil(n / kernel.bn)
    loops, role = kernel.loops, kernel.role()
    if not loops:
        return None
    if kernel.straight:
        return [(loops[0].per_tile(kernel.k_steps), 1)]
    if role == "sample":
        return [(loops[0].per_tile(kernel.k_steps), sweeps.chunks)] + \
               [(loop.per_tile(kernel.k_steps), 0) for loop in loops[1:]]
    if role == "backward":
        return [(loop.per_tile(trips=kernel.nested_trips), tiles) for loop in loops]
    if role == "final":
        trips = sweeps.trips.get(kernel.bn, float("nan"))
        if loops[0].nested and math.isnan(trips):
            return None
        return [(loops[0].per_tile(kernel.k_steps, trips), tiles * pick(sweeps.final))]
    value_max = sweeps.value_passes - 1
    counting = np.array(sweeps.counting)
    value = pick(np.minimum(np.maximum(counting - 1, 0), value_max))
    key = pick(np.maximum(counting - 1 - value_max, 0))
    per_loop = {1: [pick(counting)], 2: [1, pick(counting - 1)], 3: [1, value, key]}.get(len(loops))
    if len(loops) == 1:              # a kernel per kind of counting pass: its name says which
        per_loop = next(([s] for words, s in ((("pass1", "first"), 1), (("value",), value), (("key",), key))
                         if any(w in kernel.name for w in words)), per_loop)
    if per_loop is None:
        return None
    return [(loop.per_tile(kernel.k_steps), tiles * s) for loop, s in zip(loops, per_loop)]


def kernel_estimate(kernel: Kernel, n: int, sweeps: Sweeps, m: int = M):
    """(low-bound Estimate, high-bound Estimate) of one kernel at N, or None."""
    programs = kernel.programs(n, m)
    mean_loops, worst_loops = kernel_loops(kernel, n, sweeps, False), kernel_loops(kernel, n, sweeps, True)
    if mean_loops is None:
        return None
    low = he.estimate(mean_loops, kernel.warps, programs, kernel.ctas)
    high = he.estimate(worst_loops, kernel.warps, programs, kernel.ctas)
    return he.Estimate(low.low_s, high.high_s, low.tensor_floor_s, low.bound_by)


# ------------------------------------------------------------------ the report's section
GOALS = {384: 30e-6, 32768: 15e-3, 262144: 0.8, 1048576: 15.0}        # forward + backward, bf16


def seconds(x: float) -> str:
    return f"{x * 1e6:.3g} µs" if x < 1e-3 else f"{x * 1e3:.3g} ms" if x < 1 else f"{x:.3g} s"


def span(low: float, high: float) -> str:
    unit, scale = ("µs", 1e6) if high < 1e-3 else ("ms", 1e3) if high < 1 else ("s", 1.0)
    return f"{low * scale:.3g}–{high * scale:.3g} {unit}"


def kernel_table(kernels) -> list:
    rows = ["| kernel | dtype | config | regs | smem (B) | CTAs/SM | tile loop | SASS per warp per tile: all / "
            "tensor / fp32 / imad / alu / mufu / lds,sts,shfl / ldg,ldgsts / bar | cycles per tile per scheduler: "
            "issue-bound (pipe) / latency chain | overlap |", "|" + "---|" * 10]
    for k in kernels:
        for i, loop in enumerate(k.loops):
            c = loop.per_tile(k.k_steps, k.nested_trips)
            cyc = he.scheduler_cycles(c, k.warps)
            pipe = max(cyc, key=cyc.get)
            n = " / ".join(f"{c.classes[x]:.0f}" for x in ("tensor", "fp32", "imad", "alu", "mufu", "shared", "global"))
            overlap = ", ".join(w for w, on in (("wgmma waited per tile", c.sync_wgmma), ("cp.async/TMA", c.async_copy),
                                                ("LDG exposed", c.global_loads and not c.async_copy)) if on)
            nested = f" + {len(loop.nested)} nested x {k.nested_trips:.3g}" if loop.nested else ""
            nested += ", no loop: once" if k.straight else ""
            rows.append(f"| `{k.name}` | {k.dtype} | {k.config} | {k.regs} | {k.smem} | {k.ctas} ({k.limit}) | "
                        f"{i + 1} ({len(loop.body)} SASS{nested}{', K x' + str(k.k_steps) if k.k_steps > 1 else ''}) | "
                        f"{c.total:.0f} / {n} / {c.barriers:.0f} | {cyc[pipe]:.0f} ({pipe}) / "
                        f"{he.chain_cycles(c, k.warps):.0f} | {overlap or '-'} |")
    return rows


def report(root: Path, dtypes=("bfloat16", "float32"), sizes=SIZES, log=print) -> str:
    """Markdown: the compiled kernels' per-tile pipe counts, then per N the estimated times (labelled)."""
    backward = {dt: [k for k in [backward_kernel(root, dt, log=log)] if k] for dt in dtypes}
    launched = {(n, dt): forward_kernels(root, dt, n, log=log) + backward[dt] for n in sizes for dt in dtypes}
    sweeps = {}
    for n in sizes:
        finals = [k for dt in dtypes for k in launched[n, dt] if k.role() == "final"] or [None]
        bm, bns = (finals[0].bm, sorted({k.bn for k in finals}, reverse=True)) if finals[0] else (128, [32])
        log(f"estimate: selection model, N = {n}, programs of {bm} rows, column tiles {bns}")
        sweeps[n] = selection_sweeps(root, n, bm, tuple(bns), programs=PROGRAMS.get(n, 2))
    out = ["| N | dtype | kernel | sweeps per program (mean, max) | CTAs | CTAs/SM | estimate (low–high) | "
           "tensor floor | low bound by |", "|" + "---|" * 9]
    summary = ["| N | dtype | passes (mean, max) | trips/tile | forward | backward | fwd + bwd | goal (fwd + bwd) "
               "| eager reference fwd + bwd (traffic) |", "|" + "---|" * 9]
    for n in sizes:
        sw = sweeps[n]
        passes = [c + f for c, f in zip(sw.counting, sw.final)]
        for dt in dtypes:
            ks = launched[n, dt]
            fwd, bwd = [0.0, 0.0], [0.0, 0.0]
            for k in ks:
                est = kernel_estimate(k, n, sw)
                role = k.role()
                programs = k.programs(n)
                swept = {"sample": f"{sw.chunks} chunks", "final": f"{np.mean(sw.final):.2f}, {max(sw.final)}",
                         "backward": "1", "count": f"{np.mean(sw.counting):.2f}, {max(sw.counting)}"}[role]
                cell = "no pass mapping" if est is None else span(est.low_s, est.high_s)
                out.append(f"| {n} | {dt} | `{k.name}` | {swept} | {programs} | {k.ctas} | {cell} | "
                           f"{seconds(est.tensor_floor_s) if est else '-'} | {est.bound_by if est else '-'} |")
                if est is not None:
                    total = bwd if role == "backward" else fwd
                    total[0] += est.low_s
                    total[1] += est.high_s
            eager = eager_seconds(n)
            goal = GOALS.get(n)
            met = "" if goal is None or dt != "bfloat16" else (
                " (met)" if fwd[1] + bwd[1] <= goal else
                " (met at the low bound only)" if fwd[0] + bwd[0] <= goal else " (**not met**)")
            final_bn = next((k.bn for k in ks if k.role() == "final"), None)
            trips = f"{sw.trips[final_bn]:.2f} (BN {final_bn})" if final_bn in sw.trips else "-"
            summary.append(f"| {n} | {dt} | {np.mean(passes):.2f}, {max(passes)} | {trips} | {span(*fwd)} | "
                           f"{span(*bwd) if bwd[1] else '-'} | {span(fwd[0] + bwd[0], fwd[1] + bwd[1])} | "
                           f"{(seconds(goal) + met) if goal and dt == 'bfloat16' else '-'} | "
                           f"{span(*eager) if eager else 'does not fit: N x N fp32 buffers > 80 GB'} |")
    distinct = {(k.name, k.dtype, k.config, k.regs): k for ks in launched.values() for k in ks}
    roles = ("sample", "count", "final", "backward")
    ordered = sorted(distinct.values(), key=lambda k: (dtypes.index(k.dtype), roles.index(k.role())))
    tables = (summary, out, kernel_table(ordered))
    return "\n\n".join("\n".join(t) for t in tables) + "\n"
