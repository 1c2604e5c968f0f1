"""Every accepted pickle layout, built here in the exact item order of the loader that reads it."""
import pickle

import numpy as np
import pytest
import torch

from mcncl_fast.data import LABEL_SETS, load_dataset
from mcncl_fast.data.errors import UserError
from mcncl_fast.data.pickles import load_erc_pickle
from mcncl_fast.data.splits import carve_dev


def _features(rng, n, dim, as_list):
    arr = rng.standard_normal((n, dim)).astype(np.float32)
    return [row for row in arr] if as_list else arr


def _dump(tmp_path, name, obj):
    path = tmp_path / name
    path.write_bytes(pickle.dumps(obj, protocol=2))
    return path


def _meld10(tmp_path, as_list=False, sentiment=True):
    """hujingwen6666/MMGCN dataloader.py MELDDataset and zerohd4869/MM-DFN code/dataloader.py MELDDataset unpack
    (videoIDs, videoSpeakers, videoLabels, videoText, videoAudio, videoVisual, videoSentence,
    trainVid, testVid, _): text 600-d, audio 300-d, visual 342-d per utterance, speakers one-hot."""
    rng = np.random.default_rng(10)
    train, test = list(range(0, 12)), list(range(1153, 1156))
    emo = {vid: [int(x) for x in rng.integers(0, 7, 2 + vid % 3)] for vid in train + test}
    emo[0] = [0, 4, 6, 1]                       # neutral, joy, anger, surprise
    sen = {vid: [int(x) for x in rng.integers(0, 3, len(emo[vid]))] for vid in emo}
    sen[0] = [0, 1, 2, 2]                       # the files' ids: neutral 0, positive 1, negative 2
    spk = {vid: [list(np.eye(9, dtype=int)[i % 3]) for i in range(len(emo[vid]))] for vid in emo}
    text = {vid: _features(rng, len(emo[vid]), 600, as_list) for vid in emo}
    audio = {vid: _features(rng, len(emo[vid]), 300, as_list) for vid in emo}
    visual = {vid: _features(rng, len(emo[vid]), 342, as_list) for vid in emo}
    ids = {vid: [f"{vid}_{i}" for i in range(len(emo[vid]))] for vid in emo}
    sent = {vid: [f"utterance {i}" for i in range(len(emo[vid]))] for vid in emo}
    obj = (ids, spk, emo, text, audio, visual, sent, train, test, sen if sentiment else None)
    return _dump(tmp_path, f"meld10_{as_list}_{sentiment}.pkl", obj), obj


def _cosmic(tmp_path, dataset):
    """declare-lab/conv-emotion COSMIC/erc-training/dataloader.py:
    IEMOCAPRobertaCometDataset: (speakers, labels, roberta1..4, sentences, trainIds, testIds, validIds), speakers
    'M'/'F'; MELDRobertaCometDataset: (speakers, emotion_labels, sentiment_labels, roberta1..4, sentences,
    trainIds, testIds, validIds), speakers one-hot (COSMIC/feature-extraction/roberta_feature_extract_meld.py
    writes each roberta item as a list of per-utterance 1024-d vectors)."""
    rng = np.random.default_rng(20 if dataset == "iemocap" else 21)
    if dataset == "iemocap":
        train, test, valid = [f"Ses0{i}F_impro0{i}" for i in range(1, 7)], ["Ses05M_script01"], ["Ses04M_impro02"]
    else:
        train, test, valid = [0, 1, 2, 3, 4], [1153, 1154], [1039, 1040]
    vids = train + test + valid
    labels = {vid: [int(x) for x in rng.integers(0, 6 if dataset == "iemocap" else 7, 3)] for vid in vids}
    labels[train[0]] = [0, 4, 5, 1, 2, 3, -1]
    if dataset == "iemocap":
        speakers = {vid: ["M" if i % 2 == 0 else "F" for i in range(len(labels[vid]))] for vid in vids}
    else:
        speakers = {vid: [list(np.eye(9, dtype=int)[(i * 2) % 5]) for i in range(len(labels[vid]))] for vid in vids}
    rob = [{vid: _features(rng, len(labels[vid]), 1024, True) for vid in vids} for _ in range(4)]
    sent = {vid: ["hi"] * len(labels[vid]) for vid in vids}
    if dataset == "iemocap":
        obj = (speakers, labels, *rob, sent, train, test, valid)
    else:
        sentiment = {vid: [int(x) for x in rng.integers(0, 3, len(labels[vid]))] for vid in vids}
        sentiment[train[0]] = [0, 1, 2, 0, 1, 2, -1]
        obj = (speakers, labels, sentiment, *rob, sent, train, test, valid)
    return _dump(tmp_path, f"cosmic_{dataset}.pkl", obj), obj


def _by_id(splits):
    return {d["id"]: d for part in (splits.train, splits.dev, splits.test) for d in part}


