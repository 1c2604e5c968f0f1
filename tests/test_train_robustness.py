"""A run never lies about its result: divergence, resume, safe loading, busy folders, one-line errors."""
import errno
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import mcncl_fast
from mcncl_fast import reference
from mcncl_fast.checkpoints import load_checkpoint, save_checkpoint
from mcncl_fast.cli import main
from mcncl_fast.data.errors import UserError
from mcncl_fast.step import NonFiniteError
from mcncl_fast.train import TrainConfig, train
from tests.test_data_pickles import _iemocap

TINY = ["--synthetic-scale", "0.02", "--batch-size", "8", "--d-model", "16", "--num-layers", "1", "--num-heads", "2",
        "--proj-dim", "8", "--ffn-mult", "2"]
TINY_MODEL = dict(d_model=16, num_layers=1, num_heads=2, proj_dim=8, ffn_mult=2)


def one_line_error(capsys, *needles):
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


# ----------------------------------------------------------------------------- divergence
def test_diverging_run_stops_naming_the_step_and_saves_nothing(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(NonFiniteError, match=r"epoch 1, step \d+"):
        train(TrainConfig(synthetic_scale=0.02, batch_size=8, model=TINY_MODEL, lr=1e30, epochs=2,
                          output_dir=str(out)))
    assert not (out / "best.pt").exists() and not (out / "last.pt").exists() and not (out / "report.json").exists()
    assert not (out / ".lock").exists()


@pytest.mark.parametrize("args,needle", [
    (["--alpha", "nan"], "--alpha"), (["--lr", "inf"], "--lr"), (["--weight-decay", "inf"], "--weight-decay"),
    (["--seed", "-1"], "--seed"), (["--synthetic-scale", "inf"], "--synthetic-scale"),
    (["--temperature", "inf"], "--temperature"), (["--device", "mps"], "--device"),
    (["--grad-clip", "nan"], "--grad-clip"),
])
def test_bad_hyper_parameters_are_refused_before_anything_runs(args, needle, tmp_path, capsys):
    assert main(["train", *args, "--output-dir", str(tmp_path / "never")]) == 2
    one_line_error(capsys, needle)
    assert not (tmp_path / "never").exists()


def test_nan_in_padded_slots_never_reaches_a_real_output():
    config = mcncl_fast.ModelConfig(text_dim=8, audio_dim=6, visual_dim=5, d_model=16, num_layers=1, num_heads=2,
                                    proj_dim=8, dropout=0.0)
    ref = reference.Model(config)
    fast = mcncl_fast.Model(config)
    fast.load_state_dict(ref.state_dict())
    g = torch.Generator().manual_seed(3)
    utterance_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    frame_mask = torch.tensor([[1, 1, 0]] * 5 + [[1, 0, 0]] * 5, dtype=torch.bool).view(2, 5, 3)
    clean = dict(text=torch.randn(2, 5, 8, generator=g), audio=torch.randn(2, 5, 6, generator=g),
                 visual=torch.randn(2, 5, 3, 5, generator=g), utterance_mask=utterance_mask, frame_mask=frame_mask,
                 labels=torch.randint(0, 7, (2, 5), generator=g))
    dirty = {k: v.clone() for k, v in clean.items()}
    dirty["text"][0, 3:] = float("nan")
    dirty["audio"][0, 4] = float("inf")
    dirty["visual"][0, :, 2] = float("nan")          # padded frames of real utterances
    dirty["visual"][1, :, 1:] = float("-inf")
    for model in (ref, fast):
        want, got = model(**clean), model(**dirty)
        assert torch.isfinite(got.loss) and torch.equal(got.loss, want.loss)
        assert torch.equal(got.logits[utterance_mask], want.logits[utterance_mask])
    assert torch.allclose(fast(**dirty).loss, ref(**dirty).loss, rtol=1e-5)


# ----------------------------------------------------------------------------- resume
def test_resume_continues_the_saved_run_from_anywhere(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    assert main(["train", "--epochs", "1", "--output-dir", str(run), "--seed", "4", *TINY]) == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert main(["train", "--resume", str(run / "last.pt"), "--epochs", "2"]) == 0
    captured = capsys.readouterr()
    assert "resume: --epochs: 1 -> 2" in captured.out + captured.err
    state = load_checkpoint(run / "last.pt")
    assert (state["epoch"] == 2 and state["train_config"]["seed"] == 4
            and state["train_config"]["model"]["d_model"] == 16)
    assert not list(elsewhere.iterdir())                                   # nothing written where it started
    for option, value in (("--d-model", "32"), ("--lr", "0.1"), ("--dataset", "iemocap"), ("--seed", "5")):
        assert main(["train", "--resume", str(run / "last.pt"), option, value]) == 2
        one_line_error(capsys, option, "conflicts with the checkpoint")
    assert main(["train", "--resume", str(run / "last.pt"), "--seed", "4", "--epochs", "2"]) == 0   # equal: fine


def test_resume_finds_moved_data_and_refuses_other_data(tmp_path, capsys):
    data, *_ = _iemocap(tmp_path)
    run = tmp_path / "run"
    assert main(["train", "--dataset", "iemocap", "--data-path", str(data), "--epochs", "1", "--output-dir", str(run),
                 *TINY[2:]]) == 0
    moved = tmp_path / "moved" / "iemocap.pkl"
    moved.parent.mkdir()
    shutil.move(data, moved)
    assert main(["train", "--resume", str(run / "last.pt"), "--epochs", "2"]) == 2     # the data is gone
    capsys.readouterr()
    assert main(["train", "--resume", str(run / "last.pt"), "--epochs", "2", "--data-path", str(moved)]) == 0
    assert load_checkpoint(run / "last.pt")["train_config"]["data_path"] == str(moved)
    obj = pickle.loads(moved.read_bytes())
    other = tmp_path / "other.pkl"                       # the same file less one training dialogue
    other.write_bytes(pickle.dumps(obj[:7] + (obj[7][:-1],) + obj[8:]))
    capsys.readouterr()
    assert main(["train", "--resume", str(run / "last.pt"), "--epochs", "3", "--data-path", str(other)]) == 2
    one_line_error(capsys, "not the data this run was trained on")


def test_test_report_comes_from_this_runs_best_checkpoint(tmp_path, capsys):
    for name, seed in (("a", "1"), ("b", "2")):
        assert main(["train", "--epochs", "1", "--seed", seed, "--output-dir", str(tmp_path / name), *TINY]) == 0
    shutil.copy(tmp_path / "b" / "best.pt", tmp_path / "a" / "best.pt")      # another run's best checkpoint
    capsys.readouterr()
    assert main(["train", "--resume", str(tmp_path / "a" / "last.pt")]) == 2
    one_line_error(capsys, "best.pt", "another run")


# ----------------------------------------------------------------------------- output folders
def test_busy_used_and_broken_output_folders(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".lock").write_text(str(sleeper.pid))
        assert main(["train", "--epochs", "1", "--output-dir", str(out), *TINY]) == 2
        one_line_error(capsys, "in use by another run", str(sleeper.pid))
    finally:
        sleeper.kill()
        sleeper.wait()
    (out / "last.pt.12345.tmp").write_bytes(b"half a checkpoint")               # a save killed half-way
    assert main(["train", "--epochs", "1", "--output-dir", str(out), *TINY]) == 0   # stale lock taken over
    assert f"taking over the lock of a run that is no longer alive (process {sleeper.pid})" in capsys.readouterr().err
    assert not (out / "last.pt.12345.tmp").exists() and not (out / ".lock").exists()
    capsys.readouterr()
    before = (out / "best.pt").read_bytes()
    assert main(["train", "--epochs", "1", "--output-dir", str(out), *TINY]) == 2
    one_line_error(capsys, "already holds a run", "--resume")
    assert (out / "best.pt").read_bytes() == before
    assert main(["train", "--epochs", "1", "--output-dir", str(out), "--overwrite", *TINY]) == 0
    capsys.readouterr()
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert main(["train", "--epochs", "1", "--output-dir", str(a_file), *TINY]) == 2
    one_line_error(capsys, "not a folder")


@pytest.mark.parametrize("code,word", [(errno.EROFS, "not writable"), (errno.ENOSPC, "full")])
def test_unwritable_output_folder_fails_before_training(code, word, tmp_path, monkeypatch, capsys):
    import mcncl_fast.run_dir as run_dir

    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code))
    monkeypatch.setattr(run_dir.tempfile, "mkstemp", refuse)
    steps = []
    with pytest.raises(UserError, match=word):
        train(TrainConfig(synthetic_scale=0.02, batch_size=8, model=TINY_MODEL, epochs=1,
                          output_dir=str(tmp_path / "ro")), step_callback=lambda *a: steps.append(a))
    assert steps == []
    assert main(["train", "--epochs", "1", "--output-dir", str(tmp_path / "ro2"), *TINY]) == 2
    one_line_error(capsys, word)


