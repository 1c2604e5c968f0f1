"""Reports: the paper-style F1 table, confusion matrix and curves PNGs, JSON, after train and evaluate."""
import json

import numpy as np
import pytest

from mcncl_fast.reports import f1_table, save_confusion_png, save_curves_png
from mcncl_fast.train import metrics_report

NAMES = ["happy", "sad", "neutral"]


def _png_shape(path):
    from matplotlib.image import imread
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return imread(str(path)).shape


def test_metrics_report_confusion_and_f1():
    y_true = [0, 0, 1, 1, 2, 2, 2]
    y_pred = [0, 1, 1, 1, 2, 0, 2]
    r = metrics_report(y_true, y_pred, NAMES)
    assert r["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 2]]
    # by hand: happy P=1/2 R=1/2 F1=.5; sad P=2/3 R=1 F1=.8; neutral P=1 R=2/3 F1=.8
    assert r["per_class_f1"] == pytest.approx({"happy": 0.5, "sad": 0.8, "neutral": 0.8})
    assert r["weighted_f1"] == pytest.approx((2 * 0.5 + 2 * 0.8 + 3 * 0.8) / 7)
    assert r["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.8) / 3)
    assert r["accuracy"] == pytest.approx(5 / 7)
    assert r["class_names"] == NAMES
    empty = metrics_report([], [], NAMES)
    assert empty["confusion_matrix"] == [[0] * 3] * 3 and empty["weighted_f1"] == 0.0 == empty["macro_f1"]


def test_macro_f1_counts_every_class():
    # "neutral" neither occurs nor is predicted: F1 0 in the mean over the 3 classes (classification_report's
    # macro avg); happy P=1 R=1/2 -> 2/3, sad P=1/2 R=1 -> 2/3
    r = metrics_report([0, 0, 1], [0, 1, 1], NAMES)
    assert r["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)
    r = metrics_report([0, 1, 1, 0], [0, 1, 1, 1], NAMES)
    assert r["per_class_f1"] == pytest.approx({"happy": 2 / 3, "sad": 0.8, "neutral": 0.0})
    assert r["macro_f1"] == pytest.approx((2 / 3 + 0.8 + 0.0) / 3)


def test_f1_table_layout():
    report = {"dataset": "iemocap", "split": "test", "weighted_f1": 0.6543, "macro_f1": 0.4745, "accuracy": 0.7,
              "per_class_f1": {"happy": 0.5, "sad": 0.8, "neutral": 0.12345}}
    assert f1_table(report, row_name="ours").splitlines() == [
        "**iemocap test: per-class F1 (%), weighted F1, macro F1, accuracy**",
        "",
        "| Model | Happy | Sad | Neutral | W-F1 | M-F1 | Acc |",
        "|---|---:|---:|---:|---:|---:|---:|",
        "| ours | 50.00 | 80.00 | 12.35 | 65.43 | 47.45 | 70.00 |",
    ]
    del report["macro_f1"], report["accuracy"]     # an older report: the columns it has
    assert f1_table(report, row_name="ours").splitlines()[2:] == [
        "| Model | Happy | Sad | Neutral | W-F1 |", "|---|---:|---:|---:|---:|",
        "| ours | 50.00 | 80.00 | 12.35 | 65.43 |"]


def test_pngs(tmp_path):
    report = {"dataset": "x", "split": "test", "weighted_f1": 0.5, "per_class_f1": dict.fromkeys(NAMES, 0.5),
              "confusion_matrix": [[3, 1, 0], [0, 0, 0], [2, 0, 5]]}
    h, w, _ = _png_shape(save_confusion_png(report, tmp_path / "cm.png"))
    assert h > 200 and w > 200
    history = [{"epoch": e, "train_loss": 2.0 / e, "dev_weighted_f1": 0.1 * e} for e in (1, 2, 3)]
    h, w, _ = _png_shape(save_curves_png(history, tmp_path / "curves.png"))
    assert w > h > 200


def test_train_and_evaluate_write_reports(tmp_path, monkeypatch, capsys):
    from mcncl_fast.cli import main
    monkeypatch.setenv("MCNCL_FAST_BACKEND", "reference")   # plumbing under test, not the kernels
    out = tmp_path / "run"
    assert main(["train", "--synthetic-scale", "0.02", "--epochs", "2", "--batch-size", "8", "--d-model", "8",
                 "--num-layers", "1", "--num-heads", "2", "--proj-dim", "4", "--device", "cpu",
                 "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    table = (out / "test_f1_table.md").read_text()
    assert table in printed
    assert "| Neutral | Surprise | Fear | Sadness | Joy | Disgust | Anger | W-F1 | M-F1 | Acc |" in table
    assert (f"| {100 * report['weighted_f1']:.2f} | {100 * report['macro_f1']:.2f} | "
            f"{100 * report['accuracy']:.2f} |") in table
    assert report["macro_f1"] == pytest.approx(np.mean(list(report["per_class_f1"].values())), abs=1e-12)
    cm = np.asarray(report["confusion_matrix"])
    assert cm.shape == (7, 7) and cm.sum() == report["num_utterances"]
    assert np.trace(cm) / cm.sum() == pytest.approx(report["accuracy"])
    assert [h["epoch"] for h in report["history"]] == [1, 2]
    for name in ("test_confusion.png", "curves.png"):
        _png_shape(out / name)
    assert main(["evaluate", "--checkpoint", str(out / "best.pt"), "--split", "dev", "--device", "cpu",
                 "--output", str(tmp_path / "ev" / "dev.json")]) == 0
    ev = json.loads((tmp_path / "ev" / "dev.json").read_text())
    assert ev["split"] == "dev" and (tmp_path / "ev" / "dev_f1_table.md").is_file()
    _png_shape(tmp_path / "ev" / "dev_confusion.png")
    # the best checkpoint re-evaluated on dev gives the dev score recorded during training
    assert ev["weighted_f1"] == pytest.approx(report["best_dev_weighted_f1"], abs=1e-12)