def test_meld10_mmgcn_layout(tmp_path):
    path, (ids, spk, emo, text, audio, visual, sent, train, test, sen) = _meld10(tmp_path)
    splits = load_dataset("meld", path)
    assert (splits.text_dim, splits.audio_dim, splits.visual_dim, splits.num_classes) == (600, 300, 342, 7)
    keep, dev = carve_dev(train)
    assert [d["id"] for d in splits.train] == [str(v) for v in keep] and [d["id"] for d in splits.dev] == \
        [str(v) for v in dev] and len(dev) == 1
    assert [d["id"] for d in splits.test] == ["1153", "1154", "1155"]
    got = _by_id(splits)
    for vid in train + test:
        d = got[str(vid)]
        np.testing.assert_array_equal(d["labels"].numpy(), emo[vid])
        np.testing.assert_array_equal(d["text"].numpy(), text[vid])
        np.testing.assert_array_equal(d["audio"].numpy(), audio[vid])
        assert [v.shape for v in d["visual"]] == [(1, 342)] * len(emo[vid])      # one frame per utterance
        np.testing.assert_array_equal(torch.cat(d["visual"]).numpy(), visual[vid])
        assert d["speakers"].tolist() == [i % 3 for i in range(len(emo[vid]))]   # one-hot -> index
    # a list of per-utterance vectors reads the same as a [S, D] array
    path_list, _ = _meld10(tmp_path, as_list=True)
    again = _by_id(load_dataset("meld", path_list))
    for vid, d in got.items():
        for key in ("text", "audio", "labels"):
            assert torch.equal(again[vid][key], d[key])
        assert all(torch.equal(a, b) for a, b in zip(again[vid]["visual"], d["visual"]))


def test_meld_sentiment_label_set(tmp_path):
    path, obj = _meld10(tmp_path)
    splits = load_dataset("meld", path, label_set="meld-sentiment")
    assert splits.class_names == ["negative", "neutral", "positive"] and splits.num_classes == 3
    # file ids neutral 0, positive 1, negative 2 -> ours negative 0, neutral 1, positive 2
    assert _by_id(splits)["0"]["labels"].tolist() == [1, 2, 0, 0]
    cpath, _ = _cosmic(tmp_path, "meld")
    csplits = load_dataset("meld", cpath, label_set="meld-sentiment")
    assert _by_id(csplits)["0"]["labels"].tolist() == [1, 2, 0, 1, 2, 0, -100]
    # DialogueRNN 9-tuple: the last item is the sentiment dict (DialogueRNN/dataloader.py, n_classes == 3)
    ids, spk, emo, text, audio, _, sent, train, test, sen = obj
    p9 = _dump(tmp_path, "meld9.pkl", (ids, spk, emo, text, audio, sent, train, test, sen))
    assert _by_id(load_dataset("meld", p9, label_set="meld-sentiment"))["0"]["labels"].tolist() == [1, 2, 0, 0]
    assert _by_id(load_dataset("meld", p9))["0"]["labels"].tolist() == [0, 4, 6, 1]
    # no sentiment labels in the file: a clear error
    nosent, _ = _meld10(tmp_path, sentiment=False)
    with pytest.raises(UserError, match=r"meld-sentiment needs the sentiment labels, but item 10 \(videoSentiment\)"):
        load_dataset("meld", nosent, label_set="meld-sentiment")
    with pytest.raises(UserError, match="only for MELD pickles"):
        load_dataset("iemocap", _cosmic(tmp_path, "iemocap")[0], label_set="meld-sentiment")


def test_iemocap4_label_set(tmp_path):
    path, obj = _cosmic(tmp_path, "iemocap")
    splits = load_dataset("iemocap", path, label_set="iemocap-4")
    assert splits.class_names == ["happy", "sad", "neutral", "angry"]
    # file: happy, excited, frustrated, sad, neutral, angry, unlabelled
    d = _by_id(splits)["Ses01F_impro01"]
    assert d["labels"].tolist() == [0, 0, -100, 1, 2, 3, -100]
    assert d["text"].shape == (7, 1024)          # dropped utterances stay in place, in order
    assert [x["id"] for x in splits.train] == sorted(obj[7])
    with pytest.raises(UserError, match="only for IEMOCAP pickles"):
        load_dataset("meld", _meld10(tmp_path)[0], label_set="iemocap-4")
    with pytest.raises(UserError, match="only for --dataset meld/iemocap"):
        load_dataset("synthetic", label_set="iemocap-4")
    with pytest.raises(UserError, match="expected one of meld-sentiment, iemocap-4"):
        load_dataset("iemocap", path, label_set="iemocap-5")
    assert LABEL_SETS == ("meld-sentiment", "iemocap-4")


