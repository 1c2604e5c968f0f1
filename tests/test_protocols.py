"""Label sets and RoBERTa modes through the command line; class weights (computation, loss, both models)."""
import csv
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.utils.class_weight import compute_class_weight

import mcncl_fast
from mcncl_fast import distributed, reference
from mcncl_fast.checkpoints import load_checkpoint
from mcncl_fast.cli import main
from mcncl_fast.data import load_dataset
from mcncl_fast.imbalance import balanced_class_weights, split_labels
from mcncl_fast.reference.model import mcncl_loss
from tests.erc_helpers import (IEMOCAP_NAMES, MELD_SENTIMENT_FILE, TINY, TINY_SYNTHETIC, cosmic_iemocap_10,
                                iemocap_9, meld_9)
from tests.helpers import INTERPRET, spy_host_reads

TRAIN = [f"d{i:02d}" for i in range(12)]
TEST = ["t1", "t2", "t3", "t4"]


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    monkeypatch.setenv("MCNCL_FAST_BACKEND", "reference")   # plumbing under test, not the kernels


def _train(tmp_path, *args):
    out = tmp_path / "run"
    assert main(["train", "--output-dir", str(out), *TINY, *args]) == 0
    return out, json.loads((out / "report.json").read_text())


# ----------------------------------------------------------------------------- label sets, RoBERTa modes
def test_meld_sentiment_through_the_cli(tmp_path):
    data = tmp_path / "meld.pkl"
    _, sentiment = meld_9(data, list(range(12)), [100, 101, 102, 103])
    out, report = _train(tmp_path, "--dataset", "meld", "--data-path", str(data), "--label-set", "meld-sentiment")
    assert report["class_names"] == ["negative", "neutral", "positive"]
    names = [MELD_SENTIMENT_FILE[s] for vid in (100, 101, 102, 103) for s in sentiment[vid]]
    assert report["support"] == {c: names.count(c) for c in ["negative", "neutral", "positive"]}
    assert load_checkpoint(out / "best.pt")["train_config"]["label_set"] == "meld-sentiment"
    # evaluate reloads the data with the checkpoint's label set
    assert main(["evaluate", "--checkpoint", str(out / "best.pt"), "--output", str(tmp_path / "ev.json")]) == 0
    again = json.loads((tmp_path / "ev.json").read_text())
    assert again["weighted_f1"] == pytest.approx(report["weighted_f1"], abs=1e-12)


