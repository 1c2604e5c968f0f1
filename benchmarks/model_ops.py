"""Device operations of one training step, per model stage.

    TRITON_INTERPRET=1 python -m benchmarks.model_ops

prints, for the reference and the fast model, the ATen ops + Triton launches each stage issues
(docs/DESIGN.md §6 item 4): what a launch-bound GPU step pays for. The step is the library's own
(mcncl_fast.step.TrainStep: forward, backward, gradient clipping, AdamW), counted at its second call
(the first also creates the optimizer state). The stages are tagged from outside the models, by
wrapping their methods for the duration of the count; nothing in the models counts.
"""
from __future__ import annotations

import contextlib
import os
import sys

import torch

from benchmarks.device_ops import DeviceOps

# a small MELD-like step the interpreter runs in seconds (Dh = 16: the fast attention's smallest)
CONFIG = dict(text_dim=32, audio_dim=16, visual_dim=24, d_model=64, num_layers=2, num_heads=4, proj_dim=16,
              num_classes=5, dropout=0.1)
BATCH = dict(b=3, s=6, frames=4)
STAGES = ("checks", "encoders", "PSA", "MCN", "heads", "loss", "backward", "optimizer")


def make_batch(cfg, b, s, frames, seed=0):
    g = torch.Generator().manual_seed(seed)
    utterance_mask = torch.rand(b, s, generator=g) > 0.2
    utterance_mask[:, 0] = True
    return dict(text=torch.randn(b, s, cfg.text_dim, generator=g), audio=torch.randn(b, s, cfg.audio_dim, generator=g),
                visual=torch.randn(b, s, frames, cfg.visual_dim, generator=g), utterance_mask=utterance_mask,
                frame_mask=torch.rand(b, s, frames, generator=g) > 0.2,
                labels=torch.randint(0, cfg.num_classes, (b, s), generator=g))


@contextlib.contextmanager
def _patched(owner, name, wrap):
    own = name in vars(owner)            # a module's function, or an instance's method found on its class
    original = getattr(owner, name)
    setattr(owner, name, wrap(original))
    try:
        yield
    finally:
        if own:
            setattr(owner, name, original)
        else:
            delattr(owner, name)


@contextlib.contextmanager
def stage_tags(model, recorder: DeviceOps, optimizer=None):
    """Tags every op of a step with its stage. Ops of forward outside the wrapped stages (classifier,
    projection heads, concatenations) count as "heads"; gradient clipping and AdamW as "optimizer"."""
    import mcncl_fast.model as fast_module
    import mcncl_fast.reference.model as reference_module

    def tagged(stage):
        def wrap(fn):
            def run(*args, **kwargs):
                with recorder.component(stage):
                    return fn(*args, **kwargs)
            return run
        return wrap

    with contextlib.ExitStack() as stack:
        stack.enter_context(_patched(model, "forward", tagged("heads")))
        stack.enter_context(_patched(model, "encode", tagged("encoders")))
        stack.enter_context(_patched(model.psa, "pool", tagged("PSA")))
        # the fast model's stacked MCN and the per-step stacking of its per-stream weights count as MCN
        for name in ("fuse", "fuse_stacked", "stacked_parameters"):
            if hasattr(model, name):
                stack.enter_context(_patched(model, name, tagged("MCN")))
        for module in {reference_module, fast_module}:       # called by their global names in forward
            for name, stage in (("check_model_inputs", "checks"), ("mcncl_loss", "loss")):
                if hasattr(module, name):
                    stack.enter_context(_patched(module, name, tagged(stage)))
        stack.enter_context(_patched(torch.Tensor, "backward", tagged("backward")))
        stack.enter_context(_patched(torch.nn.utils, "clip_grad_norm_", tagged("optimizer")))
        if optimizer is not None:
            stack.enter_context(_patched(optimizer, "step", tagged("optimizer")))
        yield


def count_training_step(model_cls, config=None, batch_shape=None, seed=0) -> DeviceOps:
    """DeviceOps of the second TrainStep call (forward, backward, clipping, AdamW), tagged by stage."""
    from mcncl_fast import ModelConfig
    from mcncl_fast.step import TrainStep, make_optimizer
    torch.manual_seed(seed)
    cfg = ModelConfig(**(config or CONFIG))
    model = model_cls(cfg)
    batch = make_batch(cfg, **(batch_shape or BATCH), seed=seed)
    optimizer = make_optimizer(model, 1e-3, 1e-4)
    step = TrainStep(lambda b: model(**b).loss, model, optimizer, grad_clip=1.0)
    step(batch)                                    # creates AdamW's state
    with DeviceOps() as recorder, stage_tags(model, recorder, optimizer):
        step(batch)
    return recorder


def table(counts: dict) -> str:
    """counts: {label: DeviceOps} -> a text table of ops (ATen + Triton) per stage and in total."""
    labels = list(counts)
    lines = [f"{'stage':<10}" + "".join(f"{label:>22}" for label in labels)]
    for stage in STAGES + ("total",):
        cells = []
        for label in labels:
            rec = counts[label]
            aten, tri = (rec.aten, rec.triton) if stage == "total" else rec.by_component().get(stage, (0, 0))
            cells.append(f"{aten + tri:>6} ({aten:>4} + {tri:>3} T)")
        lines.append(f"{stage:<10}" + "".join(f"{c:>22}" for c in cells))
    return "\n".join(lines)


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") != "1":
        print("set TRITON_INTERPRET=1: the Triton kernels must run (and be counted) on CPU tensors", file=sys.stderr)
        return 2
    import mcncl_fast
    from mcncl_fast import reference
    counts = {"reference": count_training_step(reference.Model), "fast": count_training_step(mcncl_fast.Model)}
    print(f"device operations of one training step (forward, backward, clipping, AdamW), config {CONFIG}, "
          f"batch {BATCH}")
    print(table(counts))
    ref, fast = counts["reference"], counts["fast"]
    print(f"fast / reference = {fast.total / ref.total:.3f}; sync points: reference {len(ref.syncs)}, "
          f"fast {len(fast.syncs)}")
    print("fast + CUDA graphs (--cuda-graphs): per step, 6 batch copies into the static inputs and 1 graph "
          f"launch replaying the {fast.total} operations above (by construction; the replay itself needs a GPU)")
    print("most common in fast:", fast.most_common(12))
    return 0


if __name__ == "__main__":
    sys.exit(main())
