"""One training step (forward, backward, clipping, AdamW) of the whole model, five ways:

    reference-eager     mcncl_fast.reference.Model
    reference-compiled  torch.compile(reference.Model)
    fast-eager          mcncl_fast.Model
    fast-compiled       torch.compile(mcncl_fast.Model)
    fast-cuda-graphs    mcncl_fast.Model, the whole step replayed as a CUDA graph (mcncl_fast.step)

at MELD scale on a GPU (16 dialogues x 24 utterances x 8 frames, d = 256, 4 layers; fp32 and bf16),
steps/s and peak memory in the benchmark's extra_info. Targets: fast >= 3x reference-eager and >= 1.3x
reference-compiled. On a CPU-only machine the eager variants run a small batch, and
test_device_operations_per_stage prints what each variant issues per step (device operations and
syncs, counted through the Triton interpreter): the launch count a GPU step pays for.

test_train_step_default_config adds the default run's step (ModelConfig defaults with the synthetic data's
dims, the first 16 synthetic dialogues): the row a CPU user meets. Every fast row records
`speedup_vs_reference_eager` (reference-eager mean / its mean, same shape and precision, same run) in
extra_info. Nothing here asserts a speed: compare rows only inside one run.
"""
import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mcncl_fast
from mcncl_fast import reference
from mcncl_fast.step import CudaGraphStep, TrainStep, make_optimizer

from mcncl_fast.data import collate_dialogues, load_dataset

from .conftest import CUDA
from .model_ops import make_batch

# MELD-like batch on GPU; a small one on CPU
SHAPE = dict(b=16, s=24, frames=8) if CUDA else dict(b=4, s=12, frames=4)
VARIANTS = ("reference-eager", "reference-compiled", "fast-eager", "fast-compiled", "fast-cuda-graphs")
CPU_VARIANTS = ("reference-eager", "fast-eager")   # inductor on the whole model takes minutes on 2 cores


# mean seconds per step of each timed row in this run: (row, precision, variant) -> mean
MEANS = {}


@functools.lru_cache(maxsize=1)
def default_run_batch(batch_size=16):
    """(ModelConfig of the default run, its first batch of `batch_size` synthetic dialogues, unshuffled)."""
    splits = load_dataset("synthetic")
    batch = collate_dialogues([splits.train[i] for i in range(batch_size)])
    return mcncl_fast.ModelConfig(**splits.model_dims()), batch


def record_ratio(benchmark, row, variant, precision):
    """Keeps this row's mean; on a fast row, its speed-up over reference-eager timed earlier in the run."""
    stats = getattr(benchmark, "stats", None)
    if stats is None:                       # --benchmark-disable: nothing timed
        return
    MEANS[(row, precision, variant)] = mean = stats.stats.mean
    benchmark.extra_info["steps_per_s"] = round(1.0 / mean, 2)
    reference_mean = MEANS.get((row, precision, "reference-eager"))
    if variant.startswith("fast") and reference_mean is not None:
        benchmark.extra_info["speedup_vs_reference_eager"] = round(reference_mean / mean, 3)


def make_step(variant, device, precision, cfg=None, batch=None):
    torch.manual_seed(0)
    cfg = cfg or mcncl_fast.ModelConfig()
    model = (reference.Model if variant.startswith("reference") else mcncl_fast.Model)(cfg).to(device)
    forward = torch.compile(model, dynamic=False) if variant.endswith("compiled") else model
    graphs = variant.endswith("cuda-graphs")
    optimizer = make_optimizer(model, 1e-4, 1e-4, capturable=graphs)

    def forward_loss(batch):
        with torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16", cache_enabled=not graphs):
            return forward(**batch).loss
    step = TrainStep(forward_loss, model, optimizer, grad_clip=1.0)
    step = CudaGraphStep(step) if graphs else step
    batch = batch if batch is not None else make_batch(cfg, **SHAPE)
    batch = {k: v.to(device) for k, v in batch.items()}
    return lambda: step(batch)


@pytest.mark.benchmark(group="model-train-step")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_train_step(variant, precision, run_benchmark, device, benchmark):
    if not CUDA and (variant not in CPU_VARIANTS or precision == "bf16"):
        pytest.skip("GPU-only variant (see test_device_operations_per_stage for the CPU-side counts)")
    benchmark.group = f"model-train-step-{precision}"
    step = make_step(variant, device, precision)
    # warm-up: autotuning, compilation, the CUDA graph capture (at the second call of its shape)
    run_benchmark(step, rounds=20 if CUDA else 3, warmup_rounds=3 if CUDA else 1)
    record_ratio(benchmark, "meld-shape" if CUDA else "small", variant, precision)


@pytest.mark.benchmark(group="model-train-step-default-config")
@pytest.mark.parametrize("variant", VARIANTS)
def test_train_step_default_config(variant, run_benchmark, device, benchmark):
    """The default `python -m mcncl_fast train` step (fp32, batch 16): on a CPU, what a user without a GPU runs."""
    if not CUDA and variant not in CPU_VARIANTS:
        pytest.skip("GPU-only variant")
    cfg, batch = default_run_batch()
    step = make_step(variant, device, "fp32", cfg, batch)
    run_benchmark(step, rounds=20 if CUDA else 3, warmup_rounds=3 if CUDA else 1)
    record_ratio(benchmark, "default-config", variant, "fp32")


def test_device_operations_per_stage():
    """Prints the table (run with -s): ops per stage and syncs, reference vs fast. The Triton kernels must
    run to be counted, through the interpreter; conftest.py unsets TRITON_INTERPRET for the timings, so
    the count runs in a subprocess with it set."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-m", "benchmarks.model_ops"], cwd=Path(__file__).resolve().parents[1],
                            env=env, capture_output=True, text=True, timeout=600)
    print(result.stdout)
    assert result.returncode == 0, result.stderr[-4000:]
