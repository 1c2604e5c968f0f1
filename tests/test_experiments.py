"""`train --seeds` (one run per seed, mean ± std summary) and `train --tensorboard` (per-epoch scalars)."""
import json
import statistics
import sys

import pytest

from mcncl_fast.checkpoints import load_checkpoint
from mcncl_fast.cli import main
from tests.erc_helpers import TINY_SYNTHETIC


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    monkeypatch.setenv("MCNCL_FAST_BACKEND", "reference")   # plumbing under test, not the kernels


def test_seeds_summary(tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(["train", "--seeds", "0", "1", "--output-dir", str(out), *TINY_SYNTHETIC]) == 0
    printed = capsys.readouterr().out
    reports = {k: json.loads((out / f"seed{k}" / "report.json").read_text()) for k in (0, 1)}
    for k in (0, 1):
        assert load_checkpoint(out / f"seed{k}" / "best.pt")["train_config"]["seed"] == k
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seeds"] == [0, 1] and [r["seed"] for r in summary["runs"]] == [0, 1]
    for key, source in (("test_weighted_f1", "weighted_f1"), ("test_macro_f1", "macro_f1")):
        values = [reports[k][source] for k in (0, 1)]
        assert [r[key] for r in summary["runs"]] == values
        assert summary["mean"][key] == pytest.approx(statistics.mean(values), abs=1e-12)
        assert summary["std"][key] == pytest.approx(statistics.stdev(values), abs=1e-12)
    assert summary["mean"]["dev_weighted_f1"] == pytest.approx(
        statistics.mean(reports[k]["best_dev_weighted_f1"] for k in (0, 1)), abs=1e-12)
    table = (out / "summary.md").read_text()
    mean, std = summary["mean"]["test_weighted_f1"], summary["std"]["test_weighted_f1"]
    assert f"{100 * mean:.2f} ± {100 * std:.2f}" in table and table in printed
    for k in (0, 1):
        assert f"| {k} | 1 | {100 * reports[k]['best_dev_weighted_f1']:.2f} | {100 * reports[k]['weighted_f1']:.2f} |" \
            in table


def test_seeds_with_resume_is_a_one_line_error(tmp_path, capsys):
    assert main(["train", "--seeds", "0", "1", "--resume", str(tmp_path / "last.pt"),
                 "--output-dir", str(tmp_path / "x"), *TINY_SYNTHETIC]) == 2
    err = capsys.readouterr().err.strip()
    assert "--seeds" in err and "\n" not in err
    assert main(["train", "--seeds", "1", "1", "--output-dir", str(tmp_path / "x"), *TINY_SYNTHETIC]) == 2
    assert "each seed once" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_tensorboard_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "run"
    args = [a for a in TINY_SYNTHETIC]
    args[args.index("--epochs") + 1] = "2"
    assert main(["train", "--tensorboard", "--output-dir", str(out), *args]) == 0
    history = json.loads((out / "report.json").read_text())["history"]
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert {"train/loss", "dev/weighted_f1", "train/lr"} <= set(events.Tags()["scalars"])
    for tag, key in (("train/loss", "train_loss"), ("dev/weighted_f1", "dev_weighted_f1"), ("train/lr", "lr")):
        scalars = events.Scalars(tag)
        assert [s.step for s in scalars] == [1, 2]
        assert [s.value for s in scalars] == pytest.approx([h[key] for h in history], rel=1e-6)


def test_tensorboard_missing_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)   # as if tensorboard were not installed
    out = tmp_path / "run"
    assert main(["train", "--tensorboard", "--output-dir", str(out), *TINY_SYNTHETIC]) == 2
    err = capsys.readouterr().err.strip()
    assert "tensorboard" in err and "pip install" in err and "\n" not in err
    assert not (out / "best.pt").exists()                     # refused before training
