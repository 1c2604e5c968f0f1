"""The training step of the fast Model does not synchronise host and device (DESIGN.md §5).

Run through the Triton interpreter (the path CUDA tensors take): no sync op is dispatched, no
boolean-mask indexing, no tensor read on the host; the reference may sync, but does not either."""
import pytest
import torch

import mcncl_fast
from mcncl_fast import reference
from benchmarks.device_ops import DeviceOps
from tests.helpers import INTERPRET, spy_host_reads

CFG = dict(text_dim=32, audio_dim=16, visual_dim=24, d_model=32, num_layers=2, num_heads=4, proj_dim=16,
           num_classes=5, dropout=0.1)


@pytest.mark.skipif(not INTERPRET, reason="the Triton path runs through the interpreter here")
@pytest.mark.parametrize("model_cls", [mcncl_fast.Model, reference.Model], ids=["fast", "reference"])
def test_training_step_has_no_host_sync(monkeypatch, model_cls):
    torch.manual_seed(0)
    model = model_cls(mcncl_fast.ModelConfig(**CFG))
    b, s, frames = 3, 6, 4
    batch = dict(text=torch.randn(b, s, 32), audio=torch.randn(b, s, 16), visual=torch.randn(b, s, frames, 24),
                 utterance_mask=torch.rand(b, s) > 0.2, frame_mask=torch.rand(b, s, frames) > 0.2,
                 labels=torch.randint(0, 5, (b, s)))
    batch["utterance_mask"][0] = False       # a fully padded dialogue
    host_reads = spy_host_reads(monkeypatch)
    with DeviceOps() as recorder:
        out = model(**batch)
        out.loss.backward()
    assert recorder.aten > 100                    # the recorder saw the step
    assert recorder.syncs == [] and host_reads == [], (recorder.syncs, host_reads)
    assert torch.isfinite(out.loss)
