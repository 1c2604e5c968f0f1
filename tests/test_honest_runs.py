"""A run never lies, second pass: no write over another run or an input, no silent NaN, no unsafe load."""

import pytest

from mcncl_fast.cli import main
from tests.erc_helpers import TINY, iemocap_9

TRAIN = [f"Ses0{i % 4 + 1}F_impro{i:02d}" for i in range(12)]
TEST = [f"Ses05F_impro{i:02d}" for i in range(4)]


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    monkeypatch.setenv("MCNCL_FAST_BACKEND", "reference")   # plumbing under test, not the kernels


def one_line_error(capsys, *needles):
    err = capsys.readouterr().err.strip()
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