@pytest.mark.parametrize("dataset", ["iemocap", "meld"])
def test_cosmic_roberta_layouts(tmp_path, dataset):
    path, obj = _cosmic(tmp_path, dataset)
    speakers, labels = obj[0], obj[1]
    rob = obj[2:6] if dataset == "iemocap" else obj[3:7]
    train, test, valid = obj[-3:]
    splits = load_dataset(dataset, path)
    assert (splits.text_dim, splits.audio_dim, splits.visual_dim) == (1024, 1, 1)
    assert splits.num_classes == (6 if dataset == "iemocap" else 7)
    # validIds is the dev split: nothing is carved from trainIds
    assert [d["id"] for d in splits.train] == [str(v) for v in sorted(train)]
    assert [d["id"] for d in splits.dev] == [str(v) for v in valid]
    assert [d["id"] for d in splits.test] == [str(v) for v in test]
    got = _by_id(splits)
    for vid in train + test + valid:
        d = got[str(vid)]
        n = len(labels[vid])
        expected = [x if x != -1 else -100 for x in labels[vid]]
        assert d["labels"].tolist() == expected
        mean = (np.stack(rob[0][vid]) + np.stack(rob[1][vid]) + np.stack(rob[2][vid]) + np.stack(rob[3][vid])) / 4
        np.testing.assert_allclose(d["text"].numpy(), mean, rtol=1e-6, atol=1e-6)
        assert torch.equal(d["audio"], torch.zeros(n, 1))                       # no audio: a zero stream of dim 1
        assert all(torch.equal(v, torch.zeros(1, 1)) for v in d["visual"])    # no visual: one zero frame of dim 1
        if dataset == "iemocap":
            assert d["speakers"].tolist() == [0 if s == "M" else 1 for s in speakers[vid]]
        else:
            assert d["speakers"].tolist() == [(i * 2) % 5 for i in range(n)]
    vid = train[0]
    concat = load_erc_pickle(dataset, path, roberta="concat")
    assert concat.text_dim == 4096
    np.testing.assert_array_equal(_by_id(concat)[str(vid)]["text"].numpy(),
                                  np.concatenate([np.stack(r[vid]) for r in rob], axis=1))
    third = load_erc_pickle(dataset, path, roberta="roberta3")
    np.testing.assert_array_equal(_by_id(third)[str(vid)]["text"].numpy(), np.stack(rob[2][vid]))
    with pytest.raises(UserError, match="roberta: expected one of mean, concat"):
        load_erc_pickle(dataset, path, roberta="sum")


def test_letter_and_one_hot_speakers(tmp_path):
    path, obj = _meld10(tmp_path)
    ids, spk, emo, text, audio, visual, sent, train, test, sen = obj
    letters = {vid: ["Joey" if i % 3 == 1 else "Rachel" for i in range(len(emo[vid]))] for vid in emo}
    p = _dump(tmp_path, "letters.pkl", (ids, letters, emo, text, audio, visual, sent, train, test, sen))
    got = _by_id(load_dataset("meld", p))
    assert got["0"]["speakers"].tolist() == [0, 1, 0, 0]       # numbered in order of appearance
    bad = dict(spk)
    bad[0] = [[1, 0], [1, 1], [0, 1], [1, 0]]
    p = _dump(tmp_path, "badspk.pkl", (ids, bad, emo, text, audio, visual, sent, train, test, sen))
    with pytest.raises(UserError, match=r"dialogue 0: videoSpeakers, utterance 1: "
                                        r"speaker \[1.0, 1.0\] is not a one-hot"):
        load_dataset("meld", p)


def test_layout_recognition_errors(tmp_path):
    path, obj = _meld10(tmp_path)
    with pytest.raises(UserError, match="is this the MELD layout") as exc:
        load_dataset("iemocap", path)
    assert "meld-10 layout (MMGCN/MM-DFN MELD_features_raw1.pkl)" in str(exc.value)
    with pytest.raises(UserError, match="is this the IEMOCAP layout"):
        load_dataset("meld", _cosmic(tmp_path, "iemocap")[0])
    # an unknown layout: every accepted layout is listed with its items
    p = _dump(tmp_path, "eight.pkl", tuple({} for _ in range(8)))
    with pytest.raises(UserError, match="got a tuple of 8 items") as exc:
        load_dataset("meld", p)
    msg = str(exc.value)
    assert "\n" not in msg
    for items in ("videoIDs, videoSpeakers, videoLabels, videoText, videoAudio, videoVisual, videoSentence, "
                  "trainVid, testVid)",
                  "videoIDs, videoSpeakers, videoLabels, videoText, videoAudio, videoSentence, trainVid, testVid, "
                  "videoSentiment)",
                  "videoIDs, videoSpeakers, videoLabels, videoText, videoAudio, videoVisual, videoSentence, "
                  "trainVid, testVid, videoSentiment)",
                  "speakers, labels, roberta1, roberta2, roberta3, roberta4, sentences, trainIds, testIds, validIds",
                  "speakers, emotion_labels, sentiment_labels, roberta1, roberta2, roberta3, roberta4, sentences, "
                  "trainIds, testIds, validIds"):
        assert items in msg
    # the right length, one item of the wrong kind: the item is named
    broken = list(obj)
    broken[7] = {"not": "ids"}
    p = _dump(tmp_path, "broken.pkl", tuple(broken))
    with pytest.raises(UserError, match=r"fits no accepted layout: item 8 \(trainVid\) of the meld-10 layout"):
        load_dataset("meld", p)
    p = _dump(tmp_path, "dict.pkl", {"a": 1})
    with pytest.raises(UserError, match="got a dict, expected a pickled tuple"):
        load_dataset("meld", p)
