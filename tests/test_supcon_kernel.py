"""The SupCon forward kernel (mcncl_fast/kernels/supcon.py) against its definition, computed in float64.

Most cases use dyadic embeddings (entries k / 32, |k| <= 8): every similarity is then exact in
float32 whatever the summation order, so the kernel's s_ij equal the float64 ones and t_i, the hard
set and theta can be compared exactly (ties included). `test_random_unit_vectors` uses ordinary
float32 unit vectors and skips the elements within rounding of the threshold. Output buffers are
poisoned with NaN first, so an element the kernel does not write shows up.
"""
from __future__ import annotations

import math

import pytest
import torch

from tests.helpers import INTERPRET, poison_

pytestmark = pytest.mark.skipif(not (INTERPRET or torch.cuda.is_available()),
                                reason="needs TRITON_INTERPRET=1 or a CUDA device")
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"


def label_counts(labels: torch.Tensor, hard_ratio: float):
    """(k, nneg) int32 [N]: negatives = valid rows of another class; label -1 = ignored."""
    valid = labels >= 0
    same = (labels[:, None] == labels[None, :]) & valid[:, None]
    nneg = torch.where(valid, (valid[None, :] & ~same).sum(1), 0)
    k = torch.ceil(hard_ratio * nneg.double() - 1e-6).long().clamp(min=1)
    k = torch.where(nneg > 0, torch.minimum(k, nneg), 0)
    return k.to(torch.int32), nneg.to(torch.int32)


def reference(z: torch.Tensor, labels, k, delta, temperature, row_start, row_count):
    """float64 (theta, logd, possum, hard) of the rows, straight from the definitions. theta is the
    float32 midpoint 0.5 a + 0.5 b of the smallest hard negative a and the largest other b."""
    z = z.double()
    m_count, n, _ = z.shape
    rows = torch.arange(row_start, row_start + row_count)
    theta = torch.empty(m_count, row_count, dtype=torch.float64)
    logd, possum = torch.empty_like(theta), torch.empty_like(theta)
    hard_all = []
    valid = labels >= 0
    for m in range(m_count):
        s = z[m, rows] @ z[m].T
        same = labels[rows, None] == labels[None, :]
        neg = valid[rows, None] & valid[None, :] & ~same
        pos = valid[rows, None] & same & (rows[:, None] != torch.arange(n)[None, :])
        hard = torch.zeros_like(neg)
        for r in range(row_count):
            kr = int(k[rows[r]])
            negs = s[r][neg[r]]
            if kr == 0:
                theta[m, r] = math.inf
                continue
            t = negs.sort(descending=True).values[kr - 1]
            thr = float(torch.tensor(float(t), dtype=torch.float32) - torch.tensor(float(delta[m])))
            hard[r] = neg[r] & (s[r] >= thr)
            a = s[r][hard[r]].min()
            other = s[r][neg[r] & ~hard[r]]
            if other.numel() == 0:
                theta[m, r] = -math.inf
            else:
                b = other.max()
                mid = 0.5 * a.float() + 0.5 * b.float()
                theta[m, r] = float(mid if (mid > b) & (mid <= a) else a)
        den = hard | pos
        lse = torch.logsumexp((s / temperature).masked_fill(~den, -math.inf), dim=1)
        logd[m] = torch.where(den.any(1), lse, 0.0)
        possum[m] = torch.where(pos, s, 0.0).sum(1)
        hard_all.append(hard)
    return theta, logd, possum, hard_all


@pytest.fixture(autouse=True)
def _poison_scratch(monkeypatch):
    """Buffers the kernels allocate (per-row state, candidate buffers) start as NaN / -1 (kernels/_common.py)."""
    from mcncl_fast.kernels import _common
    monkeypatch.setattr(_common, "POISON", True)


def run_kernel(z, labels, k, nneg, delta, temperature, row_start=0, row_count=None, **sizes):
    from mcncl_fast.kernels.supcon import supcon_fwd
    m_count, n, _ = z.shape
    row_count = n - row_start if row_count is None else row_count
    out = tuple(poison_(torch.empty(m_count, row_count, device=DEVICE)) for _ in range(3))
    theta, logd, possum, passes = supcon_fwd(
        z.to(DEVICE), labels.to(DEVICE, torch.int32), k.to(DEVICE), nneg.to(DEVICE),
        delta.to(DEVICE, torch.float32), temperature, row_start=row_start, row_count=row_count, out=out,
        **sizes)
    assert theta.data_ptr() == out[0].data_ptr()
    assert passes.dtype == torch.int32 and passes.shape[0] == m_count and (passes >= 1).all(), passes
    return theta.cpu(), logd.cpu(), possum.cpu(), passes.cpu()


