"""Hard-negative SupCon loss, forward + backward, M = 3 modalities, D = 128.

Implementations: reference eager, torch.compile(reference), fast (Triton forward + CUDA backward on a
GPU; chunked PyTorch forward + host C++ backward on CPU). Peak extra memory beside each time (CUDA:
max_memory_allocated beyond the inputs; CPU: not measured here, see tests/test_supcon_memory.py).
GPU: N in {8192, 32768} for all three, and 131072, 262144, 1048576 for fast only (the reference's
N x N matrices do not fit). Targets (GPU, bf16): fast >= 10x eager at N = 32768, >= 3x compiled, peak
extra memory <= 1/50 of the reference's, N = 262144 in under 1 s, N = 1048576 completes. The fast op
gets num_classes (no host sync), as the model passes it.
CPU: N = 512 only (reference vs fast; the compiled reference is GPU-only: inductor compiles take tens
of seconds on 2 CPU cores).
"""
import pytest
import torch

from mcncl_fast import ops
from mcncl_fast.reference import ops as reference_ops

from .conftest import CUDA

M, D = 3, 128
if CUDA:
    SHAPES = [8192, 32768, 131072, 262144, 1048576]
    DTYPES = [torch.bfloat16, torch.float32]
else:
    SHAPES = [512]
    DTYPES = [torch.float32]
IMPLS = ["reference", "reference-compiled", "fast"]
FAST_ONLY = 32768          # above this, only the fast path runs


def make_step(impl, n, dtype, device):
    torch.manual_seed(0)
    z = torch.randn(M, n, D, device=device, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, 7, (n,), device=device)
    fn = {"reference": reference_ops.supcon_hard_negative_loss,
          "reference-compiled": torch.compile(reference_ops.supcon_hard_negative_loss),
          "fast": lambda z, y: ops.supcon_hard_negative_loss(z, y, num_classes=7)}[impl]

    def step():
        loss = fn(z, labels)
        return torch.autograd.grad(loss.sum(), z)
    return step


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("n", SHAPES, ids=[f"N{n}" for n in SHAPES])
def test_supcon_forward_backward(n, dtype, impl, run_benchmark, benchmark, device):
    if impl == "reference-compiled" and not CUDA:
        pytest.skip("inductor compile on 2 CPU cores takes tens of seconds")
    if impl != "fast" and n > FAST_ONLY:
        pytest.skip("the reference's N x N matrices do not fit at this N")
    benchmark.group = f"supcon-{str(dtype).replace('torch.', '')}-M{M}-N{n}-D{D}"
    step = make_step(impl, n, dtype, device)
    try:
        step()                                        # compile / autotune outside the timing
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        pytest.skip(f"{impl} runs out of GPU memory at N={n}")
    big = n >= 32768
    run_benchmark(step, rounds=(1 if n > 262144 else 3 if big else 10) if CUDA else 3,
                  warmup_rounds=0 if n > 262144 else 1)
