"""`python -m mcncl_fast extract` end to end on tiny real media built here (WAV, MP4, CSV, text model, ResNet)."""
import csv
import inspect
import json
import warnings
import wave

import numpy as np
import pytest
import torch

av = pytest.importorskip("av", reason="PyAV (the [extract] extra) is not installed")
opensmile = pytest.importorskip("opensmile", reason="opensmile (the [extract] extra) is not installed")
transformers = pytest.importorskip("transformers", reason="transformers (the [extract] extra) is not installed")
pytest.importorskip("pandas", reason="pandas (the [extract] extra) is not installed")

from mcncl_fast.cli import main  # noqa: E402
from mcncl_fast.data import load_dataset  # noqa: E402
from mcncl_fast.data.errors import UserError  # noqa: E402
from mcncl_fast.data.media import load_image_model  # noqa: E402
from mcncl_fast.data.resnet import BasicBlock, Bottleneck, ResNet, resnet_from_state_dict  # noqa: E402

SR = 16000
WORDS = "hello world how are you i am fine oh no yes what".split()


def _wav(path, seconds=0.6, freq=220.0):
    t = np.arange(int(SR * seconds)) / SR
    x = (0.3 * np.sin(2 * np.pi * freq * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t)) * 32767).astype(np.int16)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SR)
        w.writeframes(x.tobytes())
    return x.astype(np.float32) / 32768.0


def _mp4(path, seed, seconds=1.0, rate=10, audio=True):
    rng = np.random.default_rng(seed)
    with av.open(str(path), "w") as c:
        v = c.add_stream("mpeg4", rate=rate)
        v.width, v.height, v.pix_fmt = 48, 32, "yuv420p"
        a = c.add_stream("aac", rate=SR) if audio else None
        for i in range(int(seconds * rate)):
            img = np.full((32, 48, 3), (i * 20 + seed * 50) % 255, np.uint8)
            img[rng.integers(0, 32), :, :] = 255
            for p in v.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in v.encode():
            c.mux(p)
        if a is not None:
            t = np.arange(int(SR * seconds)) / SR
            sig = (0.2 * np.sin(2 * np.pi * (200 + 40 * seed) * t)).astype(np.float32)
            for k in range(0, len(sig) - 1024 + 1, 1024):
                f = av.AudioFrame.from_ndarray(sig[None, k:k + 1024], format="fltp", layout="mono")
                f.sample_rate = SR
                for p in a.encode(f):
                    c.mux(p)
            for p in a.encode():
                c.mux(p)


def _text_model(folder):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    folder.mkdir(exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    if "vocab" in inspect.signature(transformers.BertTokenizer.__init__).parameters:   # transformers >= 5
        tok = transformers.BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})
    else:
        tok = transformers.BertTokenizer(vocab_file=str(folder / "vocab.txt"))
    assert tok("hello world")["input_ids"] == [2, 5, 6, 3]
    tok.save_pretrained(str(folder))
    cfg = transformers.BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.BertModel(cfg).save_pretrained(str(folder))


def _tiny_resnet(seed=0):
    torch.manual_seed(seed)
    model = ResNet(Bottleneck, [1, 1, 1, 1], num_classes=5, width=4)
    with torch.no_grad():   # non-trivial BatchNorm statistics
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


ROWS = {  # split -> (dialogue, utterance, text, emotion, clip kind)
    "train": [(0, 0, "hello world", "joy", "mp4"), (0, 1, "how are you", "neutral", "wav"),
              (0, 2, "i am fine", "Sadness", "corrupt"), (1, 0, "oh no", "anger", "mp4"),
              (1, 1, "what", "surprise", "missing")],
    "dev": [(0, 0, "yes", "fear", "mp4")],
    "test": [(3, 0, "hello", "disgust", "mp4"), (3, 1, "no no what", "neutral", "mp4")],
}
FOLDERS = {"train": "train_splits", "dev": "dev_splits_complete", "test": "output_repeated_splits_test"}