def test_iemocap_4_through_the_cli(tmp_path):
    data = tmp_path / "iemocap.pkl"
    labels = iemocap_9(data, TRAIN, TEST, seed=3)
    out, report = _train(tmp_path, "--dataset", "iemocap", "--data-path", str(data), "--label-set", "iemocap-4")
    test = [IEMOCAP_NAMES[y] for vid in TEST for y in labels[vid]]
    assert report["class_names"] == ["happy", "sad", "neutral", "angry"]
    assert report["support"] == {"happy": test.count("happy") + test.count("excited"), "sad": test.count("sad"),
                                 "neutral": test.count("neutral"), "angry": test.count("angry")}
    assert report["num_utterances"] == len(test) - test.count("frustrated")
    # predict: 4 classes, and a row for every utterance (frustrated ones included)
    assert main(["predict", "--checkpoint", str(out / "best.pt"), "--split", "test",
                 "--output", str(tmp_path / "p.csv")]) == 0
    with open(tmp_path / "p.csv", newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert [c for c in reader.fieldnames if c.startswith("prob_")] == ["prob_happy", "prob_sad", "prob_neutral",
                                                                      "prob_angry"]
    assert len(rows) == len(test)


def test_label_set_for_the_wrong_data_is_a_one_line_error(tmp_path, capsys):
    data = tmp_path / "iemocap.pkl"
    iemocap_9(data, TRAIN, TEST)
    assert main(["train", "--dataset", "iemocap", "--data-path", str(data), "--label-set", "meld-sentiment",
                 "--output-dir", str(tmp_path / "run"), *TINY]) == 2
    err = capsys.readouterr().err.strip()
    assert "meld-sentiment" in err and "\n" not in err


@pytest.mark.parametrize("mode,layers", [("concat", [0, 1, 2, 3]), ("roberta2", [1])])
def test_roberta_mode_through_the_cli(tmp_path, mode, layers):
    data = tmp_path / "cosmic.pkl"
    arrays = cosmic_iemocap_10(data, TRAIN, TEST, ["v1", "v2"], dim=6)
    out, report = _train(tmp_path, "--dataset", "iemocap", "--data-path", str(data), "--roberta", mode)
    state = load_checkpoint(out / "best.pt")
    assert state["model_config"]["text_dim"] == 6 * len(layers) and state["train_config"]["roberta"] == mode
    splits = load_dataset("iemocap", data, roberta=mode)
    d = splits.test[0]
    np.testing.assert_array_equal(d["text"].numpy(), np.concatenate([arrays[d["id"]][i] for i in layers], axis=1))
    # evaluate rebuilds the same text stream (another mode would not fit the model)
    assert main(["evaluate", "--checkpoint", str(out / "best.pt"), "--output", str(tmp_path / "ev.json")]) == 0
    again = json.loads((tmp_path / "ev.json").read_text())
    assert again["weighted_f1"] == pytest.approx(report["weighted_f1"], abs=1e-12)


def test_roberta_mode_elsewhere_is_a_one_line_error(tmp_path, capsys):
    assert main(["train", "--roberta", "concat", "--output-dir", str(tmp_path / "run"), *TINY_SYNTHETIC]) == 2
    err = capsys.readouterr().err.strip()
    assert "--roberta" in err and "\n" not in err


# ----------------------------------------------------------------------------- class weights
def test_balanced_weights_by_hand_and_as_scikit_learn():
    # n = 6 labelled (-100 and -1 are not counted), K = 4: w_c = 6 / (4 n_c); class 3 never occurs -> 0
    assert balanced_class_weights([0, 0, 0, 1, 2, 2, -100, -1], 4) == pytest.approx([6 / 12, 6 / 4, 6 / 8, 0.0])
    y = [0, 0, 0, 1, 2, 2, 3, 3, 3, 3]
    expected = compute_class_weight("balanced", classes=np.arange(4), y=np.array(y))
    assert balanced_class_weights(y, 4) == pytest.approx(expected.tolist(), rel=1e-15)
    assert balanced_class_weights(y, 4) == pytest.approx([10 / 12, 10 / 4, 10 / 8, 10 / 16])


def _batch(num_classes=4, b=3, s=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (b, s), generator=g)
    labels[0, 1] = -100                                       # an ignored utterance
    mask = torch.ones(b, s, dtype=torch.bool)
    mask[2, 3:] = False                                       # padding (its label is not used)
    return labels, mask, g


def test_weighted_cross_entropy_is_the_weighted_mean():
    weights = (0.5, 2.0, 1.25, 3.0)
    labels, mask, g = _batch()
    logits = torch.randn(3, 5, 4, generator=g)
    projections = {m: torch.randn(3, 5, 8, generator=g) for m in "tav"}
    cfg = mcncl_fast.ModelConfig(num_classes=4, class_weights=weights)
    plain = mcncl_fast.ModelConfig(num_classes=4)
    out = mcncl_loss(cfg, logits, projections, labels, mask, reference.ops.supcon_hard_negative_loss)
    base = mcncl_loss(plain, logits, projections, labels, mask, reference.ops.supcon_hard_negative_loss)
    valid = mask & (labels != -100)
    y, z = labels[valid], logits[valid]
    w = torch.tensor(weights)
    assert out["ce_loss"] == pytest.approx(F.cross_entropy(z, y, weight=w).item(), rel=1e-6)
    by_hand = sum(weights[t] * -torch.log_softmax(z[i], -1)[t].item() for i, t in enumerate(y.tolist()))
    assert out["ce_loss"].item() == pytest.approx(by_hand / sum(weights[t] for t in y.tolist()), rel=1e-6)
    assert base["ce_loss"].item() == pytest.approx(F.cross_entropy(z, y).item(), rel=1e-6)
    torch.testing.assert_close(out["contrastive_loss"], base["contrastive_loss"])   # the SupCon terms are unweighted
    empty = mcncl_loss(cfg, logits, projections, labels, torch.zeros_like(mask),
                       reference.ops.supcon_hard_negative_loss)
    assert empty["ce_loss"].item() == 0.0


def test_both_models_and_the_global_batch_loss_use_the_weights():
    cfg = mcncl_fast.ModelConfig(text_dim=12, audio_dim=6, visual_dim=8, d_model=16, num_layers=1, num_heads=2,
                                 proj_dim=8, num_classes=4, dropout=0.0, class_weights=(0.5, 2.0, 1.25, 3.0))
    labels, mask, g = _batch()
    inputs = dict(text=torch.randn(3, 5, 12, generator=g), audio=torch.randn(3, 5, 6, generator=g),
                  visual=torch.randn(3, 5, 2, 8, generator=g), utterance_mask=mask)
    ref = reference.Model(cfg).eval()
    fast = mcncl_fast.Model(cfg).eval()
    fast.load_state_dict(ref.state_dict())
    valid = mask & (labels != -100)
    for model in (ref, fast):
        out = model(**inputs, labels=labels)
        expected = F.cross_entropy(out.logits[valid], labels[valid], weight=torch.tensor(cfg.class_weights))
        assert out.ce_loss.item() == pytest.approx(expected.item(), rel=1e-5)
        total = distributed.global_batch_loss(out.logits, out.features, labels, mask, cfg,
                                              reference.ops.supcon_hard_negative_loss)
        assert total["ce_loss"].item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.skipif(not INTERPRET, reason="the Triton path runs through the interpreter here")
def test_weighted_training_step_has_no_host_sync(monkeypatch):
    from benchmarks.device_ops import DeviceOps
    monkeypatch.delenv("MCNCL_FAST_BACKEND")
    cfg = mcncl_fast.ModelConfig(text_dim=12, audio_dim=6, visual_dim=8, d_model=16, num_layers=1, num_heads=2,
                                 proj_dim=8, num_classes=4, class_weights=(0.5, 2.0, 1.25, 3.0))
    model = mcncl_fast.Model(cfg)
    labels, mask, g = _batch()
    batch = dict(text=torch.randn(3, 5, 12, generator=g), audio=torch.randn(3, 5, 6, generator=g),
                 visual=torch.randn(3, 5, 2, 8, generator=g), utterance_mask=mask, labels=labels)
    host_reads = spy_host_reads(monkeypatch)
    with DeviceOps() as recorder:
        model(**batch).loss.backward()
    assert recorder.syncs == [] and host_reads == [], (recorder.syncs, host_reads)


def test_class_weights_through_the_cli(tmp_path):
    out, report = _train(tmp_path, "--class-weights", "balanced", "--synthetic-scale", "0.02")
    state = load_checkpoint(out / "best.pt")
    assert state["train_config"]["class_weights"] == "balanced"
    train = load_dataset("synthetic", seed=0, synthetic_scale=0.02).train
    y = np.concatenate([train[i]["labels"].numpy() for i in range(len(train))])
    np.testing.assert_array_equal(split_labels(train), y)
    counts = np.bincount(y, minlength=7)
    expected = [len(y) / (7 * c) if c else 0.0 for c in counts]
    assert state["model_config"]["class_weights"] == pytest.approx(expected, rel=1e-15)
    # without the option: no weights
    out2, _ = _train(tmp_path / "plain", "--synthetic-scale", "0.02")
    assert load_checkpoint(out2 / "best.pt")["model_config"]["class_weights"] is None


def test_bad_class_weights_are_refused():
    with pytest.raises(ValueError, match="class_weights"):
        mcncl_fast.ModelConfig(num_classes=3, class_weights=(1.0, 2.0))
    with pytest.raises(ValueError, match="class_weights"):
        mcncl_fast.ModelConfig(num_classes=2, class_weights=(1.0, float("nan")))
    assert mcncl_fast.ModelConfig.from_dict({"num_classes": 2, "class_weights": [1, 2]}).class_weights == (1.0, 2.0)
