"""`python -m mcncl_fast extract`: MELD raw layout -> our feature store (needs the `[extract]` extra).

Input (--meld-dir): `{split}_sent_emo.csv` (columns Utterance, Speaker, Emotion,
Dialogue_ID, Utterance_ID) and the clips `dia{D}_utt{U}.mp4` of each split,
looked up in the first existing folder of: train: train_splits/, train/;
dev: dev_splits_complete/, dev_splits/, dev/; test: output_repeated_splits_test/,
test_splits/, test/; then --meld-dir itself (or --clips-dir SPLIT=DIR).
Encoders and their exact options: mcncl_fast/data/media.py.

Output (--output): `{split}.safetensors` (data/store.py) and `skipped.json`.
Work is cached per utterance under OUTPUT/.cache/{split}/ as it is done, so a
rerun with the same options resumes where it stopped (different options:
refused unless --overwrite). A clip that is missing or cannot be decoded/encoded
is reported, listed in skipped.json and in the store's metadata with the
reason, and its utterance is left out; it is retried on the next run.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Dict, List

import torch
from tqdm.auto import tqdm

from .._files import atomic_path
from .errors import UserError
from .media import AUDIO_FEATURE_SETS, AudioEncoder, TextEncoder, VisualEncoder, require
from .pickles import MELD_CLASSES
from .store import split_path, write_split

CSV_COLUMNS = ("Utterance", "Speaker", "Emotion", "Dialogue_ID", "Utterance_ID")
CLIP_FOLDERS = {"train": ("train_splits", "train"), "dev": ("dev_splits_complete", "dev_splits", "dev"),
                "test": ("output_repeated_splits_test", "test_splits", "test")}
OPTION_KEYS = ("text_model", "text_pooling", "text_max_length", "audio_feature_set", "audio_sample_rate",
               "visual_model", "visual_output", "fps", "max_frames", "image_size", "store_dtype")


def add_arguments(p) -> None:
    p.add_argument("--meld-dir", required=True, help="MELD raw folder: {split}_sent_emo.csv + clip folders")
    p.add_argument("--output", required=True, help="feature store folder to write (train/dev/test.safetensors)")
    p.add_argument("--splits", default="train,dev,test", help="comma-separated splits to extract")
    p.add_argument("--clips-dir", action="append", default=[], metavar="SPLIT=DIR",
                   help="clip folder of a split (repeatable); default: the MELD folder names")
    p.add_argument("--text-model", required=True, help="local Hugging Face model folder (e.g. roberta-base)")
    p.add_argument("--text-pooling", choices=("mean", "cls"), default="mean",
                   help="mean over non-padding tokens, or the first (<s>/[CLS]) token, of the last layer")
    p.add_argument("--text-max-length", type=int, default=128)
    p.add_argument("--text-batch-size", type=int, default=32)
    p.add_argument("--audio-feature-set", choices=AUDIO_FEATURE_SETS, default="eGeMAPSv02",
                   help="openSMILE feature set, functionals level (eGeMAPSv02: 88 values)")
    p.add_argument("--audio-sample-rate", type=int, default=16000)
    p.add_argument("--visual-model", required=True,
                   help="torchvision-format ResNet state_dict (.pth), TorchScript file, torch.export .pt2 file, "
                        "or `none` (one zero frame of dim 1 per utterance)")
    p.add_argument("--visual-output", choices=("logits", "pool"), default="logits",
                   help="ResNet state_dict only: fc logits (1000-d ImageNet) or pooled features")
    p.add_argument("--fps", type=float, default=1.0, help="frames sampled per second of video")
    p.add_argument("--max-frames", type=int, default=16, help="at most this many frames per clip (even subsample)")
    p.add_argument("--image-size", type=int, default=224, help="shorter side resize, then centre crop")
    p.add_argument("--frame-batch-size", type=int, default=64)
    p.add_argument("--store-dtype", choices=("float32", "float16"), default="float32")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (encoders)")
    p.add_argument("--overwrite", action="store_true", help="discard cached work done with other options")


def read_csv(path: Path) -> List[dict]:
    pandas = require("pandas")
    if not path.is_file():
        raise UserError(f"--meld-dir: no {path.name} in {path.parent} (expected the MELD CSV with columns "
                        f"{', '.join(CSV_COLUMNS)})")
    frame = None
    for encoding in ("utf-8", "cp1252", "latin-1"):   # MELD's CSVs are not all valid UTF-8
        try:
            frame = pandas.read_csv(path, encoding=encoding, keep_default_na=False)
            break
        except UnicodeDecodeError:
            continue
        except Exception as exc:
            raise UserError(f"{path}: not a readable CSV ({type(exc).__name__})") from None
    missing = [c for c in CSV_COLUMNS if c not in frame.columns]
    if missing:
        raise UserError(f"{path}: missing columns {missing}; expected {', '.join(CSV_COLUMNS)}")
    rows = []
    for r in frame.to_dict("records"):
        emotion = str(r["Emotion"]).strip().lower()
        if emotion not in MELD_CLASSES:
            raise UserError(f"{path}: unknown Emotion {r['Emotion']!r} (dialogue {r['Dialogue_ID']}, utterance "
                            f"{r['Utterance_ID']}); expected one of {', '.join(MELD_CLASSES)}")
        try:
            d, u = int(r["Dialogue_ID"]), int(r["Utterance_ID"])
        except (TypeError, ValueError):
            raise UserError(f"{path}: Dialogue_ID/Utterance_ID must be integers, got {r['Dialogue_ID']!r}/"
                            f"{r['Utterance_ID']!r}") from None
        rows.append({"dialogue": d, "utterance": u, "text": str(r["Utterance"]), "speaker": str(r["Speaker"]),
                     "label": MELD_CLASSES.index(emotion), "name": f"dia{d}_utt{u}"})
    return sorted(rows, key=lambda r: (r["dialogue"], r["utterance"]))


def clip_folder(meld_dir: Path, split: str, overrides: Dict[str, str]) -> Path:
    if split in overrides:
        folder = Path(overrides[split])
        if not folder.is_dir():
            raise UserError(f"--clips-dir: {folder} is not a folder")
        return folder
    for name in CLIP_FOLDERS[split]:
        if (meld_dir / name).is_dir():
            return meld_dir / name
    return meld_dir


def _save_atomic(obj, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _check_options(output: Path, options: dict, overwrite: bool, commit: bool) -> None:
    """Refuse cached work made with other options (before loading any model); with `commit`, clear it
    (--overwrite) and record the options of this run."""
    cache = output / ".cache"
    saved = cache / "options.json"
    before = json.loads(saved.read_text()) if saved.is_file() else None
    if before is not None and before != options and not overwrite:
        changed = sorted(k for k in options if before.get(k) != options[k])
        raise UserError(f"--output: {output} holds work extracted with other options ({', '.join(changed)}); "
                        f"use another --output or --overwrite")
    if commit:
        if before is not None and before != options:
            shutil.rmtree(cache)
        cache.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps(options, indent=1, sort_keys=True))


def extract(meld_dir, output, text_model, visual_model, splits=("train", "dev", "test"), clips_dir=None,
            text_pooling="mean", text_max_length=128, text_batch_size=32, audio_feature_set="eGeMAPSv02",
            audio_sample_rate=16000, visual_output="logits", fps=1.0, max_frames=16, image_size=224,
            frame_batch_size=64, store_dtype="float32", device="auto", overwrite=False, show_progress=True) -> dict:
    """Run the extraction; returns {"splits": {split: {"utterances", "dialogues", "path"}}, "skipped": [...]}."""
    meld_dir, output = Path(meld_dir), Path(output)
    if not meld_dir.is_dir():
        raise UserError(f"--meld-dir: {meld_dir} is not a folder")
    bad = [s for s in splits if s not in CLIP_FOLDERS]
    if bad or not splits:
        raise UserError(f"--splits: expected a comma-separated subset of train,dev,test, got {','.join(splits)!r}")
    if text_batch_size < 1 or text_max_length < 2 or audio_sample_rate < 1000:
        raise UserError("--text-batch-size/--text-max-length/--audio-sample-rate: invalid value")
    device = "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    rows = {s: read_csv(meld_dir / f"{s}_sent_emo.csv") for s in splits}
    folders = {s: clip_folder(meld_dir, s, dict(clips_dir or {})) for s in splits}
    options = {"text_model": str(Path(text_model).resolve()), "text_pooling": text_pooling,
               "text_max_length": text_max_length, "audio_feature_set": audio_feature_set,
               "audio_sample_rate": audio_sample_rate,
               "visual_model": (visual_model if str(visual_model).lower() == "none"
                                else str(Path(visual_model).resolve())),
               "visual_output": visual_output, "fps": fps, "max_frames": max_frames, "image_size": image_size,
               "store_dtype": store_dtype}
    _check_options(output, options, overwrite, commit=False)
    text = TextEncoder(text_model, text_pooling, text_max_length, device)
    audio = AudioEncoder(audio_feature_set, audio_sample_rate)
    visual = VisualEncoder(visual_model, visual_output, fps, max_frames, image_size, frame_batch_size, device)
    _check_options(output, options, overwrite, commit=True)
    summary, all_skipped = {"splits": {}, "skipped": []}, []
    for split in splits:
        cache = output / ".cache" / split
        cache.mkdir(parents=True, exist_ok=True)
        todo = [r for r in rows[split] if not (cache / f"{r['name']}.pt").is_file()]
        skipped = []
        bar = tqdm(total=len(rows[split]), initial=len(rows[split]) - len(todo), desc=f"extract {split}",
                   dynamic_ncols=True, disable=not show_progress)
        for start in range(0, len(todo), text_batch_size):
            chunk = todo[start:start + text_batch_size]
            text_features = text([r["text"] for r in chunk])
            for r, t in zip(chunk, text_features):
                clip = folders[split] / f"{r['name']}.mp4"
                try:
                    if not clip.is_file():
                        raise FileNotFoundError(f"no clip {clip}")
                    a, v = audio(clip), visual(clip)
                except Exception as exc:   # a bad clip: reported and listed, never silently dropped
                    reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                    skipped.append({"split": split, "clip": str(clip), "dialogue": r["dialogue"],
                                    "utterance": r["utterance"], "reason": reason})
                    tqdm.write(f"skipped {split} {r['name']}: {reason}")
                else:
                    _save_atomic({"text": t.clone(), "audio": a, "visual": v}, cache / f"{r['name']}.pt")
                bar.update(1)
        bar.close()
        dialogues, by_dialogue = [], {}
        for r in rows[split]:
            path = cache / f"{r['name']}.pt"
            if path.is_file():
                by_dialogue.setdefault(r["dialogue"], []).append((r, torch.load(path, weights_only=True)))
        for d, items in by_dialogue.items():
            dialogues.append({"id": f"dia{d}", "utterance_ids": [r["name"] for r, _ in items],
                              "text": torch.stack([x["text"] for _, x in items]),
                              "audio": torch.stack([x["audio"] for _, x in items]),
                              "visual": [x["visual"] for _, x in items],
                              "labels": torch.tensor([r["label"] for r, _ in items])})
        dtype = torch.float16 if store_dtype == "float16" else torch.float32
        path = write_split(split_path(output, split), dialogues, MELD_CLASSES, split, dtype,
                           extra={"options": options, "skipped": skipped, "source": "MELD raw",
                                  "visual_model": visual.description})
        n = sum(len(x["labels"]) for x in dialogues)
        summary["splits"][split] = {"utterances": n, "dialogues": len(dialogues), "path": str(path),
                                    "skipped": len(skipped)}
        all_skipped.extend(skipped)
        tqdm.write(f"{split}: {n} utterances in {len(dialogues)} dialogues -> {path}"
                   + (f"  ({len(skipped)} clips skipped, listed in {output / 'skipped.json'})" if skipped else ""))
    summary["skipped"] = all_skipped
    (output / "skipped.json").write_text(json.dumps(all_skipped, indent=1))
    return summary


def run_from_args(args) -> dict:
    overrides = {}
    for item in args.clips_dir:
        split, sep, folder = item.partition("=")
        if not sep or split not in CLIP_FOLDERS:
            raise UserError(f"--clips-dir: expected SPLIT=DIR with SPLIT in train/dev/test, got {item!r}")
        overrides[split] = folder
    splits = tuple(s.strip() for s in re.split(r"[,\s]+", args.splits) if s.strip())
    return extract(args.meld_dir, args.output, args.text_model, args.visual_model, splits, overrides,
                   args.text_pooling, args.text_max_length, args.text_batch_size, args.audio_feature_set,
                   args.audio_sample_rate, args.visual_output, args.fps, args.max_frames, args.image_size,
                   args.frame_batch_size, args.store_dtype, args.device, args.overwrite)
