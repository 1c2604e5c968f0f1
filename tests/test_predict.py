"""`predict` (per-utterance CSV, labelled and unlabelled files) and `evaluate --data-path / --dataset`."""
import csv
import json

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score

from mcncl_fast import reference
from mcncl_fast.checkpoints import load_checkpoint
from mcncl_fast.cli import main
from mcncl_fast.data import collate_dialogues, load_dataset
from mcncl_fast.model import ModelConfig
from tests.erc_helpers import IEMOCAP_NAMES, TINY, iemocap_9

TRAIN = [f"Ses0{i % 4 + 1}F_impro{i:02d}" for i in range(12)]
TEST = [f"Ses05F_impro{i:02d}" for i in range(4)]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny model trained for one epoch on a labelled IEMOCAP pickle."""
    root = tmp_path_factory.mktemp("predict")
    data = root / "iemocap.pkl"
    labels = iemocap_9(data, TRAIN, TEST, seed=1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MCNCL_FAST_BACKEND", "reference")   # plumbing under test, not the kernels
        assert main(["train", "--dataset", "iemocap", "--data-path", str(data), "--output-dir",
                     str(root / "run"), *TINY]) == 0
    return {"root": root, "data": data, "labels": labels, "checkpoint": root / "run" / "best.pt",
            "report": json.loads((root / "run" / "report.json").read_text())}


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    monkeypatch.setenv("MCNCL_FAST_BACKEND", "reference")


def read_csv(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def check_rows(fields, rows, class_names):
    probs = [f"prob_{c}" for c in class_names]
    assert fields == ["split", "dialogue_id", "utterance", "predicted"] + probs
    p = np.array([[float(r[c]) for c in probs] for r in rows])
    assert np.all((p >= 0) & (p <= 1))
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-6)
    assert [r["predicted"] for r in rows] == [class_names[k] for k in p.argmax(1)]
    return p


def by_dialogue(rows):
    out = {}
    for r in rows:
        out.setdefault(r["dialogue_id"], []).append(int(r["utterance"]))
    return out


def test_predict_labelled_file(run, tmp_path, capsys):
    out = tmp_path / "preds.csv"
    assert main(["predict", "--checkpoint", str(run["checkpoint"]), "--output", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    fields, rows = read_csv(out)
    p = check_rows(fields, rows, IEMOCAP_NAMES)
    labels = run["labels"]
    assert len(rows) == sum(len(v) for v in labels.values())            # --split all: every utterance
    assert {vid: list(range(len(v))) for vid, v in labels.items()} == by_dialogue(rows)
    assert {r["dialogue_id"] for r in rows if r["split"] == "test"} == set(TEST)
    assert not list(tmp_path.glob("*.tmp"))
    # the probabilities are the checkpoint's softmax on each dialogue alone (batching and padding change nothing)
    state = load_checkpoint(run["checkpoint"])
    model = reference.Model(ModelConfig.from_dict(state["model_config"])).eval()
    model.load_state_dict(state["model"])
    test = load_dataset("iemocap", run["data"]).test
    first = {}
    for i, r in enumerate(rows):
        first.setdefault(r["dialogue_id"], i)
    for d in test:
        batch = collate_dialogues([d])
        with torch.no_grad():
            logits = model(batch["text"], batch["audio"], batch["visual"], batch["utterance_mask"],
                           batch["frame_mask"]).logits[0]
        i = first[d["id"]]
        np.testing.assert_allclose(p[i:i + len(d["labels"])], torch.softmax(logits, -1).numpy(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("unlabelled", ["-1", "mixed"])
def test_predict_unlabelled_file(run, tmp_path, unlabelled, capsys):
    data = tmp_path / "unlabelled.pkl"
    labels = iemocap_9(data, [f"new{i}" for i in range(12)], ["q1", "q2", "q3"], seed=5, unlabelled=unlabelled)
    out = tmp_path / "preds.csv"
    assert main(["predict", "--checkpoint", str(run["checkpoint"]), "--data-path", str(data), "--split", "test",
                 "--batch-size", "2", "--output", str(out)]) == 0
    fields, rows = read_csv(out)
    check_rows(fields, rows, IEMOCAP_NAMES)
    assert by_dialogue(rows) == {vid: list(range(len(labels[vid]))) for vid in ["q1", "q2", "q3"]}
    assert {r["split"] for r in rows} == {"test"}
    assert main(["predict", "--checkpoint", str(run["checkpoint"]), "--data-path", str(data),
                 "--output", str(out)]) == 0
    assert len(read_csv(out)[1]) == sum(len(v) for v in labels.values())
    # nothing to score: evaluate says so in one line
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(run["checkpoint"]), "--data-path", str(data)]) == 2
    err = capsys.readouterr().err.strip()
    assert "no labelled utterance" in err and "\n" not in err


def test_evaluate_on_another_file(run, tmp_path):
    other = tmp_path / "other.pkl"
    labels = iemocap_9(other, [f"o{i}" for i in range(12)], ["t1", "t2", "t3", "t4", "t5"], seed=9)
    assert main(["evaluate", "--checkpoint", str(run["checkpoint"]), "--dataset", "iemocap", "--data-path", str(other),
                 "--output", str(tmp_path / "ev.json")]) == 0
    report = json.loads((tmp_path / "ev.json").read_text())
    assert main(["predict", "--checkpoint", str(run["checkpoint"]), "--data-path", str(other), "--split", "test",
                 "--output", str(tmp_path / "p.csv")]) == 0
    rows = read_csv(tmp_path / "p.csv")[1]
    y_true = [labels[r["dialogue_id"]][int(r["utterance"])] for r in rows]
    y_pred = [IEMOCAP_NAMES.index(r["predicted"]) for r in rows]
    assert report["num_utterances"] == len(y_true) == sum(len(labels[v]) for v in ["t1", "t2", "t3", "t4", "t5"])
    assert report["data_path"] == str(other)
    assert report["weighted_f1"] == pytest.approx(f1_score(y_true, y_pred, average="weighted",
                                                           labels=list(range(6)), zero_division=0), abs=1e-12)
    assert report["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro", labels=list(range(6)),
                                                        zero_division=0), abs=1e-12)


def test_evaluate_a_moved_file(run, tmp_path, capsys):
    moved = tmp_path / "moved.pkl"
    run["data"].rename(moved)
    try:
        assert main(["evaluate", "--checkpoint", str(run["checkpoint"])]) == 2
        err = capsys.readouterr().err.strip()
        assert "--data-path" in err and str(run["data"]) in err and "\n" not in err
        assert main(["evaluate", "--checkpoint", str(run["checkpoint"]), "--data-path", str(moved),
                     "--output", str(tmp_path / "ev.json")]) == 0
    finally:
        moved.rename(run["data"])
    ev = json.loads((tmp_path / "ev.json").read_text())
    assert ev["weighted_f1"] == pytest.approx(run["report"]["weighted_f1"], abs=1e-12)
    assert ev["num_utterances"] == run["report"]["num_utterances"]


def test_predict_mistakes_are_one_line_errors(run, tmp_path, capsys):
    wide = tmp_path / "wide.pkl"
    iemocap_9(wide, [f"w{i}" for i in range(12)], ["x"], dims=(11, 7, 5))
    ckpt = str(run["checkpoint"])
    cases = [
        (["--data-path", str(wide)], "text dim 11 differs from the checkpoint's 10"),
        (["--dataset", "meld", "--data-path", str(run["data"])], "iemocap"),
        (["--dataset", "synthetic"], "classes"),
        (["--batch-size", "0"], "--batch-size"),
        (["--checkpoint", str(tmp_path / "missing.pt")], "no such file"),
    ]
    for extra, needle in cases:
        args = ["predict", "--checkpoint", ckpt, "--output", str(tmp_path / "p.csv"), *extra]
        assert main(args) == 2, extra
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and needle in err and "\n" not in err, (extra, err)
    assert main(["predict", "--checkpoint", ckpt, "--output", str(tmp_path)]) == 2     # a folder
    assert "is a folder" in capsys.readouterr().err
    assert not (tmp_path / "p.csv").exists()


def test_predict_on_an_unlabelled_feature_store(run, tmp_path):
    from mcncl_fast.data import write_split
    g = torch.Generator().manual_seed(0)
    store = tmp_path / "store"
    lengths = {"train": [3, 2, 4, 1, 2, 3, 2, 2, 3, 1, 2], "test": [2, 5, 1]}
    for split, ns in lengths.items():
        # ids numbered from 0 in each split file, as raw MELD does: the split column tells them apart
        dialogues = [{"id": str(i), "text": torch.randn(n, 10, generator=g), "audio": torch.randn(n, 7, generator=g),
                      "visual": [torch.randn(2, 5, generator=g) for _ in range(n)],
                      "labels": torch.full((n,), -1, dtype=torch.int64)} for i, n in enumerate(ns)]
        write_split(store / f"{split}.safetensors", dialogues, IEMOCAP_NAMES, split=split)
    out = tmp_path / "p.csv"
    assert main(["predict", "--checkpoint", str(run["checkpoint"]), "--dataset", "features", "--data-path",
                 str(store), "--output", str(out)]) == 0
    fields, rows = read_csv(out)
    check_rows(fields, rows, IEMOCAP_NAMES)
    assert len(rows) == sum(sum(ns) for ns in lengths.values())
    test_rows = [r for r in rows if r["split"] == "test"]
    assert by_dialogue(test_rows) == {str(i): list(range(n)) for i, n in enumerate(lengths["test"])}
    assert {r["split"] for r in rows} == {"train", "dev", "test"}       # dev carved from the train file