@pytest.fixture(scope="module")
def meld(tmp_path_factory):
    root = tmp_path_factory.mktemp("meld")
    wavs = {}
    for split, rows in ROWS.items():
        folder = root / FOLDERS[split]
        folder.mkdir()
        with open(root / f"{split}_sent_emo.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["Sr No.", "Utterance", "Speaker", "Emotion", "Sentiment", "Dialogue_ID", "Utterance_ID"])
            for i, (d, u, text, emo, kind) in enumerate(rows):
                w.writerow([i + 1, text, "Joey", emo, "neutral", d, u])
                clip = folder / f"dia{d}_utt{u}.mp4"
                if kind == "mp4":
                    _mp4(clip, seed=i + 3 * d)
                elif kind == "wav":       # video without audio track + the audio as a WAV beside it
                    _mp4(clip, seed=i, audio=False)
                    wavs[(split, d, u)] = _wav(clip.with_suffix(".wav"))
                elif kind == "corrupt":
                    clip.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)
    _text_model(root / "textmodel")
    torch.save(_tiny_resnet().state_dict(), root / "resnet_tiny.pth")
    return root, wavs


def _extract(root, out, *extra):
    return main(["extract", "--meld-dir", str(root), "--output", str(out), "--text-model", str(root / "textmodel"),
                 "--visual-model", str(root / "resnet_tiny.pth"), "--fps", "4", "--image-size", "32",
                 "--device", "cpu", *extra])


