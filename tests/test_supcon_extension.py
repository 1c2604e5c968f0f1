"""mcncl_fast._C SupCon backward (csrc/supcon_*): host gradient, pointer API, nvcc build checks."""
import ctypes
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mcncl_fast import _C
from mcncl_fast.ops import supcon as supcon_op
from mcncl_fast.reference import ops as reference_ops

ROOT = Path(__file__).resolve().parents[1]


class HostSupCon(torch.autograd.Function):
    """The chunked forward (in z's precision) + the host C++ backward, for gradcheck in float64."""

    @staticmethod
    def forward(ctx, z, labels, temperature, hard_ratio):
        k, npos = reference_ops.label_statistics(labels, hard_ratio)[1:3]
        theta, logd, possum = supcon_op.chunked_forward(z, labels, k, temperature)
        npos = npos.to(z.dtype)
        ctx.save_for_backward(z, labels, theta, logd, npos)
        ctx.temperature = temperature
        return supcon_op.combine(logd, possum, npos, temperature)

    @staticmethod
    def backward(ctx, grad_loss):
        z, labels, theta, logd, npos = ctx.saved_tensors
        grad = supcon_op.host_backward(grad_loss, z, labels, theta, logd, npos, ctx.temperature)
        return grad, None, None, None


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("hard_ratio", [0.3, 1.0])
def test_gradcheck_host_backward_float64(normalize, hard_ratio):
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(2, 14, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 3, (14,), generator=gen)

    def fn(x):
        x = F.normalize(x, dim=-1) if normalize else x
        return HostSupCon.apply(x, labels, 0.5, hard_ratio)

    assert torch.autograd.gradcheck(fn, (z,), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_host_backward_matches_reference_autograd_float64():
    """Against the reference math run in float64 (its ops, not ours), through autograd."""
    gen = torch.Generator().manual_seed(1)
    zn = F.normalize(torch.randn(3, 40, 12, generator=gen, dtype=torch.float64), dim=-1)
    labels = torch.randint(0, 4, (40,), generator=gen)
    g = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    ref_z = zn.clone().requires_grad_(True)
    ref = torch.stack([_reference_single_f64(ref_z[m], labels) for m in range(3)])
    (ref_grad,) = torch.autograd.grad((ref * g).sum(), ref_z)
    k, npos = reference_ops.label_statistics(labels, 0.3)[1:3]
    theta, logd, possum = supcon_op.chunked_forward(zn, labels, k, 0.07)
    grad = supcon_op.host_backward(g, zn, labels, theta, logd, npos.double(), 0.07)
    assert grad.dtype == torch.float64
    # the per-row values (theta, log D, w, 1/|P|) cross the pointer API as float32: ~1e-7 relative
    assert ((grad - ref_grad).norm() / ref_grad.norm()).item() < 1e-6


def _reference_single_f64(z, labels, temperature=0.07, hard_ratio=0.3):
    """DESIGN.md §4.3 written out densely in float64 (z already normalised)."""
    n = z.shape[0]
    sim = z @ z.T
    same = labels[:, None] == labels[None, :]
    pos = same & ~torch.eye(n, dtype=torch.bool)
    neg = ~same
    k = reference_ops.hard_negative_counts(labels, hard_ratio)
    with torch.no_grad():
        t = sim.masked_fill(~neg, float("-inf")).sort(dim=1, descending=True).values.gather(1, (k - 1)[:, None])
    den = pos | (neg & (sim >= t))
    log_d = torch.logsumexp((sim / temperature).masked_fill(~den, float("-inf")), dim=1)
    n_pos = pos.sum(dim=1)
    per_anchor = log_d - (sim / temperature * pos).sum(dim=1) / n_pos
    return per_anchor[n_pos > 0].mean()


def _args(zn, labels, hard_ratio=0.3, temperature=0.07, g=None):
    k, npos = reference_ops.label_statistics(labels, hard_ratio)[1:3]
    theta, logd, _ = supcon_op.chunked_forward(zn.float(), labels, k, temperature)
    g = torch.ones(zn.shape[0]) if g is None else g
    return g, theta, logd, npos.float()


def _raw_backward(zn, labels32, theta, logd, w, inv_npos, temperature=0.07, row_start=0, row_count=-1,
                  device=False, w_scale=None):
    """The binding called directly: labels32 may hold -1 (ignored rows); grad is [M, rows, D]."""
    m_count, n, d = zn.shape
    rows = max(0, n - row_start if row_count < 0 else row_count)
    w_scale = w.abs().amax(dim=1).contiguous() if w_scale is None else w_scale
    ts = [t.contiguous() for t in (labels32, theta.float(), logd.float(), w.float(), inv_npos.float(), w_scale)]
    if device:
        ts = [t.cuda() for t in ts]
        zn = zn.cuda()
        grad = torch.empty(m_count, rows, d, dtype=torch.float32, device="cuda")
    else:
        grad = torch.empty(m_count, rows, d, dtype=zn.dtype)
    labels32, theta, logd, w, inv_npos, w_scale = ts
    tail = (torch.cuda.current_stream().cuda_stream,) if device else (0,)
    fn = _C.supcon_backward_cuda if device else _C.supcon_backward_host
    fn(zn.data_ptr(), supcon_op.dtype_code(zn.dtype), m_count, n, d, *zn.stride(), labels32.data_ptr(),
       theta.data_ptr(), logd.data_ptr(), w.data_ptr(), inv_npos.data_ptr(), w_scale.data_ptr(), 1.0 / temperature,
       grad.data_ptr(), *tail, row_start, row_count)
    return grad


def _reference_grad_f64(zn, labels, g):
    ref_z = zn.double().clone().requires_grad_(True)
    ref = torch.stack([_reference_single_f64(ref_z[m], labels) for m in range(zn.shape[0])])
    return torch.autograd.grad((ref * g.double()).sum(), ref_z)[0]


def _per_row_f64(zn, labels, g, temperature=0.07, hard_ratio=0.3):
    """theta, logd [M, N], w [M, N], 1/|P| [N], class ids [N] (int32) written out densely in float64, the
    same definitions as _reference_single_f64 (theta: midpoint of t_i and the next lower negative)."""
    zd = zn.double()
    n = zd.shape[1]
    same = labels[:, None] == labels[None, :]
    pos = same & ~torch.eye(n, dtype=torch.bool)
    k = reference_ops.hard_negative_counts(labels, hard_ratio)
    sim = zd @ zd.transpose(1, 2)                                          # [M, N, N]
    neg = sim.masked_fill(same, float("-inf")).sort(dim=2, descending=True).values
    t = neg.gather(2, (k - 1).clamp(min=0)[None, :, None].expand(zd.shape[0], n, 1))[..., 0]
    below = neg.gather(2, k.clamp(max=n - 1)[None, :, None].expand(zd.shape[0], n, 1))[..., 0]
    below = torch.where((k < (~same).sum(dim=1))[None], below, torch.full_like(below, float("-inf")))
    theta = torch.where(below == float("-inf"), below, 0.5 * (t + below))
    theta = torch.where((k > 0)[None], theta, torch.full_like(theta, float("inf")))
    den = pos[None] | (~same[None] & (sim >= t[..., None]))
    logd = torch.logsumexp((sim / temperature).masked_fill(~den, float("-inf")), dim=2)
    npos = pos.sum(dim=1)
    has = npos > 0
    w = torch.where(has[None], (g.double() / has.sum())[:, None], 0.0)
    inv_npos = torch.where(has, 1.0 / npos.clamp(min=1), 0.0)
    ids = torch.unique(labels, return_inverse=True)[1].to(torch.int32)
    return theta.float(), torch.where(has[None], logd, 0.0).float(), w.float(), inv_npos.float(), ids


def _ignored_problem(m_count=2, n=70, d=12, dtype=torch.float64, seed=3):
    """A problem with ignored rows (label -1, w = 0, NaN per-row values) and its kept subset."""
    gen = torch.Generator().manual_seed(seed)
    zn = F.normalize(torch.randn(m_count, n, d, generator=gen, dtype=torch.float64), dim=-1).to(dtype)
    labels = torch.randint(0, 4, (n,), generator=gen)
    keep = torch.rand(n, generator=gen) > 0.3
    g = torch.linspace(1.0, -1.5, m_count)
    theta_k, logd_k, w_k, inv_npos_k, ids_k = _per_row_f64(zn[:, keep], labels[keep], g)
    theta = torch.full((m_count, n), float("nan"))
    logd = theta.clone()
    inv_npos = torch.full((n,), float("nan"))
    w = torch.zeros(m_count, n)
    labels32 = torch.full((n,), -1, dtype=torch.int32)
    theta[:, keep], logd[:, keep], w[:, keep], inv_npos[keep], labels32[keep] = theta_k, logd_k, w_k, inv_npos_k, ids_k
    return zn, labels, keep, g, labels32, theta, logd, w, inv_npos


def _problem(m_count, n, d, dtype, ignored, seed):
    """z' [M, N, D] in dtype, class ids (-1: ignored), per-row values, g."""
    if ignored:
        zn, _, _, _, labels32, theta, logd, w, inv_npos = _ignored_problem(m_count, n, d, dtype, seed=seed)
        return zn, labels32, theta, logd, w, inv_npos
    gen = torch.Generator().manual_seed(seed)
    zn = F.normalize(torch.randn(m_count, n, d, generator=gen), dim=-1).to(dtype)
    labels = torch.randint(0, 7, (n,), generator=gen)
    theta, logd, w, inv_npos, labels32 = _per_row_f64(zn.double(), labels, torch.linspace(1.0, -0.5, m_count))
    return zn, labels32, theta, logd, w, inv_npos


def test_host_backward_ignored_rows_are_dropped():
    """label -1 rows are neither anchors nor candidates: kept rows get the gradient of the problem
    without them (float64 reference autograd), ignored rows get exactly zero."""
    zn, labels, keep, g, labels32, theta, logd, w, inv_npos = _ignored_problem()
    grad = _raw_backward(zn, labels32, theta, logd, w, inv_npos)
    assert torch.equal(grad[:, ~keep], torch.zeros_like(grad[:, ~keep]))
    ref = _reference_grad_f64(zn[:, keep], labels[keep], g)
    assert ((grad[:, keep] - ref).norm() / ref.norm()).item() < 1e-6
    # bit-identical to calling with the ignored rows removed (same column order, zeros skipped)
    dropped = _raw_backward(zn[:, keep].contiguous(), labels32[keep], theta[:, keep], logd[:, keep], w[:, keep],
                            inv_npos[keep])
    assert torch.equal(grad[:, keep], dropped)


@pytest.mark.parametrize("row_start,row_count", [(0, -1), (0, 40), (7, 30), (33, 7), (12, -1), (40, 0), (39, 1)])
def test_host_backward_row_range(row_start, row_count):
    """Rows [row_start, row_start + row_count) against all columns: the same rows of the full gradient."""
    gen = torch.Generator().manual_seed(4)
    zn = F.normalize(torch.randn(3, 40, 12, generator=gen, dtype=torch.float64), dim=-1)
    labels = torch.randint(0, 4, (40,), generator=gen)
    g = torch.tensor([1.0, -2.0, 0.5])
    theta, logd, w, inv_npos, labels32 = _per_row_f64(zn, labels, g)
    full = _raw_backward(zn, labels32, theta, logd, w, inv_npos)
    part = _raw_backward(zn, labels32, theta, logd, w, inv_npos, row_start=row_start, row_count=row_count)
    stop = 40 if row_count < 0 else row_start + row_count
    assert part.shape == (3, stop - row_start, 12)
    assert torch.equal(part, full[:, row_start:stop])
    ref = _reference_grad_f64(zn, labels, g)[:, row_start:stop]
    if ref.numel():
        assert ((part - ref).norm() / ref.norm()).item() < 1e-6


def test_host_backward_row_range_with_ignored_rows_and_strides():
    zn, labels, keep, g, labels32, theta, logd, w, inv_npos = _ignored_problem(n=90, dtype=torch.float32)
    strided = torch.stack([zn, torch.zeros_like(zn)], dim=-1)[..., 0]  # [M, N, D], element stride 2
    full = _raw_backward(zn, labels32, theta, logd, w, inv_npos)
    part = _raw_backward(strided, labels32, theta, logd, w, inv_npos, row_start=21, row_count=50)
    assert torch.equal(part, full[:, 21:71])


@pytest.mark.parametrize("row_start,row_count", [(-1, 3), (5, 100), (41, -1), (0, 41)])
def test_host_backward_rejects_bad_row_range(row_start, row_count):
    zn = F.normalize(torch.randn(1, 40, 4), dim=-1)
    labels = torch.randint(0, 3, (40,))
    theta, logd, w, inv_npos, labels32 = _per_row_f64(zn, labels, torch.ones(1))
    with pytest.raises(ValueError, match="row range"):
        _raw_backward(zn, labels32, theta, logd, w, inv_npos, row_start=row_start,
                      row_count=row_count)


@pytest.mark.parametrize("threads", [1, 2, 5])
def test_host_backward_is_deterministic_across_thread_counts(threads):
    zn = F.normalize(torch.randn(2, 150, 24), dim=-1)
    labels = torch.randint(0, 5, (150,))
    g, theta, logd, npos = _args(zn, labels)
    one = supcon_op.host_backward(g, zn, labels, theta, logd, npos, 0.07, num_threads=1)
    many = supcon_op.host_backward(g, zn, labels, theta, logd, npos, 0.07, num_threads=threads)
    assert torch.equal(one, many)


def test_host_backward_honours_strides():
    base = F.normalize(torch.randn(70, 2, 16), dim=-1)
    strided = base[:, 1][None]                       # [1, 70, 16], row stride 32
    labels = torch.randint(0, 3, (70,))
    g, theta, logd, npos = _args(strided, labels)
    a = supcon_op.host_backward(g, strided, labels, theta, logd, npos, 0.07)
    b = supcon_op.host_backward(g, strided.contiguous(), labels, theta, logd, npos, 0.07)
    assert torch.equal(a, b)


def test_host_backward_zero_upstream_gradient():
    zn = F.normalize(torch.randn(2, 30, 8), dim=-1)
    labels = torch.randint(0, 3, (30,))
    _, theta, logd, npos = _args(zn, labels)
    grad = supcon_op.host_backward(torch.zeros(2), zn, labels, theta, logd, npos, 0.07)
    assert torch.equal(grad, torch.zeros_like(grad))


def test_host_backward_rejects_16bit_dtype_code():
    z = torch.zeros(1, 4, 4, dtype=torch.float16)
    out = torch.zeros(1, 4, 4)
    with pytest.raises(ValueError, match="float32 or float64"):
        _C.supcon_backward_host(z.data_ptr(), supcon_op.dtype_code(torch.float16), 1, 4, 4, 16, 4, 1,
                                0, 0, 0, 0, 0, 0, 1.0, out.data_ptr(), 1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")
def test_cuda_entry_point_fails_cleanly_without_a_gpu():
    with pytest.raises(RuntimeError, match="supcon_backward_cuda"):
        _C.supcon_backward_cuda(0, 0, 1, 64, 16, 1024, 16, 1, 0, 0, 0, 0, 0, 0, 1.0, 0, 0)


def test_layout_helpers_of_the_cuda_kernels():
    """Tile schedule, copy maps and mma / ldmatrix fragment layouts (csrc/supcon_math.h), checked on the host."""
    assert _C.supcon_layout_check() == []


# (M, N, D, layout, row_start, row_count, ignored): layout "contiguous" takes the cp.async kernels,
# "strided" (element stride 2 along D) the scalar-load ones; D > 128 streams Z_I chunk by chunk
GPU_CASES = [
    (3, 333, 200, "contiguous", 0, -1, False),    # D in two chunks (128 + 72), N tail
    (2, 256, 128, "contiguous", 0, -1, False),    # the benchmark shape: resident Z_I, full tiles
    (1, 190, 72, "contiguous", 0, -1, False),     # D not a multiple of 64, one partial chunk
    (2, 100, 1024, "contiguous", 0, -1, False),   # eight D-chunks
    (2, 300, 128, "contiguous", 37, 150, False),  # anchor-row range: block rows not aligned to tiles
    (2, 210, 96, "contiguous", 0, -1, True),      # ignored rows (label -1, w 0, NaN per-row values)
    (2, 210, 136, "contiguous", 70, 64, True),    # row range + ignored rows, D = 128 + 8
    (2, 150, 40, "strided", 0, -1, False),        # scalar-load fallback
    (1, 77, 13, "contiguous", 5, 60, True),       # D not a multiple of 8: fallback, everything at once
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: "M{}-N{}-D{}-{}-rows{}+{}{}".format(*c[:6], "-ign" * c[6]))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_backward_matches_host(dtype, case):
    m_count, n, d, layout, row_start, row_count, ignored = case
    zn, labels32, theta, logd, w, inv_npos = _problem(m_count, n, d, dtype, ignored, seed=n + d)
    zdev = zn.cuda()
    if layout == "strided":
        zdev = torch.stack([zdev, torch.zeros_like(zdev)], dim=-1)[..., 0]
    host = _raw_backward(zn.float(), labels32, theta, logd, w, inv_npos, row_start=row_start, row_count=row_count)
    dev = _raw_backward(zdev, labels32, theta, logd, w, inv_npos, row_start=row_start, row_count=row_count,
                        device=True).cpu()
    assert dev.shape == host.shape and torch.isfinite(dev).all()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert ((dev - host).norm() / host.norm()).item() < tol
    if ignored:
        rows = slice(row_start, row_start + host.shape[1])
        assert torch.equal(dev[:, (labels32[rows] < 0)], torch.zeros_like(dev[:, (labels32[rows] < 0)]))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_backward_zero_upstream_gradient_and_op(dtype):
    """w_scale 0 writes zeros; the custom op path agrees with the host op."""
    zn = F.normalize(torch.randn(2, 200, 128), dim=-1).to(dtype)
    labels = torch.randint(0, 5, (200,))
    g = torch.tensor([0.0, 1.5])
    theta, logd, w, inv_npos, labels32 = _per_row_f64(zn.double(), labels, g)
    dev = _raw_backward(zn, labels32, theta, logd, w, inv_npos, device=True).cpu()
    host = _raw_backward(zn.float(), labels32, theta, logd, w, inv_npos)
    assert torch.equal(dev[0], torch.zeros_like(dev[0]))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert ((dev - host).norm() / host.norm()).item() < tol


NVCC = os.environ.get("CUDACXX") or shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"


CXX = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


@pytest.fixture(scope="module")
def kernel_sim(tmp_path_factory):
    """csrc/sim/supcon_sim.cpp built with the host compiler: the CUDA kernel bodies run on the CPU."""
    if CXX is None:
        pytest.skip("no C++ compiler")
    lib = tmp_path_factory.mktemp("sim") / "libsupcon_sim.so"
    cmd = [CXX, "-std=c++20", "-O2", "-pthread", "-shared", "-fPIC", "-Wall", "-Wno-unknown-pragmas",
           "-I", str(ROOT / "csrc"), str(ROOT / "csrc" / "sim" / "supcon_sim.cpp"), "-o", str(lib)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if out.returncode != 0 and re.search(r"<barrier>|_Float16|c\+\+20", out.stderr):
        pytest.skip("the host compiler lacks C++20 <barrier> or _Float16: " + out.stderr[-300:])
    assert out.returncode == 0, out.stderr[-3000:]
    fn = ctypes.CDLL(str(lib)).supcon_sim_backward
    u, ll, i32 = ctypes.c_size_t, ctypes.c_longlong, ctypes.c_int
    fn.argtypes = [u, i32, ll, ll, ll, ll, ll, ll, u, u, u, u, u, u, ctypes.c_double, u, ll, ll, i32]
    fn.restype = i32
    return fn


def _sim_backward(fn, zn, labels32, theta, logd, w, inv_npos, row_start=0, row_count=-1, land_at_wait=False,
                  temperature=0.07):
    """supcon_backward_cuda's kernels simulated on the CPU (same arguments, host pointers)."""
    m_count, n, d = zn.shape
    rows = max(0, n - row_start if row_count < 0 else row_count)
    ts = [t.contiguous() for t in (labels32, theta.float(), logd.float(), w.float(), inv_npos.float(),
                                    w.float().abs().amax(dim=1))]
    grad = torch.full((m_count, rows, d), float("nan"))
    rc = fn(zn.data_ptr(), supcon_op.dtype_code(zn.dtype), m_count, n, d, *zn.stride(), *[t.data_ptr() for t in ts],
            1.0 / temperature, grad.data_ptr(), row_start, row_count, int(land_at_wait))
    assert rc == 0
    return grad


# (M, N, D, layout, row_start, row_count, ignored) for the simulation: smaller than GPU_CASES, same paths
SIM_CASES = [
    (2, 150, 200, "contiguous", 0, -1, False),    # two D-chunks (Z_I streamed), N tail
    (1, 130, 128, "contiguous", 37, 70, False),   # resident Z_I, row range across block and tile edges
    (2, 100, 96, "contiguous", 0, -1, True),      # ignored rows with NaN per-row values
    (1, 70, 520, "contiguous", 0, -1, True),      # five D-chunks, a partial last one
    (1, 90, 40, "strided", 0, -1, False),         # scalar-load kernels
    (1, 77, 13, "contiguous", 5, 60, True),       # D not a multiple of 8: scalar kernels
]
SIM_TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 5e-3}


@pytest.mark.slow
@pytest.mark.parametrize("case", SIM_CASES, ids=lambda c: "M{}-N{}-D{}-{}-rows{}+{}{}".format(*c[:6], "-ign" * c[6]))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_simulated_cuda_kernels_match_host(kernel_sim, dtype, case):
    """The CUDA kernel bodies, run by the CPU simulation with cp.async landing at issue and at the wait,
    agree with the host backward; ignored anchors get exact zeros."""
    m_count, n, d, layout, row_start, row_count, ignored = case
    zn, labels32, theta, logd, w, inv_npos = _problem(m_count, n, d, dtype, ignored, seed=n + d)
    zk = torch.stack([zn, torch.zeros_like(zn)], dim=-1)[..., 0] if layout == "strided" else zn
    host = _raw_backward(zn.float(), labels32, theta, logd, w, inv_npos, row_start=row_start, row_count=row_count)
    for land_at_wait in (False, True):
        sim = _sim_backward(kernel_sim, zk, labels32, theta, logd, w, inv_npos, row_start, row_count, land_at_wait)
        assert torch.isfinite(sim).all()
        assert ((sim - host).norm() / host.norm()).item() < SIM_TOL[dtype], land_at_wait
        dead = labels32[row_start:row_start + host.shape[1]] < 0
        assert torch.equal(sim[:, dead], torch.zeros_like(sim[:, dead]))


@pytest.mark.slow
def test_simulated_cuda_entry_checks_and_zero_gradient(kernel_sim):
    zn, labels32, theta, logd, w, inv_npos = _problem(2, 70, 64, torch.bfloat16, False, seed=5)
    w[0] = 0.0                                                            # modality 0: w_scale 0
    sim = _sim_backward(kernel_sim, zn, labels32, theta, logd, w, inv_npos)
    host = _raw_backward(zn.float(), labels32, theta, logd, w, inv_npos)
    assert torch.equal(sim[0], torch.zeros_like(sim[0]))
    assert ((sim - host).norm() / host.norm()).item() < SIM_TOL[torch.bfloat16]
    with pytest.raises(AssertionError):                                   # bad row range: rc 1
        _sim_backward(kernel_sim, zn, labels32, theta, logd, w, inv_npos, row_start=60, row_count=20)


SUPCON_CU = ["supcon_cuda.cu", "supcon_mma.cu", "supcon_simt.cu"]
KERNEL_NAME = re.compile(r"\d+(supcon_backward_(?:f32|f16|bf16)_(?:cpasync|scalar))")


def _cuobjdump():
    """cuobjdump from the CUDA toolkit, PATH or Triton's bundled copy; None when there is none."""
    candidates = [Path(NVCC).parent / "cuobjdump", shutil.which("cuobjdump")]
    try:
        import triton
        candidates.append(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    except ImportError:
        pass
    return next((str(c) for c in candidates if c and Path(c).exists()), None)


@pytest.mark.slow
@pytest.mark.skipif(not Path(NVCC).exists(), reason="no nvcc")
def test_nvcc_compiles_supcon_kernels_without_register_spills(tmp_path):
    """DESIGN.md §6: nvcc -Xptxas -v for sm_80 and sm_90, no spills in any backward kernel; the 16-bit
    cp.async kernels stage z with 16-byte LDGSTS and contain no scalar 16-bit global load."""
    log, objects = "", []
    for src in SUPCON_CU:
        obj = tmp_path / (src + ".o")
        cmd = [NVCC, "-c", str(ROOT / "csrc" / src), "-o", str(obj), "-O3", "-std=c++17", "-I", str(ROOT / "csrc"),
               "-DMCNCL_WITH_CUDA=1", "-Xptxas=-v", "-gencode=arch=compute_80,code=sm_80",
               "-gencode=arch=compute_90,code=sm_90"]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        log += out.stderr + out.stdout
        objects.append(obj)
    # ptxas prints, per entry function, "Compiling entry function" then its spill line
    chunks = log.split("Compiling entry function")[1:]
    compiled = {}
    for chunk in chunks:
        name, arch = KERNEL_NAME.search(chunk).group(1), re.search(r"for '(sm_\d+)'", chunk).group(1)
        spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", chunk)
        compiled[(name, arch)] = spill.groups() if spill else None
    assert len(compiled) == 12, sorted(compiled)       # f32/f16/bf16 x cp.async/scalar x sm_80/sm_90
    assert all(s == ("0", "0") for s in compiled.values()), compiled

    cuobjdump = _cuobjdump()
    if cuobjdump is None:
        return
    sass = subprocess.run([cuobjdump, "-sass", str(objects[1])], capture_output=True, text=True, timeout=300).stdout
    functions = {}
    for block in sass.split("Function : ")[1:]:
        functions.setdefault(KERNEL_NAME.search(block.splitlines()[0]).group(1), []).append(block)
    for name in ("supcon_backward_f16_cpasync", "supcon_backward_bf16_cpasync"):
        assert len(functions[name]) == 2                  # sm_80 and sm_90
        for body in functions[name]:
            assert not re.search(r"\bLDG\.E\.(U16|S16)\b", body), name   # no scalar 16-bit global loads
            assert "LDGSTS.E.BYPASS.128" in body and "HMMA.16816.F32" in body and "LDSM.16.MT88.4" in body, name
