"""The checks every loader runs when data loads: one-line UserErrors naming the dialogue and utterance."""
import pickle

import numpy as np
import pytest
import torch

from mcncl_fast.data import load_dataset
from mcncl_fast.data.errors import UserError
from mcncl_fast.data.splits import carve_dev
from mcncl_fast.data.store import split_path, write_split


def _iemocap(**change):
    """The IEMOCAP 9-tuple of declare-lab/conv-emotion DialogueRNN/dataloader.py IEMOCAPDataset:
    (videoIDs, videoSpeakers, videoLabels, videoText, videoAudio, videoVisual, videoSentence, trainVid, testVid)."""
    rng = np.random.default_rng(5)
    train, test = [f"d{i}" for i in range(6)], ["t0", "t1"]
    lab = {v: [int(x) for x in rng.integers(0, 6, 3)] for v in train + test}
    f = {
        "videoIDs": {v: [f"{v}_{i}" for i in range(3)] for v in lab},
        "videoSpeakers": {v: ["M", "F", "M"] for v in lab},
        "videoLabels": lab,
        "videoText": {v: [rng.standard_normal(4).astype(np.float32) for _ in range(3)] for v in lab},
        "videoAudio": {v: rng.standard_normal((3, 2)).astype(np.float32) for v in lab},
        "videoVisual": {v: [rng.standard_normal(5).astype(np.float32) for _ in range(3)] for v in lab},
        "videoSentence": {v: ["a", "b", "c"] for v in lab},
        "trainVid": train, "testVid": test,
    }
    for key, value in change.items():
        f[key] = value(f[key]) if callable(value) else value
    return tuple(f[k] for k in ("videoIDs", "videoSpeakers", "videoLabels", "videoText", "videoAudio", "videoVisual",
                                "videoSentence", "trainVid", "testVid"))


def _load(tmp_path, obj, **kw):
    path = tmp_path / "x.pkl"
    path.write_bytes(pickle.dumps(obj))
    return load_dataset("iemocap", path, **kw)


def _set(d, vid, value):
    d = dict(d)
    d[vid] = value
    return d


def _one_line(exc):
    assert "\n" not in str(exc.value)


def test_non_finite_features(tmp_path):
    def text(d):
        d = _set(d, "d2", [v.copy() for v in d["d2"]])
        d["d2"][2][1] = np.nan
        return d
    with pytest.raises(UserError, match=r"dialogue 'd2', utterance 2: non-finite videoText feature value \(nan\)") as e:
        _load(tmp_path, _iemocap(videoText=text))
    _one_line(e)

    def audio(d):
        d = _set(d, "t1", d["t1"].copy())
        d["t1"][1, 0] = np.inf
        return d
    with pytest.raises(UserError, match=r"dialogue 't1', utterance 1: non-finite audio feature value \(inf\)"):
        _load(tmp_path, _iemocap(videoAudio=audio))

    def visual(d):
        d = _set(d, "d0", [v.copy() for v in d["d0"]])
        d["d0"][0][4] = -np.inf
        return d
    with pytest.raises(UserError, match=r"dialogue 'd0', utterance 0: non-finite visual feature value \(-inf\)"):
        _load(tmp_path, _iemocap(videoVisual=visual))


def test_labels_whole_in_range_and_unlabelled(tmp_path):
    with pytest.raises(UserError, match=r"dialogue 'd1': videoLabels, utterance 1: label 1.7 is not a whole-number"):
        _load(tmp_path, _iemocap(videoLabels=lambda d: _set(d, "d1", [0.0, 1.7, 2.0])))
    splits = _load(tmp_path, _iemocap(videoLabels=lambda d: _set(d, "d1", [0.0, 5.0, 2.0])))
    got = {x["id"]: x for s in (splits.train, splits.dev, splits.test) for x in s}
    assert got["d1"]["labels"].tolist() == [0, 5, 2] and got["d1"]["labels"].dtype == torch.int64
    with pytest.raises(UserError, match=r"dialogue 't0': videoLabels, utterance 2: label 6 is not one of the class "
                                        r"ids in \[0, 6\) \(happy, sad, neutral, angry, excited, frustrated\)"):
        _load(tmp_path, _iemocap(videoLabels=lambda d: _set(d, "t0", [0, 1, 6])))
    with pytest.raises(UserError, match="utterance 0: label -2 is not one of the class ids"):
        _load(tmp_path, _iemocap(videoLabels=lambda d: _set(d, "t0", [-2, 1, 1])))
    # -1 (unlabelled) and -100 are the ignore label
    splits = _load(tmp_path, _iemocap(videoLabels=lambda d: _set(d, "t0", [-1, 3, -100])))
    assert splits.test[0]["id"] == "t0" and splits.test[0]["labels"].tolist() == [-100, 3, -100]


