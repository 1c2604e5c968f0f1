"""Command line and training loop: smoke run, resume, evaluate, one-line errors."""
import json
import os
import subprocess
import sys

import pytest
import torch

from mcncl_fast.cli import main
from mcncl_fast.train import TrainConfig, load_checkpoint, train

TINY_ARGS = ["--synthetic-scale", "0.02", "--batch-size", "8", "--d-model", "16", "--num-layers", "1",
             "--num-heads", "2", "--proj-dim", "8", "--ffn-mult", "2"]
TINY_MODEL = dict(d_model=16, num_layers=1, num_heads=2, proj_dim=8, ffn_mult=2)


def run_cli(*args, env_extra=None):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}   # the real user path
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "mcncl_fast", *args], capture_output=True, text=True,
                          env=env, timeout=600)


def test_train_then_evaluate_smoke(tmp_path):
    out = tmp_path / "run"
    res = run_cli("train", "--epochs", "2", "--output-dir", str(out), *TINY_ARGS)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "weighted F1" in res.stdout and "neutral" in res.stdout
    assert "dev weighted F1" in res.stderr + res.stdout          # per-epoch line (through tqdm.write)
    report = json.loads((out / "report.json").read_text())
    assert 0.0 <= report["weighted_f1"] <= 1.0
    assert set(report["per_class_f1"]) == {"neutral", "surprise", "fear", "sadness", "joy", "disgust", "anger"}
    assert len(report["history"]) == 2
    assert (out / "best.pt").exists() and (out / "last.pt").exists()
    assert not list(out.glob("*.tmp"))                            # atomic writes leave no temp files
    ev = run_cli("evaluate", "--checkpoint", str(out / "best.pt"), "--output", str(tmp_path / "ev.json"))
    assert ev.returncode == 0, ev.stderr[-2000:]
    again = json.loads((tmp_path / "ev.json").read_text())
    assert again["weighted_f1"] == pytest.approx(report["weighted_f1"], abs=1e-9)


def test_resume_gives_the_same_next_step_loss(tmp_path):
    base = dict(synthetic_scale=0.02, batch_size=8, model=TINY_MODEL, seed=3)
    straight = []
    train(TrainConfig(epochs=2, output_dir=str(tmp_path / "a"), **base),
          step_callback=lambda e, s, loss: straight.append((e, s, loss)))
    train(TrainConfig(epochs=1, output_dir=str(tmp_path / "b"), **base))
    resumed = []
    train(TrainConfig(epochs=2, output_dir=str(tmp_path / "b"), **base), resume=str(tmp_path / "b" / "last.pt"),
          step_callback=lambda e, s, loss: resumed.append((e, s, loss)))
    second_epoch = [x for x in straight if x[0] == 1]
    assert resumed and resumed[0][:2] == (1, 0)
    assert resumed[0][2] == pytest.approx(second_epoch[0][2], rel=1e-6)
    assert [x[2] for x in resumed] == pytest.approx([x[2] for x in second_epoch], rel=1e-5)
    assert load_checkpoint(tmp_path / "b" / "last.pt")["epoch"] == 2


@pytest.mark.parametrize("args,needle", [
    (["train", "--epochs", "0"], "--epochs"),
    (["train", "--lr", "-1"], "--lr"),
    (["train", "--modalities", "tx"], "--modalities"),
    (["train", "--num-heads", "3"], "num_heads"),
    (["train", "--device", "cuda:0"] if not torch.cuda.is_available() else ["train", "--epochs", "-2"], "--"),
])
def test_bad_options_are_one_line_errors(args, needle, capsys):
    assert main(args + ["--output-dir", "/nonexistent/never-written"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and needle in err and "\n" not in err and "Traceback" not in err


def test_missing_and_corrupt_checkpoints(tmp_path, capsys):
    assert main(["evaluate", "--checkpoint", str(tmp_path / "nope.pt")]) == 2
    assert "no such file" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    assert main(["evaluate", "--checkpoint", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "not a readable mcncl_fast checkpoint" in err and "Traceback" not in err
    other = tmp_path / "other.pt"
    torch.save({"weights": 1}, other)
    assert main(["train", "--resume", str(other)]) == 2
    assert "not an mcncl_fast checkpoint" in capsys.readouterr().err


def test_cli_error_has_no_traceback_in_subprocess(tmp_path):
    res = run_cli("evaluate", "--checkpoint", str(tmp_path / "missing.pt"))
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "Traceback" not in res.stderr