def test_extract_end_to_end_and_resume(meld, tmp_path, capsys, monkeypatch):
    root, wavs = meld
    out = tmp_path / "features"
    assert _extract(root, out) == 0
    printed = capsys.readouterr()
    assert "skipped train dia0_utt2" in printed.out + printed.err and "dia1_utt1" in printed.out + printed.err
    skipped = json.loads((out / "skipped.json").read_text())
    assert sorted((s["split"], s["dialogue"], s["utterance"]) for s in skipped) == [("train", 0, 2), ("train", 1, 1)]
    assert any("no clip" in s["reason"] for s in skipped) and all(s["reason"] for s in skipped)

    splits = load_dataset("features", out)
    assert splits.class_names == ["neutral", "surprise", "fear", "sadness", "joy", "disgust", "anger"]
    assert (splits.text_dim, splits.audio_dim, splits.visual_dim) == (16, 88, 5)   # BERT 16, eGeMAPSv02 88, fc 5
    assert splits.train.extra["skipped"] == [s for s in skipped if s["split"] == "train"]
    train = {splits.train[i]["id"]: splits.train[i] for i in range(len(splits.train))}
    assert sorted(train) == ["dia0", "dia1"]
    assert train["dia0"]["labels"].tolist() == [4, 0] and train["dia1"]["labels"].tolist() == [6]
    assert splits.train.utterance_ids == [["dia0_utt0", "dia0_utt1"], ["dia1_utt0"]]
    test = splits.test[0]
    assert test["labels"].tolist() == [5, 0] and len(splits.dev) == 1
    # 1 s of video at 10 fps sampled at --fps 4 -> frames at t = 0, 0.3, 0.5, 0.8
    assert [v.shape for v in test["visual"]] == [(4, 5), (4, 5)]
    assert not torch.allclose(test["visual"][0], test["visual"][1])

    # text: mean pooling over non-padding tokens, computed here independently, one utterance at a time
    tok = transformers.AutoTokenizer.from_pretrained(str(root / "textmodel"))
    model = transformers.AutoModel.from_pretrained(str(root / "textmodel")).eval()
    with torch.no_grad():
        ref = model(**tok(["hello world"], return_tensors="pt")).last_hidden_state[0].mean(0)
    torch.testing.assert_close(train["dia0"]["text"][0], ref, rtol=1e-5, atol=1e-6)
    # audio: openSMILE eGeMAPSv02 functionals of the WAV beside the clip, read here with the wave module
    smile = opensmile.Smile(feature_set=opensmile.FeatureSet.eGeMAPSv02,
                            feature_level=opensmile.FeatureLevel.Functionals)
    ref_audio = torch.tensor(smile.process_signal(wavs[("train", 0, 1)], SR).to_numpy(np.float32).reshape(-1))
    torch.testing.assert_close(train["dia0"]["audio"][1], ref_audio, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(train["dia0"]["audio"][0], train["dia0"]["audio"][1])   # mp4 audio track differs

    # resume: cached utterances are not recomputed; the bad clips are retried and reported again
    cache = sorted((out / ".cache" / "train").glob("*.pt"))
    stamps = [p.stat().st_mtime_ns for p in cache]
    assert _extract(root, out) == 0
    assert [p.stat().st_mtime_ns for p in cache] == stamps
    assert len(json.loads((out / "skipped.json").read_text())) == 2
    # other options on the same output are refused (one line), unless --overwrite
    capsys.readouterr()
    assert _extract(root, out, "--text-pooling", "cls") == 2
    err = capsys.readouterr().err
    assert "other options (text_pooling)" in err and err.count("\n") == 1
    assert _extract(root, out, "--text-pooling", "cls", "--overwrite", "--splits", "dev") == 0

    # the store trains (tiny model, reference ops: this checks the plumbing, not the kernels)
    monkeypatch.setenv("MCNCL_FAST_BACKEND", "reference")
    assert main(["train", "--dataset", "features", "--data-path", str(out), "--epochs", "1", "--batch-size", "2",
                 "--d-model", "8", "--num-layers", "1", "--num-heads", "2", "--proj-dim", "4", "--device", "cpu",
                 "--output-dir", str(tmp_path / "run")]) == 0
    assert json.loads((tmp_path / "run" / "report.json").read_text())["num_utterances"] == 2


def test_extract_user_errors(meld, tmp_path, capsys):
    root, _ = meld
    assert main(["extract", "--meld-dir", str(root), "--output", str(tmp_path / "o"), "--text-model",
                 str(tmp_path / "nothing"), "--visual-model", "none"]) == 2
    assert "--text-model" in capsys.readouterr().err
    assert _extract(root, tmp_path / "o", "--splits", "train,valid") == 2
    assert "--splits" in capsys.readouterr().err
    bad = tmp_path / "badcsv"
    bad.mkdir()
    (bad / "dev_sent_emo.csv").write_text("Utterance,Speaker,Dialogue_ID\nhi,A,0\n")
    assert _extract(bad, tmp_path / "o2", "--splits", "dev") == 2
    assert "missing columns ['Emotion', 'Utterance_ID']" in capsys.readouterr().err


def test_visual_none_gives_one_zero_frame(meld, tmp_path):
    root, _ = meld
    out = tmp_path / "f"
    assert main(["extract", "--meld-dir", str(root), "--output", str(out), "--text-model", str(root / "textmodel"),
                 "--visual-model", "none", "--splits", "test", "--device", "cpu"]) == 0
    from mcncl_fast.data.store import FeatureStoreSplit
    x = FeatureStoreSplit(out / "test.safetensors")[0]
    assert [v.shape for v in x["visual"]] == [(1, 1), (1, 1)] and not any(v.any() for v in x["visual"])


@pytest.mark.parametrize("block,layers,params", [(BasicBlock, [2, 2, 2, 2], 11_689_512),     # torchvision resnet18
                                                 (Bottleneck, [3, 4, 6, 3], 25_557_032)])    # torchvision resnet50
def test_resnet_matches_torchvision_architecture(block, layers, params):
    model = ResNet(block, layers)
    assert sum(p.numel() for p in model.parameters()) == params
    keys = set(model.state_dict())
    assert {"conv1.weight", "bn1.running_var", "layer2.0.downsample.0.weight", "layer2.0.downsample.1.running_mean",
            "layer4.1.bn2.num_batches_tracked",
            "fc.bias"} <= keys


def test_image_model_files(tmp_path):
    model = _tiny_resnet(seed=1)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref, ref_pool = model(x), model.pooled(x)
    sd = {"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}   # DataParallel-style file
    torch.save(sd, tmp_path / "w.pth")
    module, fn, desc = load_image_model(str(tmp_path / "w.pth"))
    assert "Bottleneck [1, 1, 1, 1]" in desc
    with torch.no_grad():
        torch.testing.assert_close(fn(x), ref, rtol=0, atol=0)
        torch.testing.assert_close(load_image_model(str(tmp_path / "w.pth"), "pool")[1](x), ref_pool, rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)   # torch.jit is deprecated but still common
        torch.jit.trace(model, x).save(str(tmp_path / "ts.pt"))
    _, fn, desc = load_image_model(str(tmp_path / "ts.pt"))
    with torch.no_grad():
        torch.testing.assert_close(fn(x), ref)
    assert desc == "TorchScript module"
    program = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("frames", max=1024)},))
    torch.export.save(program, str(tmp_path / "m.pt2"))
    _, fn, desc = load_image_model(str(tmp_path / "m.pt2"))
    with torch.no_grad():
        torch.testing.assert_close(fn(x[:2]), ref[:2])
    assert desc == "torch.export program"
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(UserError, match="neither a state_dict"):
        load_image_model(str(tmp_path / "junk.pth"))
    torch.save({"weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(UserError, match="not a ResNet state_dict"):
        load_image_model(str(tmp_path / "other.pth"))
    assert resnet_from_state_dict(model.state_dict()).layers_spec == [1, 1, 1, 1]
