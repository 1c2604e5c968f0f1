"""Passes over the similarity tiles of the SupCon forward's exact selection, simulated in numpy.

The algorithm simulated is the one mcncl_fast/kernels/supcon.py (as of the "Before" report) describes: per anchor
row, order-preserving uint32 keys of the float32 similarities; a stats pass gives the initial bracket
[lo, hi] on the side of zero that holds t_i (the k_i-th largest negative); each histogram pass splits the
bracket into 16 bins of width 2^shift (shift = max(bit length of hi - lo, 4) - 4) and keeps the highest
bin whose suffix count is still >= k_i; a row is done when lo == hi or count(key >= lo) == k_i; a
program (BM rows) repeats histogram passes until all its rows are done (at most 8); then a
denominator pass. Passes over the tiles per program = 1 + histogram passes + 1.

Rows evolve independently, so a program's count depends only on its own rows: a few programs
(sampled at random) against all N columns estimate the mean. `interpreter_passes` runs the kernel
itself (TRITON_INTERPRET=1, a separate process) and reads its `passes` output.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

MAX_HIST_PASSES = 8


def embeddings(n: int, d: int = 128, classes: int = 7, kind: str = "random", noise: float = 1.0, seed: int = 0):
    """(z float32 [n, d] unit rows, labels int32 [n]). kind "random": N(0, I) rows; "clustered": class
    mean (random unit vector) + noise * N(0, I / d), so same-class cosines are ~ 1 / (1 + noise^2)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n).astype(np.int32)
    z = rng.standard_normal((n, d), dtype=np.float32)
    if kind == "clustered":
        means = rng.standard_normal((classes, d), dtype=np.float32)
        means /= np.linalg.norm(means, axis=1, keepdims=True)
        z = means[labels] + np.float32(noise / math.sqrt(d)) * z
    elif kind != "random":
        raise ValueError(f"kind: 'random' or 'clustered', got {kind!r}")
    return z / np.linalg.norm(z, axis=1, keepdims=True), labels


def hard_counts(labels: np.ndarray, hard_ratio: float):
    """(k_i, number of negatives) per anchor: k = min(neg, max(1, ceil(r * neg))) as the reference."""
    n = labels.size
    sizes = np.bincount(labels)
    neg = n - sizes[labels]
    k = np.minimum(neg, np.maximum(1, np.ceil(hard_ratio * neg - 1e-6))).astype(np.int64)
    return np.where(neg > 0, k, 0), neg.astype(np.int64)


def keys(s: np.ndarray) -> np.ndarray:
    """Order-preserving uint32 key of float32 s (-0.0 and +0.0 share a key)."""
    bits = np.where(s == 0, np.float32(0), s).astype(np.float32).view(np.uint32)
    return np.where(bits >> 31 != 0, ~bits, bits | np.uint32(1 << 31)).astype(np.uint32)


def program_passes(s: np.ndarray, neg: np.ndarray, k: np.ndarray):
    """Histogram passes of one program; s [R, N] float32 similarities of its rows, neg [R, N] negatives,
    k [R]. Returns (passes, lo [R]: the final lower bracket key)."""
    key = keys(s).astype(np.int64)
    above = neg & (key >= 1 << 31)
    n_above, nneg = above.sum(1), neg.sum(1)
    t_above = n_above >= k
    lo = np.where(t_above, np.where(above, key, 0xFFFFFFFF).min(1), 0)
    hi = np.where(t_above, np.where(neg, key, 0).max(1), np.where(neg & ~above, key, 0).max(1))
    c_lo = np.where(t_above, n_above, nneg)
    done = (k <= 0) | (c_lo == k) | (lo == hi)
    rows = np.arange(len(k))
    npass = 0
    while not done.all() and npass < MAX_HIST_PASSES:
        width = hi - lo
        shift = sum(((width >> (bit + 4)) != 0).astype(np.int64) for bit in range(28))
        inside = neg & ~done[:, None] & (key >= lo[:, None]) & (key <= hi[:, None])
        r, c = np.nonzero(inside)
        bins = (key[r, c] - lo[r]) >> shift[r]
        hist = np.bincount(r * 16 + bins, minlength=16 * len(k)).reshape(-1, 16)
        cnt_ge = c_lo[:, None] - (np.cumsum(hist, axis=1) - hist)
        best = (cnt_ge >= k[:, None]).sum(1) - 1
        new_lo = lo + (best << shift)
        new_hi = np.minimum(new_lo + (1 << shift) - 1, hi)
        lo, hi, c_lo = (np.where(done, a, b) for a, b in ((lo, new_lo), (hi, new_hi), (c_lo, cnt_ge[rows, best])))
        done = done | (c_lo == k) | (lo == hi)
        npass += 1
    return npass, lo


