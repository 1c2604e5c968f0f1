"""mcncl_fast._C SupCon backward (csrc/supcon_*): host gradient, pointer API, nvcc build checks (issue #4)."""
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
        k, npos = supcon_op._label_stats(labels, hard_ratio)
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
    k, npos = supcon_op._label_stats(labels, 0.3)
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
    k, npos = supcon_op._label_stats(labels, hard_ratio)
    theta, logd, _ = supcon_op.chunked_forward(zn.float(), labels, k, temperature)
    g = torch.ones(zn.shape[0]) if g is None else g
    return g, theta, logd, npos.float()


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
        _C.supcon_backward_host(z.data_ptr(), supcon_op.DTYPE_CODE[torch.float16], 1, 4, 4, 16, 4, 1,
                                0, 0, 0, 0, 0, 0, 1.0, out.data_ptr(), 1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")
def test_cuda_entry_point_fails_cleanly_without_a_gpu():
    with pytest.raises(RuntimeError, match="supcon_backward_cuda"):
        _C.supcon_backward_cuda(0, 0, 1, 64, 16, 1024, 16, 1, 0, 0, 0, 0, 0, 0, 1.0, 0, 0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_backward_matches_host(dtype):
    zn = F.normalize(torch.randn(3, 333, 200), dim=-1).to(dtype)
    labels = torch.randint(0, 7, (333,))
    g = torch.tensor([1.0, -0.5, 2.0])
    _, theta, logd, npos = _args(zn.float(), labels, g=g)
    host = supcon_op.host_backward(g, zn.float(), labels, theta, logd, npos, 0.07)
    dev = supcon_op.supcon_backward(g.cuda(), zn.cuda(), labels.cuda(), theta.cuda(), logd.cuda(), npos.cuda(), 0.07)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert ((dev.float().cpu() - host).norm() / host.norm()).item() < tol


NVCC = os.environ.get("CUDACXX") or shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"


@pytest.mark.slow
@pytest.mark.skipif(not Path(NVCC).exists(), reason="no nvcc")
def test_nvcc_compiles_supcon_kernels_without_register_spills(tmp_path):
    """DESIGN.md §6: nvcc -Xptxas -v for sm_80 and sm_90, no spills in the backward kernels."""
    cmd = [NVCC, "-c", str(ROOT / "csrc" / "supcon_cuda.cu"), "-o", str(tmp_path / "supcon.o"), "-O3",
           "-std=c++17", "-I", str(ROOT / "csrc"), "-DMCNCL_WITH_CUDA=1", "-Xptxas=-v",
           "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    log = out.stderr + out.stdout
    kernels = re.findall(r"Compiling entry function '(\w*supcon_backward\w*)' for '(sm_\d+)'", log)
    assert len(kernels) == 6, log[-3000:]          # fp32, fp16, bf16 x sm_80, sm_90
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    assert spills and all(s == ("0", "0") for s in spills), log[-3000:]
