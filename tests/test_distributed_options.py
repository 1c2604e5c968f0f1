"""Training options of the scale-out work: LR schedule, early stopping, bf16 autocast, --compile."""
import math

import pytest
import torch

from mcncl_fast.cli import _train_config, build_parser
from mcncl_fast.train import TrainConfig, UserError, autocast, epochs_since_best, lr_factor, train

TINY = dict(synthetic_scale=0.02, batch_size=8, device="cpu", seed=1,
            model=dict(d_model=8, num_layers=1, num_heads=2, proj_dim=4))


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    monkeypatch.setenv("MCNCL_FAST_BACKEND", "reference")   # the loop's plumbing is under test, not the kernels


def _run(tmp_path, name, resume=None, **kw):
    losses = []
    cfg = TrainConfig(**{**TINY, "output_dir": str(tmp_path / name), **kw})
    report = train(cfg, resume=resume, step_callback=lambda e, s, loss: losses.append(loss))
    return report, losses


def test_lr_factor_closed_form():
    cfg = TrainConfig(lr_schedule="cosine", warmup_ratio=0.2, min_lr_ratio=0.1)
    total = 10   # 2 warmup steps
    assert [lr_factor(s, total, cfg) for s in (0, 1)] == [0.5, 1.0]
    assert lr_factor(2, total, cfg) == pytest.approx(1.0)
    assert lr_factor(6, total, cfg) == pytest.approx(0.1 + 0.9 * 0.5)          # half way through the decay
    assert lr_factor(10, total, cfg) == pytest.approx(0.1)
    lin = TrainConfig(lr_schedule="linear")
    assert lr_factor(5, 10, lin) == pytest.approx(0.5)
    assert lr_factor(7, 10, TrainConfig()) == 1.0
    assert math.isclose(lr_factor(3, 10, TrainConfig(lr_schedule="cosine")), 0.5 * (1 + math.cos(math.pi * 0.3)))


def test_schedule_is_applied_and_resumes_exactly(tmp_path):
    kw = dict(lr_schedule="cosine", warmup_ratio=0.3, epochs=2)
    full, losses = _run(tmp_path, "full", **kw)
    assert [h["lr"] for h in full["history"]][-1] == pytest.approx(0.0, abs=1e-12)   # cosine decays to 0
    # a run killed during epoch 2, resumed from last.pt (written after epoch 1): same steps, same LRs
    first = []

    def crash(epoch, step, loss):
        if epoch == 1:
            raise KeyboardInterrupt
        first.append(loss)
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(**{**TINY, "output_dir": str(tmp_path / "half"), **kw}), step_callback=crash)
    resumed, second = _run(tmp_path, "half", resume=str(tmp_path / "half" / "last.pt"), **kw)
    assert first + second == losses
    assert resumed["history"] == full["history"]


def test_early_stopping(tmp_path):
    report, losses = _run(tmp_path, "es", epochs=6, patience=1, lr=1e-12)
    f1 = [h["dev_weighted_f1"] for h in report["history"]]
    assert f1 == [f1[0]] * 2 and report["stopped_early"] is True    # no improvement after epoch 1: stop after 2
    assert epochs_since_best([{"dev_weighted_f1": x} for x in (0.1, 0.3, 0.3, 0.2)]) == 2
    report, _ = _run(tmp_path, "no_es", epochs=2, patience=0, lr=1e-12)
    assert len(report["history"]) == 2 and report["stopped_early"] is False


def test_bf16_autocast(tmp_path):
    with autocast(torch.device("cpu"), "bf16"):
        assert torch.nn.Linear(3, 2)(torch.randn(4, 3)).dtype == torch.bfloat16
    _, fp32 = _run(tmp_path, "fp32", epochs=1)
    report, bf16 = _run(tmp_path, "bf16", epochs=1, precision="bf16")
    assert all(math.isfinite(x) for x in bf16) and report["precision"] == "bf16"
    assert bf16 != fp32                                                       # bf16 rounding really happened
    assert max(abs(a - b) / abs(b) for a, b in zip(bf16, fp32)) < 5e-2


def test_compile_flag_reaches_torch_compile(tmp_path, monkeypatch):
    calls = []

    def fake_compile(module, backend, dynamic):
        calls.append((type(module).__name__, backend, dynamic))
        return module
    monkeypatch.setattr(torch, "compile", fake_compile)
    _, compiled = _run(tmp_path, "c", epochs=1, compile=True, compile_backend="aot_eager")
    assert calls == [("Model", "aot_eager", None)]
    _run(tmp_path, "b", epochs=1, compile=True, compile_backend="eager", shape_buckets=True)
    assert calls[-1] == ("Model", "eager", False)       # static shapes: one compilation per bucket
    _, plain = _run(tmp_path, "p", epochs=1)
    assert compiled == plain


def test_cli_flags_and_validation():
    args = build_parser().parse_args(["train", "--precision", "bf16", "--compile", "--compile-backend", "eager",
                                      "--lr-schedule", "linear", "--warmup-ratio", "0.1", "--min-lr-ratio", "0.05",
                                      "--patience", "3", "--dataset", "meld", "--data-path", "m.pkl",
                                      "--visual-path", "v.pkl"])
    cfg = _train_config(args)
    assert (cfg.precision, cfg.compile, cfg.compile_backend, cfg.lr_schedule, cfg.warmup_ratio, cfg.min_lr_ratio,
            cfg.patience, cfg.dataset, cfg.data_path, cfg.visual_path) == \
        ("bf16", True, "eager", "linear", 0.1, 0.05, 3, "meld", "m.pkl", "v.pkl")
    for bad in (dict(precision="fp16"), dict(lr_schedule="step"), dict(warmup_ratio=1.0), dict(patience=-1)):
        with pytest.raises(UserError):
            TrainConfig(**bad)
