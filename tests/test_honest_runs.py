"""A run never lies, second pass: no write over another run or an input, no silent NaN, no unsafe load."""
import os
import pickle
import stat
import zipfile

import numpy as np
import pytest
import torch

from mcncl_fast.checkpoints import load_checkpoint, save_checkpoint
from mcncl_fast.cli import main
from tests.erc_helpers import TINY, iemocap_9

TRAIN = [f"Ses0{i % 4 + 1}F_impro{i:02d}" for i in range(12)]
TEST = [f"Ses05F_impro{i:02d}" for i in range(4)]


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    monkeypatch.setenv("MCNCL_FAST_BACKEND", "reference")   # plumbing under test, not the kernels


def one_line_error(capsys, *needles):
    err = capsys.readouterr().err.strip()
    err = err[err.rfind("error:"):] if "error:" in err else err   # after any progress bar
    assert err.startswith("error:") and "\n" not in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny one-epoch runs (A, B) on one labelled IEMOCAP pickle."""
    root = tmp_path_factory.mktemp("honest")
    data = root / "iemocap.pkl"
    iemocap_9(data, TRAIN, TEST, seed=1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MCNCL_FAST_BACKEND", "reference")
        for name in ("a", "b"):
            assert main(["train", "--dataset", "iemocap", "--data-path", str(data), "--output-dir",
                         str(root / name), *TINY]) == 0
    return {"root": root, "data": data, "a": root / "a", "b": root / "b"}


def snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


# ----------------------------------------------------------------------------- data loss
def test_resume_into_a_folder_of_another_run_is_refused_before_any_write(runs, capsys):
    before = snapshot(runs["b"])
    assert main(["train", "--resume", str(runs["a"] / "last.pt"), "--epochs", "2",
                 "--output-dir", str(runs["b"])]) == 2
    one_line_error(capsys, str(runs["b"]), "another run")
    assert snapshot(runs["b"]) == before


@pytest.mark.parametrize("command,target", [
    ("predict", "a/best.pt"), ("evaluate", "a/last.pt"), ("predict", "iemocap.pkl"), ("evaluate", "iemocap.pkl"),
    ("evaluate", "a/report.pt"),
])
def test_an_output_never_replaces_an_input_or_a_checkpoint(runs, command, target, capsys):
    out = runs["root"] / target
    before = out.read_bytes() if out.exists() else None
    assert main([command, "--checkpoint", str(runs["a"] / "best.pt"), "--output", str(out)]) == 2
    one_line_error(capsys, str(out))
    assert (out.read_bytes() if out.exists() else None) == before
    if before is not None and target.endswith(".pt"):
        from mcncl_fast.checkpoints import load_checkpoint
        load_checkpoint(out)


# ----------------------------------------------------------------------------- non-finite weights and logits
def test_divergence_on_the_last_step_of_an_epoch_saves_and_reports_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--synthetic-scale", "0.02", *TINY, "--epochs", "1", "--lr", "1e30",
                 "--batch-size", "1000", "--output-dir", str(out)]) == 2
    one_line_error(capsys, "end of epoch 1", "not finite", "--lr")
    assert not (out / "best.pt").exists() and not (out / "last.pt").exists() and not (out / "report.json").exists()


def test_a_checkpoint_with_nan_weights_is_an_error_in_evaluate_and_predict(runs, tmp_path, capsys):
    state = load_checkpoint(runs["a"] / "best.pt")
    for value in state["model"].values():
        if value.is_floating_point():
            value.fill_(float("nan"))
    save_checkpoint(tmp_path / "nan.pt", state)
    assert main(["evaluate", "--checkpoint", str(tmp_path / "nan.pt")]) == 2
    one_line_error(capsys, "weights are not finite")
    assert main(["predict", "--checkpoint", str(tmp_path / "nan.pt"), "--output", str(tmp_path / "p.csv")]) == 2
    one_line_error(capsys, "weights are not finite")
    assert not (tmp_path / "p.csv").exists()


def test_extreme_test_features_are_an_error_not_class_0(runs, tmp_path, capsys):
    items = list(pickle.loads(runs["data"].read_bytes()))
    for vid in TEST:
        items[3][vid] = np.full_like(items[3][vid], 1e30)
    extreme = tmp_path / "extreme.pkl"
    extreme.write_bytes(pickle.dumps(tuple(items), protocol=2))
    assert main(["evaluate", "--checkpoint", str(runs["a"] / "best.pt"), "--data-path", str(extreme)]) == 2
    one_line_error(capsys, "not finite", "features")


# ----------------------------------------------------------------------------- wrong data, damaged files
def test_a_data_file_without_dataset_is_refused_not_replaced_by_synthetic_data(runs, tmp_path, capsys):
    for option in ("--data-path", "--visual-path"):
        assert main(["train", "--synthetic-scale", "0.02", *TINY, option, str(runs["data"]),
                     "--output-dir", str(tmp_path / "never")]) == 2
        one_line_error(capsys, option, "--dataset")
        assert not (tmp_path / "never").exists()


def test_a_flipped_byte_inside_a_checkpoint_is_reported_as_corruption(runs, tmp_path, capsys):
    raw = bytearray((runs["a"] / "last.pt").read_bytes())
    with zipfile.ZipFile(runs["a"] / "last.pt") as archive:   # flip one byte inside the largest tensor's data
        info = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    raw[start + info.file_size // 2] ^= 0x01
    damaged = tmp_path / "last.pt"
    damaged.write_bytes(bytes(raw))
    assert main(["train", "--resume", str(damaged), "--epochs", "2"]) == 2
    one_line_error(capsys, "corrupt", "CRC")
    assert main(["evaluate", "--checkpoint", str(damaged)]) == 2
    one_line_error(capsys, "corrupt")


# ----------------------------------------------------------------------------- unsafe files
class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def test_a_pickle_payload_is_refused_unless_trusted(runs, tmp_path, capsys):
    marker = tmp_path / "ran"
    items = list(pickle.loads(runs["data"].read_bytes()))
    items[6][TRAIN[0]] = _Payload(marker)          # hidden among the sentences
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps(tuple(items), protocol=2))
    visual = tmp_path / "visual.pt"
    torch.save({"x": _Payload(marker)}, visual)
    for extra in (["--data-path", str(evil)], ["--data-path", str(runs["data"]), "--visual-path", str(visual)]):
        assert main(["train", "--dataset", "iemocap", *extra, *TINY, "--output-dir", str(tmp_path / "r")]) == 2
        one_line_error(capsys, "refused", "--trust-pickle")
        assert not marker.exists()
    assert main(["evaluate", "--checkpoint", str(runs["a"] / "best.pt"), "--data-path", str(evil)]) == 2
    one_line_error(capsys, "exec", "--trust-pickle")     # names what it would have called
    assert not marker.exists()
    # opted out: the payload runs (that is what trusting a file means)
    main(["evaluate", "--checkpoint", str(runs["a"] / "best.pt"), "--data-path", str(evil), "--trust-pickle"])
    assert marker.exists()


def test_outputs_follow_the_process_umask(runs):
    mask = os.umask(0o022)
    os.umask(mask)
    want = 0o666 & ~mask
    for name in ("best.pt", "last.pt", "report.json"):
        assert stat.S_IMODE((runs["a"] / name).stat().st_mode) == want, name
