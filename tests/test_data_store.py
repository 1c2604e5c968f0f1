"""Feature store round trip, lazy reading, carved dev, errors."""
import pickle

import pytest
import torch

from mcncl_fast.data import collate_dialogues, load_dataset, synthetic_splits
from mcncl_fast.data.errors import UserError
from mcncl_fast.data.store import FeatureStoreSplit, split_path, write_split

CLASSES = ["a", "b", "c"]


def _dialogues(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        s = int(torch.randint(1, 5, (1,), generator=g))
        out.append({"id": f"dia{i}", "text": torch.randn(s, 6, generator=g), "audio": torch.randn(s, 4, generator=g),
                    "visual": [torch.randn(int(torch.randint(1, 4, (1,), generator=g)), 3, generator=g)
                               for _ in range(s)],
                    "labels": torch.randint(0, 3, (s,), generator=g)})
    return out


def _same(x, y):
    assert x["id"] == y["id"]
    for k in ("text", "audio", "labels"):
        assert torch.equal(x[k], y[k]), k
    assert len(x["visual"]) == len(y["visual"])
    assert all(torch.equal(a, b) for a, b in zip(x["visual"], y["visual"]))


def test_round_trip_all_splits(tmp_path):
    data = {s: _dialogues(n, seed) for s, n, seed in (("train", 7, 0), ("dev", 3, 1), ("test", 4, 2))}
    for split, ds in data.items():
        write_split(split_path(tmp_path, split), ds, CLASSES, split, extra={"note": split})
    splits = load_dataset("features", tmp_path)
    assert splits.class_names == CLASSES and (splits.text_dim, splits.audio_dim, splits.visual_dim) == (6, 4, 3)
    for split in ("train", "dev", "test"):
        got = getattr(splits, split)
        assert len(got) == len(data[split]) and got.extra == {"note": split}
        for i, ref in enumerate(data[split]):
            _same(got[i], ref)
    # works through a DataLoader with worker processes (each opens its own mapping)
    loader = torch.utils.data.DataLoader(splits.test, batch_size=2, collate_fn=collate_dialogues, num_workers=2)
    ref = collate_dialogues(data["test"][:2])
    first = next(iter(loader))
    assert all(torch.equal(first[k], ref[k]) for k in ref)


def test_float16_store_and_synthetic_round_trip(tmp_path):
    syn = synthetic_splits(scale=0.01)
    dialogues = [syn.test[i] for i in range(len(syn.test))]
    write_split(tmp_path / "x.safetensors", dialogues, syn.class_names, "test", dtype=torch.float16)
    got = FeatureStoreSplit(tmp_path / "x.safetensors")
    for i, ref in enumerate(dialogues):
        x = got[i]
        assert x["text"].dtype == torch.float32
        assert torch.equal(x["text"], ref["text"].half().float())
        assert all(torch.equal(a, b.half().float()) for a, b in zip(x["visual"], ref["visual"]))


def test_dev_carved_when_absent_and_empty_split(tmp_path):
    write_split(split_path(tmp_path, "train"), _dialogues(20), CLASSES)
    write_split(split_path(tmp_path, "test"), [], CLASSES, "test")
    splits = load_dataset("features", tmp_path)
    ids_train = [splits.train[i]["id"] for i in range(len(splits.train))]
    ids_dev = [splits.dev[i]["id"] for i in range(len(splits.dev))]
    assert len(ids_dev) == 2 and len(ids_train) == 18 and not set(ids_train) & set(ids_dev)
    assert len(splits.test) == 0
    again = load_dataset("features", tmp_path)
    assert [again.dev[i]["id"] for i in range(len(again.dev))] == ids_dev
    # a pickled copy (what DataLoader workers receive) reads the same
    copy = pickle.loads(pickle.dumps(splits.dev))
    _same(copy[0], splits.dev[0])


def test_errors(tmp_path):
    with pytest.raises(UserError, match="not a folder"):
        load_dataset("features", tmp_path / "nope")
    with pytest.raises(UserError, match="has no train.safetensors"):
        load_dataset("features", tmp_path)
    path = write_split(split_path(tmp_path, "train"), _dialogues(3), CLASSES)
    write_split(split_path(tmp_path, "test"), _dialogues(2), CLASSES, "test")
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(UserError, match="unreadable or truncated.*mcncl_fast feature store") as exc:
        load_dataset("features", tmp_path)
    assert "\n" not in str(exc.value)
    path.write_bytes(b"hello, not safetensors")
    with pytest.raises(UserError, match="unreadable or truncated"):
        load_dataset("features", tmp_path)
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(2)}, str(path), metadata={"format": "other"})
    with pytest.raises(UserError, match="not a feature store file"):
        load_dataset("features", tmp_path)
    write_split(path, _dialogues(3), ["a", "b", "c", "d"])
    with pytest.raises(UserError, match="class names"):
        load_dataset("features", tmp_path)