def test_full_disk_during_a_save_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"format": "mcncl_fast", "version": 1, "model": {"w": torch.ones(2)}})
    before = path.read_bytes()

    def full(obj, f, *args, **kwargs):
        with open(f, "wb") as out:             # half a file, then the disk is full
            out.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(UserError, match="could not write .*last.pt: No space left"):
        save_checkpoint(path, {"model": {}})
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["last.pt"]


# ----------------------------------------------------------------------------- safe loading
class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))       # creates the marker file if ever unpickled


def test_checkpoint_with_code_is_refused_without_running_it(tmp_path, capsys):
    marker = tmp_path / "payload-ran"
    evil = tmp_path / "evil.pt"
    torch.save({"format": "mcncl_fast", "version": 1, "model": {}, "x": _Payload(str(marker))}, evil)
    assert main(["evaluate", "--checkpoint", str(evil)]) == 2
    one_line_error(capsys, "refused without unpickling")
    assert not marker.exists()
    assert main(["train", "--resume", str(evil)]) == 2
    one_line_error(capsys, "refused without unpickling")
    assert not marker.exists()


def test_evaluate_output_must_be_a_file_and_leaves_no_temp_files(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--epochs", "1", "--output-dir", str(run), *TINY]) == 0
    folder = tmp_path / "reports"
    folder.mkdir()
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(run / "best.pt"), "--output", str(folder)]) == 2
    one_line_error(capsys, "--output", "is a folder")
    assert not list(folder.iterdir()) and not list(tmp_path.glob("*.tmp"))
    assert main(["evaluate", "--checkpoint", str(run / "best.pt"), "--output", str(folder / "ev.json")]) == 0
    assert (folder / "ev.json").exists() and not list(folder.glob("*.tmp"))


