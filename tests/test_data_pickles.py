"""DialogueRNN-family pickles, built here with the exact 9-tuple layouts (test_data_layouts.py: the others)."""
import pickle

import numpy as np
import pytest
import torch

from mcncl_fast.data import DATASETS, collate_dialogues, load_dataset
from mcncl_fast.data.errors import UserError
from mcncl_fast.data.pickles import IEMOCAP_CLASSES, MELD_CLASSES
from mcncl_fast.data.splits import carve_dev


def _dialogues(rng, ids, num_classes, dt, da, dv=None, frames=False):
    out = {k: {} for k in ("ids", "spk", "lab", "text", "audio", "vis", "sent")}
    for vid in ids:
        n = int(rng.integers(1, 6))
        out["ids"][vid] = [f"{vid}_u{i}" for i in range(n)]
        out["spk"][vid] = ["M" if i % 2 else "F" for i in range(n)]
        out["lab"][vid] = [int(x) for x in rng.integers(0, num_classes, n)]
        out["text"][vid] = [rng.standard_normal(dt).astype(np.float32) for _ in range(n)]   # list of vectors
        out["audio"][vid] = rng.standard_normal((n, da)).astype(np.float32)                 # [n, Da] array
        if dv is not None:
            out["vis"][vid] = ([rng.standard_normal((int(rng.integers(1, 4)), dv)).astype(np.float32)
                                for _ in range(n)] if frames
                               else [rng.standard_normal(dv).astype(np.float32) for _ in range(n)])
        out["sent"][vid] = [f"utterance {i}" for i in range(n)]
    return out


def _iemocap(tmp_path, frames=False, name="iemocap.pkl"):
    # declare-lab/conv-emotion DialogueRNN/dataloader.py IEMOCAPDataset (and zerohd4869/MM-DFN code/dataloader.py)
    rng = np.random.default_rng(1)
    train, test = ([f"Ses0{i}F_impro0{i}" for i in range(1, 10)] + ["Ses05M_script01"],
                   ["Ses05F_impro01", "Ses05F_impro02"])
    d = _dialogues(rng, train + test, 6, dt=10, da=7, dv=5, frames=frames)
    obj = (d["ids"], d["spk"], d["lab"], d["text"], d["audio"], d["vis"], d["sent"], train, test)
    path = tmp_path / name
    path.write_bytes(pickle.dumps(obj, protocol=2))
    return path, d, train, test


def _meld(tmp_path):
    # declare-lab/conv-emotion DialogueGCN/dataloader.py MELDDataset: the 9th item is videoLabelsSentiment;
    # None here (a file without it still loads with the emotion labels)
    rng = np.random.default_rng(2)
    train, test = list(range(0, 20)), list(range(100, 104))
    d = _dialogues(rng, train + test, 7, dt=12, da=9)
    obj = (d["ids"], d["spk"], d["lab"], d["text"], d["audio"], d["sent"], train, test, None)
    path = tmp_path / "meld.pkl"
    path.write_bytes(pickle.dumps(obj))
    return path, d, train, test


def test_registry():
    assert DATASETS == ("synthetic", "meld", "iemocap", "features")


def test_iemocap_layout(tmp_path):
    path, d, train, test = _iemocap(tmp_path)
    splits = load_dataset("iemocap", path)
    assert splits.class_names == ["happy", "sad", "neutral", "angry", "excited", "frustrated"] == IEMOCAP_CLASSES
    assert (splits.text_dim, splits.audio_dim, splits.visual_dim, splits.num_classes) == (10, 7, 5, 6)
    assert len(splits.train) + len(splits.dev) == len(train) and len(splits.dev) == 1
    assert sorted(x["id"] for x in splits.test) == sorted(test)
    seen = {x["id"]: x for s in (splits.train, splits.dev, splits.test) for x in s}
    for vid in train + test:
        x = seen[vid]
        np.testing.assert_array_equal(x["labels"].numpy(), d["lab"][vid])
        np.testing.assert_array_equal(x["text"].numpy(), np.stack(d["text"][vid]))
        np.testing.assert_array_equal(x["audio"].numpy(), d["audio"][vid])
        assert all(v.shape == (1, 5) for v in x["visual"])            # utterance-level vector -> L = 1
        assert x["speakers"].tolist() == [0 if s == "M" else 1 for s in d["spk"][vid]]
        np.testing.assert_array_equal(torch.cat(x["visual"]).numpy(), np.stack(d["vis"][vid]))
    batch = collate_dialogues(list(splits.train)[:3])
    assert batch["visual"].shape[2] == 1


def test_iemocap_per_frame_visual_keeps_frames(tmp_path):
    path, d, train, test = _iemocap(tmp_path, frames=True)
    splits = load_dataset("iemocap", path)
    x = next(iter(splits.test))
    for v, ref in zip(x["visual"], d["vis"][x["id"]]):
        np.testing.assert_array_equal(v.numpy(), ref)
    assert max(v.shape[0] for v in x["visual"]) >= 1


