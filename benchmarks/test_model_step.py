"""One training step (forward + backward + AdamW) of the whole model: reference vs fast; and the
device operations of a step per stage (benchmarks/model_ops.py), which on a CPU-only machine stand in
for the GPU timing of a launch-bound step."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mcncl_fast
from mcncl_fast import reference

from .conftest import CUDA

# MELD-like batch on GPU (16 dialogues x 24 utterances x 8 frames); a small one on CPU
SHAPE = dict(b=16, s=24, frames=8) if CUDA else dict(b=4, s=12, frames=4)


def make_step(model_cls, device, compile_model=False):
    torch.manual_seed(0)
    cfg = mcncl_fast.ModelConfig()
    model = model_cls(cfg).to(device)
    if compile_model:
        model = torch.compile(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    b, s, frames = SHAPE["b"], SHAPE["s"], SHAPE["frames"]
    batch = dict(text=torch.randn(b, s, cfg.text_dim, device=device),
                 audio=torch.randn(b, s, cfg.audio_dim, device=device),
                 visual=torch.randn(b, s, frames, cfg.visual_dim, device=device),
                 utterance_mask=torch.rand(b, s, device=device) > 0.2,
                 frame_mask=torch.rand(b, s, frames, device=device) > 0.2,
                 labels=torch.randint(0, cfg.num_classes, (b, s), device=device))

    def step():
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss
    return step


@pytest.mark.benchmark(group="model-train-step")
@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_train_step(impl, run_benchmark, device):
    cls = reference.Model if impl == "reference" else mcncl_fast.Model
    run_benchmark(make_step(cls, device), rounds=5 if CUDA else 3)


@pytest.mark.benchmark(group="model-train-step")
@pytest.mark.skipif(not CUDA, reason="inductor compile of the whole model takes minutes on 2 CPU cores")
def test_train_step_compiled_reference(run_benchmark, device):
    run_benchmark(make_step(reference.Model, device, compile_model=True), rounds=5, warmup_rounds=2)


def test_device_operations_per_stage():
    """Prints the table (run with -s): ops per stage, reference vs fast. The Triton kernels must run to
    be counted, through the interpreter; conftest.py unsets TRITON_INTERPRET for the timings, so the
    count runs in a subprocess with it set."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-m", "benchmarks.model_ops"], cwd=Path(__file__).resolve().parents[1],
                            env=env, capture_output=True, text=True, timeout=600)
    print(result.stdout)
    assert result.returncode == 0, result.stderr[-4000:]
