"""benchmarks/h100_estimate.py and h100_supcon.py: the H100 time estimate from SASS.

Pipe counts and cycles of hand-made SASS are worked out by hand here from the per-pipe costs the
module docstring states (fp32 1, alu 2, mufu 8, 4 per 32 bits on the LSU, wgmma 1024 FLOP per
scheduler-cycle; high bound: wgmma latency 128, 24 per barrier, 400 per exposed L2 load). One real
compile (a subprocess: the interpreter patches triton.language) estimates the current kernels.
"""
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import h100_estimate as he  # noqa: E402
import h100_supcon as hs  # noqa: E402
from static_analysis import find_loops  # noqa: E402

CLOCK = 1.755e9
# one warp's tile: 17 instructions
SNIPPET = [
    "HGMMA.64x32x16.F32.BF16 R24, gdesc[UR8], R24, gsb0",     # tensor: 2*64*32*16 / 4 warps / 1024 = 16 cycles
    "FFMA R1, R2, R3, R4", "FADD R1, R1, R2",                   # fp32: 2
    "IMAD.MOV.U32 R5, RZ, RZ, R6",                              # imad: 1
    "@P0 ISETP.GE.AND P1, PT, R1, R2, PT", "SEL R3, R4, R5, P1", "LOP3.LUT R1, R2, 0xff, RZ, 0xc0, !PT",
    "F2I.TRUNC.NTZ R1, R2", "@!P1 FMNMX R1, R2, R3, !PT",      # alu: 5
    "MUFU.EX2 R1, R2",                                          # mufu: 1
    "LDS.128 R4, [R2]", "STS [R3], R4",                         # shared: 16 + 4 lsu cycles
    "LDGSTS.E.BYPASS.128 [R1], desc[UR4][R2.64]",               # global (cp.async): 16 lsu cycles
    "BAR.SYNC.DEFER_BLOCKING 0x0", "WARPGROUP.DEPBAR.LE gsb0, 0x0",   # barrier: 2 (one BAR, a waited wgmma)
    "UMOV UR4, 0x1", "BRA 0x100",                               # other: 2
]


def test_pipe_counts_of_a_hand_made_tile():
    c = he.count_pipes(SNIPPET)
    assert dict(c.classes) == {"tensor": 1, "fp32": 2, "imad": 1, "alu": 5, "mufu": 1, "shared": 2, "global": 1,
                               "barrier": 2, "other": 2}
    assert c.total == 17 and c.tensor == 16 and c.lsu == 36 and c.barriers == 1
    assert c.sync_wgmma and c.async_copy and not c.global_loads
    # 8 warps = 2 per scheduler
    assert he.scheduler_cycles(c, 8) == {"issue": 34, "fp32": 6, "alu": 20, "mufu": 16, "lsu": 72, "tensor": 32}
    # chain: the non-tensor pipes (72) + the waited wgmma batch (32 + 128) + one barrier (24); cp.async: no L2
    assert he.chain_cycles(c, 8) == 72 + 32 + 128 + 24


def test_exposed_l2_and_asynchronous_wgmma():
    c = he.count_pipes(["LDG.E.128 R4, desc[UR4][R2.64]", "HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24",
                        "WARPGROUP.DEPBAR.LE gsb0, 0x1", "FFMA R1, R2, R3, R4"])
    assert c.global_loads and not c.async_copy and not c.sync_wgmma
    # 4 warps = 1 per scheduler: lsu 16, tensor 2*64*64*16/4/1024 = 32, issue 4; wgmma overlapped, L2 exposed
    assert he.scheduler_cycles(c, 4)["tensor"] == 32 and he.scheduler_cycles(c, 4)["lsu"] == 16
    assert he.chain_cycles(c, 4) == 32 + 400
    assert he.tensor_cycles("HMMA.16816.F32.BF16") == 2 * 16 * 8 * 16 / 1024
    assert he.tensor_cycles("HMMA.1688.F32.TF32") == 2 * 16 * 8 * 8 / 1024 * 2