def test_meld_layout_zero_visual_and_visual_file(tmp_path):
    path, d, train, test = _meld(tmp_path)
    splits = load_dataset("meld", path)
    assert splits.class_names == ["neutral", "surprise", "fear", "sadness", "joy", "disgust", "anger"] == MELD_CLASSES
    assert (splits.text_dim, splits.audio_dim, splits.visual_dim, splits.num_classes) == (12, 9, 1, 7)
    assert len(splits.dev) == 2 and len(splits.train) == 18
    x = next(iter(splits.test))
    assert all(v.shape == (1, 1) and not v.any() for v in x["visual"])
    # user-supplied visual: per-utterance [frames, Dv] arrays, keyed by dialogue id
    rng = np.random.default_rng(3)
    vis = {vid: [rng.standard_normal((2 + (i % 2), 4)).astype(np.float32) for i in range(len(d["lab"][vid]))]
           for vid in train + test}
    vpath = tmp_path / "meld_visual.pkl"
    vpath.write_bytes(pickle.dumps(vis))
    splits = load_dataset("meld", path, visual_path=vpath)
    assert splits.visual_dim == 4
    x = next(iter(splits.test))
    for v, ref in zip(x["visual"], vis[int(x["id"])]):
        np.testing.assert_array_equal(v.numpy(), ref)
    del vis[train[3]]
    vpath.write_bytes(pickle.dumps(vis))
    with pytest.raises(UserError, match="no visual features for dialogue 3"):
        load_dataset("meld", path, visual_path=vpath)


def test_dev_split_is_deterministic_and_disjoint():
    ids = [f"d{i}" for i in range(50)]
    a = carve_dev(ids)
    b = carve_dev(list(reversed(ids)))
    assert a == b and len(a[1]) == 5 and not set(a[0]) & set(a[1]) and sorted(a[0] + a[1]) == sorted(ids)


def test_wrong_and_truncated_files(tmp_path):
    path, *_ = _iemocap(tmp_path)
    data = path.read_bytes()
    (tmp_path / "trunc.pkl").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=r"truncated.*9-tuple \(videoIDs, videoSpeakers") as exc:
        load_dataset("iemocap", tmp_path / "trunc.pkl")
    assert "\n" not in str(exc.value) and "videoVisual, videoSentence, trainVid, testVid" in str(exc.value)
    with pytest.raises(UserError, match="is this the IEMOCAP layout"):
        load_dataset("meld", path)                       # IEMOCAP file given as MELD
    (tmp_path / "seven.pkl").write_bytes(pickle.dumps(tuple(range(7))))
    with pytest.raises(UserError, match="got a tuple of 7 items"):
        load_dataset("meld", tmp_path / "seven.pkl")
    with pytest.raises(UserError, match="no such file"):
        load_dataset("iemocap", tmp_path / "missing.pkl")
    with pytest.raises(UserError, match="required"):
        load_dataset("meld", None)
    # a label outside the class list, a feature row count that does not match the labels
    obj = list(pickle.loads(data))
    vid = obj[7][0]
    obj[2] = {**obj[2], vid: [0, 6]}
    obj[3] = {**obj[3], vid: obj[3][vid][:2]}
    obj[4] = {**obj[4], vid: obj[4][vid][:2]}
    obj[5] = {**obj[5], vid: obj[5][vid][:2]}
    (tmp_path / "badlabel.pkl").write_bytes(pickle.dumps(tuple(obj)))
    with pytest.raises(UserError, match=r"class ids in \[0, 6\)"):
        load_dataset("iemocap", tmp_path / "badlabel.pkl")
    obj[2] = {**obj[2], vid: [0, 1, 2]}
    (tmp_path / "rows.pkl").write_bytes(pickle.dumps(tuple(obj)))
    with pytest.raises(UserError, match=r"videoText: expected shape \(3, D\)"):
        load_dataset("iemocap", tmp_path / "rows.pkl")


def test_cli_trains_on_pickles_and_reports_one_line_errors(tmp_path, monkeypatch, capsys):
    from mcncl_fast.cli import main
    monkeypatch.setenv("MCNCL_FAST_BACKEND", "reference")   # the data plumbing is under test, not the kernels
    path, *_ = _iemocap(tmp_path)
    tiny = ["--epochs", "1", "--batch-size", "4", "--d-model", "8", "--num-layers", "1", "--num-heads", "2",
            "--proj-dim", "4", "--device", "cpu"]
    assert main(["train", "--dataset", "iemocap", "--data-path", str(path), "--output-dir", str(tmp_path / "i"),
                 *tiny]) == 0
    assert "| Model | Happy | Sad | Neutral | Angry | Excited | Frustrated | W-F1 |" in capsys.readouterr().out
    mpath, *_ = _meld(tmp_path)
    assert main(["train", "--dataset", "meld", "--data-path", str(mpath), "--output-dir", str(tmp_path / "m"),
                 *tiny]) == 0
    assert main(["evaluate", "--checkpoint", str(tmp_path / "m" / "best.pt"), "--device", "cpu"]) == 0
    capsys.readouterr()
    (tmp_path / "trunc.pkl").write_bytes(path.read_bytes()[:100])
    assert main(["train", "--dataset", "iemocap", "--data-path", str(tmp_path / "trunc.pkl"), *tiny]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "IEMOCAP layout" in err