def check(z, labels, hard_ratio=0.3, temperature=0.5, delta=2.0 ** -18, row_start=0, row_count=None, k=None):
    m_count, n, _ = z.shape
    row_count = n - row_start if row_count is None else row_count
    k_, nneg = label_counts(labels, hard_ratio)
    k = k_ if k is None else k
    delta = torch.full((m_count,), float(delta)) if not torch.is_tensor(delta) else delta
    got = run_kernel(z, labels, k, nneg, delta, temperature, row_start, row_count)
    want = reference(z, labels, k, delta, temperature, row_start, row_count)
    for name, g, w in zip(("theta", "logd", "possum"), got[:3], want[:3]):
        assert not torch.isnan(g).any(), f"{name}: unwritten (NaN) elements"
    assert torch.equal(got[0].double(), want[0]), (got[0], want[0])
    torch.testing.assert_close(got[1].double(), want[1], rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(got[2].double(), want[2], rtol=1e-6, atol=1e-5)
    return got, want


def dyadic(m, n, d=32, seed=0, dtype=torch.float32):
    """Entries k / 32, |k| <= 8: products and sums exact in float32 (and float16 inputs)."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(-8, 9, (m, n, d), generator=gen).float() / 32).to(dtype)


def labels_of(n, classes, seed=0, ignored=0.0):
    gen = torch.Generator().manual_seed(seed + 1)
    labels = torch.randint(0, classes, (n,), generator=gen)
    labels[torch.rand(n, generator=gen) < ignored] = -1
    return labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dyadic_with_ignored_rows(dtype):
    z = dyadic(2, 300, seed=1, dtype=dtype)
    labels = labels_of(300, 7, seed=1, ignored=0.1)
    got, want = check(z, labels)
    assert (got[0][:, labels < 0] == math.inf).all() and (got[1][:, labels < 0] == 0).all()


@pytest.mark.parametrize("row_start,row_count", [(37, 150), (299, 1), (0, 0), (128, 172)])
def test_row_range(row_start, row_count):
    z = dyadic(1, 300, seed=2)
    check(z, labels_of(300, 5, seed=2, ignored=0.05), hard_ratio=0.2, row_start=row_start, row_count=row_count)


def test_single_row():
    got, _ = check(dyadic(1, 1, seed=3), torch.tensor([0]))
    assert got[0].item() == math.inf and got[1].item() == 0 and got[2].item() == 0


def test_one_class_and_singleton_class():
    z = dyadic(1, 70, seed=4)
    got, _ = check(z, torch.zeros(70, dtype=torch.long))            # no negatives: theta = +inf
    assert (got[0] == math.inf).all()
    labels = torch.randint(1, 4, (70,), generator=torch.Generator().manual_seed(4))
    labels[5] = 0                                                    # a class with one member
    got, _ = check(z, labels)
    assert got[2][0, 5] == 0


def test_every_negative_hard():
    got, _ = check(dyadic(1, 130, seed=5), labels_of(130, 3, seed=5), hard_ratio=1.0)
    assert (got[0] == -math.inf).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_exact_duplicates_tied_at_threshold(dtype):
    z = dyadic(1, 200, seed=6)
    z[0, 100:160] = z[0, 40]                 # 60 copies of one row: 60 equal similarities per anchor
    labels = labels_of(200, 4, seed=6)
    labels[100:160] = (labels[40] + 1) % 4
    check(z.to(dtype), labels, hard_ratio=0.1)


def test_tie_tolerance():
    """Negatives t - 2^-12 and t - 2^-11 are within delta = 1.5 * 2^-11 of t (hard), t - 2^-9 is not."""
    n, d = 90, 32
    z = dyadic(1, n, d=d, seed=7) / 4                     # background similarities within +-1/8
    z[0, 0] = 0.0
    z[0, 0, 0] = 1.0                                      # anchor e_0
    for j, v in zip(range(1, 6), (0.5, 0.5, 0.5 - 2.0 ** -12, 0.5 - 2.0 ** -11, 0.5 - 2.0 ** -9)):
        z[0, j] = 0.0
        z[0, j, 0] = v                                    # s_0j = v
    labels = torch.ones(n, dtype=torch.long)
    labels[0] = 0
    k, _ = label_counts(labels, 0.3)
    k[0] = 2                                              # t_0 = 0.5
    got, want = check(z, labels, k=k, delta=1.5 * 2.0 ** -11)
    hard = want[3][0][0]
    assert hard[1:5].all() and not hard[5] and hard.sum() == 4
    assert 0.5 - 2.0 ** -9 < got[0][0, 0] <= 0.5 - 2.0 ** -11


def test_random_unit_vectors():
    """float32 unit vectors (inexact similarities): every element farther than 1e-6 from t_i - delta
    is classified as float64 does, and logd agrees where no element is that close."""
    gen = torch.Generator().manual_seed(8)
    z = torch.nn.functional.normalize(torch.randn(1, 257, 64, generator=gen), dim=-1)
    labels = labels_of(257, 6, seed=8, ignored=0.02)
    k, nneg = label_counts(labels, 0.3)
    delta = torch.tensor([2.0 ** -18])
    theta, logd, possum, _ = run_kernel(z, labels, k, nneg, delta, 0.07)
    w_theta, w_logd, w_possum, (hard,) = reference(z, labels, k, delta, 0.07, 0, 257)
    s = z[0].double() @ z[0].double().T
    valid = labels >= 0
    neg = valid[:, None] & valid[None, :] & (labels[:, None] != labels[None, :])
    t = torch.where(neg, s, -math.inf).sort(1, descending=True).values.gather(1, (k.long() - 1).clamp(min=0)[:, None])
    clear = (s - (t - 2.0 ** -18)).abs() > 1e-6
    kernel_hard = neg & (s >= theta[0].double()[:, None])
    assert torch.equal(kernel_hard & clear, hard & clear)
    rows = (clear | ~neg).all(1)
    assert rows.float().mean() > 0.9
    torch.testing.assert_close(logd[0, rows].double(), w_logd[0, rows], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(possum.double(), w_possum, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ adversarial selection cases
def coarse(m, n, d=8, seed=0, scale=0.25):
    """Entries in {-1, 0, 1} * scale: few distinct similarities, many exact ties everywhere."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(-1, 2, (m, n, d), generator=gen).float() * scale


@pytest.mark.parametrize("hard_ratio", [0.3, 0.001, 1.0])
def test_many_exact_ties(hard_ratio):
    check(coarse(1, 300, seed=11), labels_of(300, 4, seed=11, ignored=0.05), hard_ratio=hard_ratio)


def test_every_negative_equal():
    z = dyadic(1, 260, seed=12)
    labels = (torch.arange(260) % 2).long()
    z[0, labels == 1] = z[0, 1].clone()          # anchors of class 0: all negatives alike
    got, _ = check(z, labels, hard_ratio=0.3)
    assert (got[0][0, labels == 0] == -math.inf).all()


def test_threshold_in_a_dense_cluster():
    """Class means plus a little dyadic noise: negatives of one class crowd around one value."""
    gen = torch.Generator().manual_seed(13)
    labels = labels_of(400, 5, seed=13)
    means = torch.randint(-8, 9, (5, 32), generator=gen).float() / 32
    z = means[labels] + torch.randint(-1, 2, (400, 32), generator=gen).float() / 256
    check(z[None], labels, hard_ratio=0.3, delta=2.0 ** -12)


def test_similarities_near_zero():
    """Sparse rows on disjoint supports: most similarities are exactly 0, some -0.0 (rows of -0.0)."""
    n, d = 300, 64
    gen = torch.Generator().manual_seed(14)
    z = torch.zeros(1, n, d)
    z[0, torch.arange(n), torch.randint(0, d, (n,), generator=gen)] = torch.randint(1, 4, (n,), generator=gen) / 4.0
    z[0, ::7] = -0.0
    z[0, 5::11] *= -1
    check(z, labels_of(n, 6, seed=14), hard_ratio=0.3)


def test_large_norms_temperature_one():
    """Integer entries up to 64 (not normalised): |s| up to ~1e5, exact in float32; tau = 1."""
    z = dyadic(1, 280, seed=15) * 2048
    check(z, labels_of(280, 5, seed=15, ignored=0.05), temperature=1.0, delta=0.5)


# ------------------------------------------------------------------ pass counts: model == kernel
def test_selection_model_reproduces_the_pass_counts():
    """benchmarks/supcon_selection_model.py takes the kernels' decisions: on exact (dyadic) data it
    gives the interpreter's passes per program, including key passes and the final-pass fallbacks."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import numpy as np
    import supcon_selection_model as model
    from mcncl_fast.kernels import supcon, supcon_select

    for name in ("BINS", "ABOVE", "CHUNK", "SAMPLE_DIV", "MAX_CHUNKS", "Z", "CAP", "READY", "VALUE_PASSES",
                 "KEY_PASSES"):
        assert getattr(model, name) == getattr(supcon_select, name).value, name
    config = supcon.configs_for(torch.float32, 32)[0].kwargs
    # (ready, cap) = the defaults, and the earlier 200 / 256: at this N only small ones reach the
    # counting passes after pass 1, the key passes and the candidate overflow
    small = dict(ready=200, cap=256)
    cases = [(dyadic(1, 600, seed=16), 7, 0.3, 2.0 ** -18, 19, {}),     # typical: 2 passes
             (dyadic(1, 600, seed=16), 7, 0.3, 2.0 ** -18, 19, small),
             (coarse(1, 500, seed=5), 4, 0.3, 2.0 ** -18, 2, small),          # ties
             (dyadic(1, 520, seed=6), 5, 0.3, 0.3, 2, small)]                 # huge delta: overflow, fallbacks
    seen = set()
    for z, classes, ratio, delta, label_seed, sizes in cases:
        labels = labels_of(z.shape[1], classes, seed=label_seed, ignored=0.05)
        k, nneg = label_counts(labels, ratio)
        got = run_kernel(z, labels, k, nneg, torch.tensor([delta]), 0.5, **sizes)[3][0].tolist()
        want = model.simulate(z[0].numpy(), labels.numpy().astype(np.int32), bm=config["BM"], bn=config["BN"],
                              k=k.numpy(), nneg=nneg.numpy(), delta=delta, **sizes)
        assert got == want, (got, want, sizes)
        seen.update(got)
    assert max(seen) > 2, seen