def test_bounds_by_hand_ordering_and_scaling():
    c = he.count_pipes(SNIPPET)                      # issue-bound 72 cycles, chain 256 (above)
    e = he.estimate([(c, 100)], warps=8, programs=264, ctas_per_sm=1)
    assert e.low_s == pytest.approx(100 * 72 * 2 / CLOCK)
    assert e.high_s == pytest.approx(2 * 100 * 256 / CLOCK)           # 2 waves, latency-bound
    assert e.tensor_floor_s == pytest.approx(100 * 32 * 2 / CLOCK) and e.bound_by == "lsu"
    # 4 CTAs per SM, 4 programs per SM: one wave; the SM's pipes (4 x 72 = 288) bind, not one CTA's chain
    e4 = he.estimate([(c, 100)], warps=8, programs=528, ctas_per_sm=4)
    assert e4.high_s == pytest.approx(100 * 288 / CLOCK) and e4.low_s == pytest.approx(100 * 72 * 4 / CLOCK)
    # 2 programs per SM, 4 could be resident: the 2 share the SM, the chain (256 > 2 x 72) binds
    assert he.estimate([(c, 100)], 8, 264, 4).high_s == pytest.approx(100 * 256 / CLOCK)
    # fewer programs than SMs: one program's serial work
    assert he.estimate([(c, 100)], 8, 9, 1).low_s == pytest.approx(100 * 72 / CLOCK)
    for programs in (1, 9, 131, 132, 133, 768, 6144):
        for ctas in (1, 2, 3, 4):
            one = he.estimate([(c, 50)], 8, programs, ctas)
            two = he.estimate([(c, 100)], 8, programs, ctas)
            assert 0 < one.tensor_floor_s <= one.low_s <= one.high_s
            assert two.low_s == pytest.approx(2 * one.low_s) and two.high_s == pytest.approx(2 * one.high_s)
        assert he.estimate([(c, 50)], 8, 4 * 132 * programs, 1).low_s == pytest.approx(
            4 * programs * he.estimate([(c, 50)], 8, 132, 1).low_s)


def listing(*texts):
    return [(16 * i, t) for i, t in enumerate(texts)]


def test_tile_loops_k_loop_and_nested_trips():
    ffma = ["FFMA R1, R2, R3, R1"] * 64
    # tile loop [0x10 ..]: IADD3, K loop (64 FFMA, LDS, branch), ISETP, candidate loop (SEL, branch), branch back
    k_start = 0x20
    texts = ["MOV R0, RZ", "IADD3 R1, R1, 0x1, RZ", *ffma, "LDS R4, [R2]", f"@P0 BRA {k_start:#x}"]
    nested_start = 16 * (len(texts) + 1)
    texts += ["ISETP.GE.AND P1, PT, R1, R2, PT", "SEL R3, R4, R5, P1", f"@P1 BRA {nested_start:#x}", "@P2 BRA 0x10",
              "EXIT"]
    [loop] = he.tile_loops(listing(*texts), True, find_loops)
    assert len(loop.k_body) == 66 and len(loop.nested) == 1 and len(loop.nested[0]) == 2
    tile = loop.per_tile(k_steps=8, trips=3)
    # body once (IADD3, 64 FFMA, LDS, BRA, ISETP, SEL, BRA, BRA) + 7 more K steps + 2 more candidate trips
    assert tile.classes["fp32"] == 8 * 64 and tile.classes["shared"] == 8
    assert tile.classes["alu"] == 3 + 2 * 1 and tile.classes["other"] == 3 + 7 + 2
    # without a K loop the FFMA loop itself is the tile loop (no MMA in the kernel: >= 64 FFMA make the dot)
    [flat] = he.tile_loops(listing(*texts), False, find_loops)
    assert len(flat.body) == 66 and not flat.nested


def test_trips_per_tile_and_window_of_the_model():
    window = np.array([[1, 1, 0, 1, 1], [0, 1, 1, 1, 0]], bool)
    # tiles of 2 columns: row counts (2, 1, 1) and (1, 2, 0) -> max per tile 2, 2, 1
    assert hs.trips_per_tile(window, 2) == pytest.approx(5 / 3)
    model = hs.load_model(ROOT)
    z, labels = model.embeddings(1024, seed=3)
    k, nneg = model.hard_counts(labels, 0.3)
    rows = np.arange(128)
    s, neg, pos = model.similarities(z, labels, rows)
    passes, win = hs.counting_and_window(model, s, neg, pos, k[rows], nneg[rows])
    assert passes >= 1 and passes + 1 == model.program_passes(s, neg, pos, k[rows], nneg[rows], hs.DELTA, 32)
    kth = -np.sort(-np.where(neg, s, -np.inf), axis=1)[np.arange(128), k[rows] - 1]
    open_rows = win.any(1)
    assert open_rows.sum() > 64 and (win.sum(1) <= model.READY).all()
    lo = np.where(win, s, np.inf).min(1)
    hi = np.where(win, s, -np.inf).max(1)
    assert ((lo <= kth) & (kth <= hi))[open_rows].all()       # the bracket holds the k-th largest negative


