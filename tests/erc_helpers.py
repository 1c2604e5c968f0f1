"""Small ERC pickles in the published layouts (README: Accepted data files) and a tiny model for CLI runs."""
import pickle

import numpy as np

# a tiny model and data set: CLI runs of a few seconds (the reference backend: plumbing, not kernels)
TINY = ["--batch-size", "8", "--d-model", "16", "--num-layers", "1", "--num-heads", "2", "--proj-dim", "8",
        "--ffn-mult", "2", "--device", "cpu", "--epochs", "1"]
TINY_SYNTHETIC = TINY + ["--synthetic-scale", "0.02"]

IEMOCAP_NAMES = ["happy", "sad", "neutral", "angry", "excited", "frustrated"]   # IEMOCAP_features.pkl ids 0..5
MELD_NAMES = ["neutral", "surprise", "fear", "sadness", "joy", "disgust", "anger"]
MELD_SENTIMENT_FILE = ["neutral", "positive", "negative"]                        # MELD README numbering


def _labels(rng, n, num_classes, unlabelled):
    if unlabelled == "none":
        return [int(x) for x in rng.integers(0, num_classes, n)]
    return [-1 if (unlabelled == "-1" or i % 2) else -100 for i in range(n)]   # "-1" or "mixed"


def iemocap_9(path, train, test, seed=0, dims=(10, 7, 5), unlabelled="none"):
    """DialogueRNN IEMOCAP_features.pkl: (videoIDs, videoSpeakers, videoLabels, videoText, videoAudio,
    videoVisual, videoSentence, trainVid, testVid). unlabelled: "none", "-1" (every label -1) or "mixed"
    (-1 and -100). Returns {dialogue id: labels as in the file}."""
    rng = np.random.default_rng(seed)
    ids, spk, lab, text, audio, vis, sent = ({} for _ in range(7))
    for vid in list(train) + list(test):
        n = int(rng.integers(2, 7))
        ids[vid] = [f"{vid}_{i}" for i in range(n)]
        spk[vid] = ["M" if i % 2 else "F" for i in range(n)]
        lab[vid] = _labels(rng, n, 6, unlabelled)
        text[vid] = rng.standard_normal((n, dims[0])).astype(np.float32)
        audio[vid] = rng.standard_normal((n, dims[1])).astype(np.float32)
        vis[vid] = [rng.standard_normal(dims[2]).astype(np.float32) for _ in range(n)]
        sent[vid] = [f"utterance {i}" for i in range(n)]
    path.write_bytes(pickle.dumps((ids, spk, lab, text, audio, vis, sent, list(train), list(test)), protocol=2))
    return lab


def meld_9(path, train, test, seed=0, dims=(12, 9)):
    """DialogueGCN MELD_features_raw.pkl with its 9th item, the sentiment labels (neutral 0, positive 1,
    negative 2). Returns ({id: emotion labels}, {id: sentiment labels})."""
    rng = np.random.default_rng(seed)
    ids, spk, lab, text, audio, sent, senti = ({} for _ in range(7))
    for vid in list(train) + list(test):
        n = int(rng.integers(2, 7))
        ids[vid] = [f"{vid}_{i}" for i in range(n)]
        spk[vid] = [[1, 0] if i % 2 else [0, 1] for i in range(n)]
        lab[vid] = [int(x) for x in rng.integers(0, 7, n)]
        senti[vid] = [int(x) for x in rng.integers(0, 3, n)]
        text[vid] = rng.standard_normal((n, dims[0])).astype(np.float32)
        audio[vid] = rng.standard_normal((n, dims[1])).astype(np.float32)
        sent[vid] = [f"utterance {i}" for i in range(n)]
    path.write_bytes(pickle.dumps((ids, spk, lab, text, audio, sent, list(train), list(test), senti)))
    return lab, senti


def cosmic_iemocap_10(path, train, test, valid, seed=0, dim=6):
    """COSMIC iemocap_features_roberta.pkl: (speakers, labels, roberta1..4, sentences, trainIds, testIds,
    validIds). Returns {id: [roberta1..4 arrays]}."""
    rng = np.random.default_rng(seed)
    spk, lab, sent, layers = {}, {}, {}, [{} for _ in range(4)]
    for vid in list(train) + list(test) + list(valid):
        n = int(rng.integers(2, 7))
        spk[vid] = ["M" if i % 2 else "F" for i in range(n)]
        lab[vid] = [int(x) for x in rng.integers(0, 6, n)]
        for layer in layers:
            layer[vid] = rng.standard_normal((n, dim)).astype(np.float32)
        sent[vid] = [f"utterance {i}" for i in range(n)]
    obj = (spk, lab, *layers, sent, list(train), list(test), list(valid))
    path.write_bytes(pickle.dumps(obj))
    return {vid: [layer[vid] for layer in layers] for vid in lab}
