"""PSA forward + backward: reference eager vs torch.compile(reference) vs fast psa / psa_pool.

GPU shapes: MELD-like N = B*S = 2048 utterances x L in {8, 32} frames x C = 256, and N = 16384, L = 32.
Targets on a GPU: fast >= 3x eager, >= 1.5x compiled. On CPU one small shape runs (the fast ops take
the reference path there, so CPU numbers only show the harness works); compiled variants are GPU-only
(inductor compiles take tens of seconds on 2 CPU cores).
Groups: psa-<dtype>-N..-L.. (full output, backward from a random output gradient) and
psa_pool-<dtype>-N..-L.. (pooled [N, C], what the model uses).
"""
import pytest
import torch

from mcncl_fast import ops
from mcncl_fast.reference import ops as reference_ops
from mcncl_fast.reference.model import PSA

from .conftest import CUDA

C = 256
GPU_SHAPES = [(2048, 8), (2048, 32), (16384, 32)]
SHAPES = GPU_SHAPES if CUDA else [(64, 8)]
DTYPES = [torch.float32, torch.bfloat16] if CUDA else [torch.float32]
IMPLS = ["reference", "reference-compiled", "fast"]


def make_case(n, length, dtype, device, pooled):
    torch.manual_seed(0)
    module = PSA(C).to(device=device, dtype=dtype)
    x = torch.randn(n, length, C, device=device, dtype=dtype, requires_grad=True)
    lengths = torch.randint(1, length + 1, (n,), device=device)
    mask = torch.arange(length, device=device)[None, :] < lengths[:, None]
    out_shape = (n, C) if pooled else (n, length, C)
    grad = torch.randn(out_shape, device=device, dtype=dtype)
    return module, x, mask, grad


def make_step(impl, module, x, mask, grad, pooled):
    name = "psa_pool" if pooled else "psa"
    ref_fn = getattr(reference_ops, name)
    fast_fn = getattr(ops, name)

    def ref(frames, frame_mask):
        return ref_fn(frames, *module.op_args(), frame_mask=frame_mask)

    def fast(frames, frame_mask):
        return fast_fn(frames, *module.op_args(), frame_mask=frame_mask)

    fn = {"reference": ref, "reference-compiled": torch.compile(ref), "fast": fast}[impl]
    params = [x] + list(module.parameters())

    def step():
        out = fn(x, mask)
        return torch.autograd.grad(out, params, grad)
    return step


@pytest.mark.parametrize("pooled", [False, True], ids=["psa", "psa_pool"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("n,length", SHAPES, ids=[f"N{n}-L{l}" for n, l in SHAPES])
def test_psa_forward_backward(n, length, dtype, impl, pooled, run_benchmark, benchmark, device):
    if impl == "reference-compiled" and not CUDA:
        pytest.skip("inductor compile on 2 CPU cores takes tens of seconds")
    op = "psa_pool" if pooled else "psa"
    benchmark.group = f"{op}-{str(dtype).replace('torch.', '')}-N{n}-L{length}-C{C}"
    module, x, mask, grad = make_case(n, length, dtype, device, pooled)
    step = make_step(impl, module, x, mask, grad, pooled)
    step()                                            # compile / autotune outside the timing
    run_benchmark(step, rounds=20 if CUDA else 3, warmup_rounds=2 if CUDA else 1)