# ----------------------------------------------------------------------------- bad data, through the CLI
def _with(change):
    from tests.test_data_validation import _iemocap as iemocap_tuple
    return iemocap_tuple(**change)


def _label(vid, index, value):
    def change(labels):
        labels = dict(labels)
        labels[vid] = list(labels[vid])
        labels[vid][index] = value
        return labels
    return change


def _nan_text(d):
    d = dict(d)
    d["d2"] = [v.copy() for v in d["d2"]]
    d["d2"][1][0] = float("nan")
    return d


def _wide_visual(d):
    d = dict(d)
    d["d3"] = [v if i != 2 else np.zeros(7, np.float32) for i, v in enumerate(d["d3"])]
    return d


BAD_DATA = {
    "non-finite feature": (dict(videoText=_nan_text), ["'d2'", "utterance 1"]),
    "float label": (dict(videoLabels=_label("d1", 0, 1.7)), ["'d1'", "1.7"]),
    "huge label": (dict(videoLabels=_label("d1", 2, 2**70)), ["'d1'"]),
    "label out of range": (dict(videoLabels=_label("d4", 1, 6)), ["'d4'"]),
    "dialogue in train and test": (dict(testVid=["t0", "d0"]), ["'d0'"]),
    "duplicated train id": (dict(trainVid=[f"d{i}" for i in range(6)] + ["d3"]), ["'d3'"]),
    "visual dim of one utterance": (dict(videoVisual=_wide_visual), ["'d3'", "utterance 2"]),
}


@pytest.mark.parametrize("defect", list(BAD_DATA))
def test_bad_data_is_a_one_line_error_before_training(defect, tmp_path, capsys):
    change, needles = BAD_DATA[defect]
    data = tmp_path / "bad.pkl"
    data.write_bytes(pickle.dumps(_with(change)))
    out = tmp_path / "run"
    assert main(["train", "--dataset", "iemocap", "--data-path", str(data), "--output-dir", str(out), *TINY[2:]]) == 2
    one_line_error(capsys, *needles)
    assert not (out / "last.pt").exists()


def test_empty_dev_split_is_a_one_line_error(tmp_path, capsys):
    data = tmp_path / "tiny.pkl"
    data.write_bytes(pickle.dumps(_with(dict(trainVid=["d0"]))))     # one train dialogue: nothing left for dev
    assert main(["train", "--dataset", "iemocap", "--data-path", str(data), "--output-dir", str(tmp_path / "r"),
                 *TINY[2:]]) == 2
    one_line_error(capsys, "dev")
