"""The reference and the fast Model side by side on the CPU: one process, same weights, same batch, interleaved.

    python -m benchmarks.cpu_step_compare [--steps 7] [--threads 2] [--profile CASE] [--cases default,...]

Cases (fp32, CPU):
  default          ModelConfig() at the synthetic data's dims, batch 16 of `synthetic_splits` (the default run's
                   step: forward, loss, backward, clipping at 1.0, fused AdamW lr 5e-4 wd 1e-4; mcncl_fast.step)
  model-train-step the shapes of benchmarks/test_model_step.py on a CPU (ModelConfig(), make_batch b=4 s=12 frames=4)
  mcn-layer        the shapes of benchmarks/test_attention.py::test_mcn_layer on a CPU (one layer, B=4, S=16,
                   forward + backward of `fuse` w.r.t. the layer's parameters and the inputs)
The fast model loads the reference's state_dict. Steps run ref, fast, ref, fast, ... after a warm-up; the median of
each is printed with the ratio reference/fast (> 1: the fast model is faster). --profile prints torch.profiler's
top rows (self CPU time) of both models' steps for one case.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import mcncl_fast
from mcncl_fast import reference
from mcncl_fast.data import collate_dialogues, synthetic_splits
from mcncl_fast.step import TrainStep, make_optimizer

from .model_ops import make_batch


def _train_step(model_cls, cfg, state, batch):
    model = model_cls(cfg)
    model.load_state_dict(state)
    model.train()
    optimizer = make_optimizer(model, 5e-4, 1e-4)
    step = TrainStep(lambda b: model(**b).loss, model, optimizer, grad_clip=1.0)
    return lambda: step(batch)


def _layer_step(model_cls, cfg, state, inputs):
    model = model_cls(cfg)
    model.load_state_dict(state)
    unimodal, mask, grads = inputs
    params = list(model.layers.parameters()) + list(unimodal.values())

    def step():
        fused = model.fuse(unimodal, mask)
        return torch.autograd.grad([fused[m] for m in "tav"], params, grads)
    return step


def make_case(name):
    """-> (reference step, fast step): zero-argument callables."""
    torch.manual_seed(0)
    if name == "default":
        splits = synthetic_splits(seed=0)
        cfg = mcncl_fast.ModelConfig(**splits.model_dims())
        batch = collate_dialogues([splits.train[i] for i in range(16)])
        build = _train_step
    elif name == "model-train-step":
        cfg = mcncl_fast.ModelConfig()
        batch = make_batch(cfg, b=4, s=12, frames=4)
        build = _train_step
    elif name == "mcn-layer":
        cfg = mcncl_fast.ModelConfig(num_layers=1, dropout=0.0)
        b, length, d = 4, 16, cfg.d_model
        unimodal = {m: torch.randn(b, length, d, requires_grad=True) for m in "tav"}
        lengths = torch.randint(1, length + 1, (b,))
        mask = torch.arange(length)[None, :] < lengths[:, None]
        batch = (unimodal, mask, [torch.randn(b, length, d) for _ in range(3)])
        build = _layer_step
    else:
        raise ValueError(f"case: expected default, model-train-step or mcn-layer, got {name!r}")
    state = reference.Model(cfg).state_dict()
    return build(reference.Model, cfg, state, batch), build(mcncl_fast.Model, cfg, state, batch)


def _timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def compare(name, steps):
    ref, fast = make_case(name)
    for _ in range(2):                       # warm-up: allocator, optimizer state, first-call paths
        ref(), fast()
    times = {"reference": [], "fast": []}
    for _ in range(steps):
        times["reference"].append(_timed(ref))
        times["fast"].append(_timed(fast))
    med = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    spread = {k: f"{1e3 * min(v):.1f}-{1e3 * max(v):.1f}" for k, v in times.items()}
    print(f"{name:18s} reference {med['reference']:8.1f} ms ({spread['reference']})  fast {med['fast']:8.1f} ms "
          f"({spread['fast']})  reference/fast {med['reference'] / med['fast']:.2f}x", flush=True)
    return med


def profile(name, rows=25):
    from torch.profiler import ProfilerActivity, profile as torch_profile
    for label, fn in zip(("reference", "fast"), make_case(name)):
        for _ in range(2):
            fn()
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                fn()
        print(f"\n== {name}: {label}, 3 steps, sorted by self CPU time")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=40))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cases", default="default,model-train-step,mcn-layer")
    parser.add_argument("--profile", default=None, help="a case to profile instead of timing")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.profile:
        profile(args.profile)
        return
    for name in args.cases.split(","):
        compare(name, args.steps)


if __name__ == "__main__":
    main()