def test_split_ids(tmp_path):
    with pytest.raises(UserError, match=r"dialogue id 't1' is in both trainVid \(train\) and testVid \(test\)") as e:
        _load(tmp_path, _iemocap(trainVid=lambda ids: ids + ["t1"]))
    _one_line(e)
    with pytest.raises(UserError, match="trainVid lists dialogue id 'd3' 2 times"):
        _load(tmp_path, _iemocap(trainVid=lambda ids: ids + ["d3"]))
    with pytest.raises(UserError, match="the dev split would be empty after carving it from 1 train dialogue"):
        _load(tmp_path, _iemocap(trainVid=["d0"]))


def test_visual_dim_mismatch_names_the_odd_utterance(tmp_path):
    first = carve_dev([f"d{i}" for i in range(6)])[0][0]      # the first dialogue the loader reads

    def visual(d):
        d = _set(d, first, list(d[first]))
        d[first][0] = np.zeros(4, np.float32)                 # every other utterance has 5
        return d
    with pytest.raises(UserError, match=rf"dialogue '{first}', utterance 0: visual feature dim 4 differs from 5, "
                                        r"the dim of 23 other utterances"):
        _load(tmp_path, _iemocap(videoVisual=visual))
    with pytest.raises(UserError, match=r"dialogue 'd4': videoText, utterance 1: "
                                        r"expected a feature vector of length 4"):
        _load(tmp_path, _iemocap(videoText=lambda d: _set(d, "d4", [d["d4"][0], d["d4"][1][:3], d["d4"][2]])))


def _store_dialogues(n, nan_at=None, labels=None):
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        d = {"id": f"dia{i}", "text": torch.randn(3, 4, generator=g), "audio": torch.randn(3, 2, generator=g),
             "visual": [torch.randn(2, 3, generator=g) for _ in range(3)], "labels": torch.tensor([0, 1, 2])}
        out.append(d)
    if nan_at is not None:
        out[nan_at[0]]["visual"][nan_at[1]][1, 2] = float("nan")
    if labels is not None:
        out[labels[0]]["labels"] = torch.tensor(labels[1])
    return out


def test_feature_store_validation(tmp_path):
    write_split(split_path(tmp_path, "test"), _store_dialogues(2), ["a", "b", "c"], "test")
    write_split(split_path(tmp_path, "train"), _store_dialogues(5, nan_at=(3, 1)), ["a", "b", "c"])
    with pytest.raises(UserError, match=r"train.safetensors: dialogue 'dia3', utterance 1: non-finite visual"):
        load_dataset("features", tmp_path)
    write_split(split_path(tmp_path, "train"), _store_dialogues(5, labels=(2, [0, 3, 1])), ["a", "b", "c"])
    with pytest.raises(UserError, match=r"dialogue 'dia2', utterance 1: label 3 is not one of the class ids "
                                        r"in \[0, 3\)"):
        load_dataset("features", tmp_path)
    write_split(split_path(tmp_path, "train"), _store_dialogues(5, labels=(4, [0, -1, 1])), ["a", "b", "c"])
    splits = load_dataset("features", tmp_path)
    got = {splits.train[i]["id"]: splits.train[i] for i in range(len(splits.train))}
    got.update({splits.dev[i]["id"]: splits.dev[i] for i in range(len(splits.dev))})
    assert got["dia4"]["labels"].tolist() == [0, -100, 1] and got["dia0"]["labels"].tolist() == [0, 1, 2]
    dup = _store_dialogues(3)
    dup[2]["id"] = "dia0"
    write_split(split_path(tmp_path, "train"), dup, ["a", "b", "c"])
    with pytest.raises(UserError, match="dialogue id 'dia0' appears 2 times in this split file"):
        load_dataset("features", tmp_path)
    write_split(split_path(tmp_path, "train"), _store_dialogues(1), ["a", "b", "c"])
    with pytest.raises(UserError, match="the dev split would be empty after carving it from 1 train dialogue"):
        load_dataset("features", tmp_path)
