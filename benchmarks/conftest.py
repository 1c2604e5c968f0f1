"""Shared fixtures for the pytest-benchmark suites.

`pytest benchmarks/` on a CPU machine runs small shapes (the CPU paths: the
reference ops, the chunked SupCon forward and the host backward); GPU-only
shapes skip. On a GPU the same files time the Triton/CUDA paths. Compare
ratios only inside one run: `--benchmark-group-by=group`.
"""
import os

import pytest
import torch

CUDA = torch.cuda.is_available()
os.environ.pop("TRITON_INTERPRET", None)   # interpreter timings mean nothing
if not CUDA:
    # one thread: on a loaded 2-core machine two threads make CPU timings vary by 5-50x
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def device():
    return torch.device("cuda" if CUDA else "cpu")


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak memory of the timed function beyond what was allocated before it (CUDA only; else None)."""

    def __init__(self, device):
        self.device = device

    def measure(self, fn, *args, **kwargs):
        if self.device.type != "cuda":
            fn(*args, **kwargs)
            return None
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        fn(*args, **kwargs)
        torch.cuda.synchronize(self.device)
        return (torch.cuda.max_memory_allocated(self.device) - before) / 2**20


@pytest.fixture
def run_benchmark(benchmark, device):
    """benchmark.pedantic around `fn` with device sync, warm-up, and the peak memory in extra_info."""
    def run(fn, *args, rounds=5, warmup_rounds=1, **kwargs):
        def timed():
            out = fn(*args, **kwargs)
            synchronize(device)
            return out
        peak = PeakMemory(device).measure(timed)
        benchmark.extra_info["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        if peak is not None:
            benchmark.extra_info["peak_mem_mib"] = round(peak, 2)
        return benchmark.pedantic(timed, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)
    return run


def gpu_only(reason="GPU-only shape"):
    return pytest.mark.skipif(not CUDA, reason=reason)