def test_eager_traffic():
    low, high = hs.eager_seconds(32768)
    # forward 237 B (sort 168 of it) + backward 54 B per element, 3 modalities, 3.35 TB/s; high at 60 %
    assert low == pytest.approx(3 * 32768 ** 2 * 291 / 3.35e12) and high == pytest.approx(low / 0.6)
    assert hs.eager_seconds(262144) is None                   # 262144^2 x 20 B > 80 GB


def fake_kernel(name, loops, bm=128, bn=32):
    return hs.Kernel(name, "bfloat16", "", 100, 0, 8, 1, "R", bm, bn, 1, loops)


def test_passes_scale_the_counting_and_final_kernels():
    loop = he.TileLoop(SNIPPET, [], [])
    count = fake_kernel("supcon_count", [loop, loop, loop])
    final = fake_kernel("supcon_final", [loop])
    two = hs.Sweeps([1, 1], [1, 1], {32: 1.0}, 8, 2)       # 2 passes: pass 1 + the final pass
    four = hs.Sweeps([3, 3], [2, 2], {32: 1.0}, 8, 2)      # pass 1, a value pass, a key pass; 2 final passes
    n = 32768
    assert [t for _, t in hs.kernel_loops(count, n, two, False)] == [1024, 0, 0]
    assert [t for _, t in hs.kernel_loops(count, n, four, False)] == [1024, 1024, 1024]
    e2, e4 = hs.kernel_estimate(count, n, two), hs.kernel_estimate(count, n, four)
    assert e4.low_s == pytest.approx(3 * e2.low_s) and e4.high_s == pytest.approx(3 * e2.high_s)
    f2, f4 = hs.kernel_estimate(final, n, two), hs.kernel_estimate(final, n, four)
    assert f4.low_s == pytest.approx(2 * f2.low_s)
    assert hs.kernel_estimate(fake_kernel("supcon_other", [loop] * 4), n, two) is None
    # one kernel per kind of counting pass: 3 counting sweeps = pass 1 + a value pass + a key pass
    five = hs.Sweeps([4, 4], [1, 1], {32: 1.0}, 8, 2)      # pass 1, a value pass, 2 key passes
    for name, sweeps in (("supcon_pass1", 1), ("supcon_value", 1), ("supcon_key", 2), ("supcon_count", 4)):
        [(_, tiles)] = hs.kernel_loops(fake_kernel(name, [loop]), n, five, False)
        assert tiles == 1024 * sweeps, name


def test_report_estimates_the_current_kernels():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "static_report.py"), "--kernels", "",
                           "--estimate", "--estimate-sizes", "384", "--dtypes", "bfloat16"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    assert "estimate from the sm_90 SASS (not a measurement)" in text and "no pass mapping" not in text
    # at N = 384 the sample kernel has one chunk: its loop is specialised away, the body runs once
    assert re.search(r"\| 384 \| bfloat16 \| `supcon_sample` \| 1 chunks \| 18 \| \d+ \| [\d.]+–[\d.]+ µs", text)
    row = re.search(r"\| 384 \| bfloat16 \| `supcon_count` \| [^|]+\| 9 \| (\d+) \| ([\d.]+)–([\d.]+) (µs|ms) \|", text)
    assert row, text[-3000:]
    low, high = float(row.group(2)), float(row.group(3))
    assert int(row.group(1)) >= 1 and math.isfinite(high) and 0 < low <= high
    assert re.search(r"\| 384 \| bfloat16 \| 2\.00, 2 \| [\d.]+ \(BN 32\) \| [\d.]+–[\d.]+ µs \|", text)