def simulate(z, labels, hard_ratio: float = 0.3, bm: int = 64, programs=None, seed: int = 0):
    """Histogram passes of the given programs (default: all) -> list of ints."""
    n = len(labels)
    total = math.ceil(n / bm)
    if programs is not None and programs < total:
        chosen = np.sort(np.random.default_rng(seed).choice(total, programs, replace=False))
    else:
        chosen = np.arange(total)
    k, _ = hard_counts(labels, hard_ratio)
    out = []
    for p in chosen:
        rows = np.arange(p * bm, min(n, (p + 1) * bm))
        s = z[rows] @ z.T
        neg = labels[rows, None] != labels[None, :]
        out.append(program_passes(s, neg, k[rows])[0])
    return out


def interpreter_passes(root: Path, n: int = 2048, kind: str = "random", hard_ratio: float = 0.3, seed: int = 0):
    """Run <root>/kernels/supcon.py's forward under TRITON_INTERPRET=1 (separate process) on
    `embeddings(n, kind=kind, seed=seed)`; returns (BM of the interpreter config, histogram passes per
    program, from the kernel's `passes` output)."""
    env = {k: v for k, v in os.environ.items()}
    env.update(TRITON_INTERPRET="1", TRITON_DEFAULT_FP_FUSION="1")
    code = f"""
import json, sys, torch
sys.path.insert(0, {str(Path(__file__).parent)!r})
from static_analysis import call_by_name, load_kernels
from supcon_passes import embeddings, hard_counts
sup = load_kernels({str(root)!r}).supcon
z, labels = embeddings({n}, kind={kind!r}, seed={seed})
k, neg = hard_counts(labels, {hard_ratio})
i32 = lambda a: torch.from_numpy(a).to(torch.int32)
values = dict(z=torch.from_numpy(z)[None], labels=i32(labels), class_ids=i32(labels), k=i32(k), nneg=i32(neg),
              negatives=i32(neg), temperature=0.07, hard_ratio={hard_ratio}, delta=torch.zeros(1))
fwd = getattr(sup, "supcon_fwd", None) or sup.supcon_forward   # the launcher's name in older checkouts
out = call_by_name(fwd, values)
bm = sup.configs_for(torch.float32)[0].kwargs["BM"]
passes = [t for t in out if t.dtype == torch.int32][-1][0, :-(-{n} // bm)].tolist()
# the kernel of the "Before" report counted histogram passes; later ones count all passes over the tiles
hist = "histogram passes" in " ".join((fwd.__doc__ or "").split())
print(json.dumps({{"bm": bm, "passes": [p if hist else p - 2 for p in passes]}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return result["bm"], result["passes"]


def report(root: Path, sizes=(32768, 262144), programs: int = 32, interp_n: int = 2048, log=print) -> str:
    """Markdown: mean passes over the tiles per program, simulated and (at interp_n) measured."""
    lines = ["| embeddings | N | BM | programs | histogram passes: mean (min-max) | passes over tiles (mean) |",
             "|---|---|---|---|---|---|"]

    def row(kind, n, bm, passes, how):
        spread = f"{np.mean(passes):.2f} ({min(passes)}-{max(passes)})"
        lines.append(f"| {kind} | {n} | {bm} | {len(passes)} {how} | {spread} | **{np.mean(passes) + 2:.2f}** |")

    notes = []
    for kind in ("random", "clustered"):
        log(f"selection passes: interpreter, {kind}, N={interp_n}")
        try:
            bm, measured = interpreter_passes(root, interp_n, kind)
        except Exception as exc:       # e.g. a rewritten kernel without this launcher / output
            notes.append(f"interpreter run ({kind}) failed: {str(exc).strip().splitlines()[-1][:200]}")
            bm, measured = 64, None
        z, labels = embeddings(interp_n, kind=kind)
        simulated = simulate(z, labels, bm=bm)
        if measured is not None:
            row(kind, interp_n, bm, measured, "(interpreter, measured)")
            same = sum(a == b for a, b in zip(measured, simulated))
            notes.append(f"{kind}, N = {interp_n}: simulation {np.mean(simulated) + 2:.2f} vs interpreter "
                         f"{np.mean(measured) + 2:.2f} passes over tiles; the same count in {same} of "
                         f"{len(measured)} programs")
        row(kind, interp_n, bm, simulated, "(simulated)")
        for n in sizes:
            log(f"selection passes: simulation, {kind}, N={n}")
            z, labels = embeddings(n, kind=kind)
            passes = simulate(z, labels, bm=64, programs=programs)
            row(kind, n, 64, passes, f"of {math.ceil(n / 64)} (simulated)")
    return "\n".join(lines + [""] + [f"- {n}" for n in notes])
