"""Test setup. TRITON_INTERPRET must be set before any @triton.jit module is imported.

Without a GPU every Triton kernel runs through the interpreter on CPU tensors
(DESIGN.md §6). On a GPU machine `pytest -m gpu` runs the same parity tests
on CUDA; set MCNCL_TEST_INTERPRET=1 there to also run the interpreter tests.
"""
import os

import pytest

_HAS_CUDA_DRIVER = os.path.exists("/dev/nvidiactl") or os.path.exists("/proc/driver/nvidia")
if not _HAS_CUDA_DRIVER or os.environ.get("MCNCL_TEST_INTERPRET") == "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

# Property tests draw the same examples on every run and machine: a red CI run is reproducible,
# a green one does not depend on the draw.
settings.register_profile("deterministic", derandomize=True, deadline=None, print_blob=True)
settings.load_profile("deterministic")

import tests.aot  # noqa: E402,F401  (snapshots triton.language before any kernel is interpreted)

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run `pytest -m gpu` on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def use_path(monkeypatch):
    """use_path(path, device) selects a SupCon path: "cpu" = chunked forward + host backward (plain
    CPU), "triton" = the Triton forward (through the interpreter on CPU tensors)."""
    def select(path, device):
        monkeypatch.delenv("MCNCL_FAST_BACKEND", raising=False)
        if path == "cpu":
            assert device == "cpu"
            monkeypatch.setenv("TRITON_INTERPRET", "0")   # plain CPU: chunked forward + host backward
        elif device == "cpu":
            monkeypatch.setenv("TRITON_INTERPRET", "1")
    return select
