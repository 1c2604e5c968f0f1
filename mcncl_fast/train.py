"""Training and evaluation loops, checkpoints and the metrics report.

Checkpoints are written atomically (temp file in the same folder, then
os.replace) and hold everything needed to resume bit-for-bit: model and
optimizer state, epoch, best dev score, RNG state, and the run's options.
The shuffling order of epoch e depends only on (seed, e), so a resumed run
sees the same batches as an uninterrupted one.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from sklearn.metrics import classification_report, f1_score
from torch.utils.data import DataLoader, RandomSampler
from tqdm.auto import tqdm

from .data import DataSplits, collate_dialogues, load_dataset
from .model import Model, ModelConfig

CHECKPOINT_VERSION = 1
MODALITY_INPUTS = {"t": "text", "a": "audio", "v": "visual"}


class UserError(Exception):
    """A mistake in what the user asked for: reported as one line, no traceback."""


@dataclass
class TrainConfig:
    dataset: str = "synthetic"
    data_path: Optional[str] = None
    synthetic_scale: float = 1.0
    device: str = "auto"
    seed: int = 0
    epochs: int = 6
    batch_size: int = 16
    lr: float = 5e-4
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    output_dir: str = "runs/mcncl"
    modalities: str = "tav"
    num_workers: int = 0
    model: dict = field(default_factory=dict)   # ModelConfig overrides (dims come from the data)

    def __post_init__(self):
        checks = {"epochs": self.epochs >= 1, "batch_size": self.batch_size >= 1, "lr": self.lr > 0,
                  "weight_decay": self.weight_decay >= 0, "grad_clip": self.grad_clip >= 0,
                  "synthetic_scale": self.synthetic_scale > 0, "num_workers": self.num_workers >= 0}
        for name, ok in checks.items():
            if not ok:
                raise UserError(f"--{name.replace('_', '-')}: invalid value {getattr(self, name)!r}")
        if not self.modalities or set(self.modalities) - set("tav") or len(set(self.modalities)) != len(self.modalities):
            raise UserError(f"--modalities: expected a non-empty combination of t, a, v, got {self.modalities!r}")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise UserError(f"--device: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device: {name} requested but CUDA is not available on this machine")
    return device


def batch_to_device(batch, device, modalities: str = "tav"):
    """Move a collated batch; inputs of modalities left out are zeroed (single-modality ablations)."""
    out = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    for m, key in MODALITY_INPUTS.items():
        if m not in modalities:
            out[key] = torch.zeros_like(out[key])
    return out


def metrics_report(y_true, y_pred, class_names) -> dict:
    labels = list(range(len(class_names)))
    report = classification_report(y_true, y_pred, labels=labels, target_names=class_names,
                                   output_dict=True, zero_division=0)
    return {"weighted_f1": float(f1_score(y_true, y_pred, labels=labels, average="weighted", zero_division=0)),
            "accuracy": float(np.mean(np.asarray(y_true) == np.asarray(y_pred))) if len(y_true) else 0.0,
            "per_class_f1": {name: float(report[name]["f1-score"]) for name in class_names},
            "support": {name: int(report[name]["support"]) for name in class_names},
            "classification_report": classification_report(y_true, y_pred, labels=labels, target_names=class_names,
                                                           digits=4, zero_division=0)}


@torch.no_grad()
def predict(model, loader, device, modalities="tav", desc="eval"):
    model.eval()
    y_true, y_pred = [], []
    for batch in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True):
        batch = batch_to_device(batch, device, modalities)
        logits = model(batch["text"], batch["audio"], batch["visual"], batch["utterance_mask"],
                       batch["frame_mask"]).logits
        mask = batch["utterance_mask"]
        y_true.append(batch["labels"][mask].cpu())
        y_pred.append(logits[mask].argmax(-1).cpu())
    return torch.cat(y_true).numpy(), torch.cat(y_pred).numpy()


# ------------------------------------------------------------------ checkpoints
def save_checkpoint(path: Path, state: dict) -> None:
    """torch.save to a temp file in the same folder, then an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint: no such file: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # truncated / not a torch file
        raise UserError(f"checkpoint: {path} is not a readable mcncl_fast checkpoint ({type(exc).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != "mcncl_fast" or "model" not in state:
        raise UserError(f"checkpoint: {path} is not an mcncl_fast checkpoint")
    if state.get("version") != CHECKPOINT_VERSION:
        raise UserError(f"checkpoint: {path} has version {state.get('version')}, expected {CHECKPOINT_VERSION}")
    return state


def build_model(model_config: ModelConfig, device) -> Model:
    return Model(model_config).to(device)


def model_config_for(cfg: TrainConfig, splits: DataSplits) -> ModelConfig:
    try:
        return ModelConfig(**{**cfg.model, **splits.model_dims()})
    except (TypeError, ValueError) as exc:
        raise UserError(str(exc)) from None


def loaders(cfg: TrainConfig, splits: DataSplits, epoch: int):
    sampler = RandomSampler(splits.train, generator=torch.Generator().manual_seed(cfg.seed * 100003 + epoch))
    common = dict(batch_size=cfg.batch_size, collate_fn=collate_dialogues, num_workers=cfg.num_workers)
    return DataLoader(splits.train, sampler=sampler, **common)


def eval_loader(cfg: TrainConfig, dataset):
    return DataLoader(dataset, batch_size=cfg.batch_size, shuffle=False, collate_fn=collate_dialogues,
                      num_workers=cfg.num_workers)


# --------------------------------------------------------------------- training
def train(cfg: TrainConfig, resume: Optional[str] = None,
          step_callback: Optional[Callable[[int, int, float], None]] = None) -> dict:
    """Train, keep the best dev checkpoint, report on test. Returns the report dict."""
    out_dir = Path(cfg.output_dir)
    device = resolve_device(cfg.device)
    state = load_checkpoint(resume) if resume else None
    if state is not None:
        saved = TrainConfig(**state["train_config"])
        # the data and the model must be those of the checkpoint; epochs/output may change
        cfg = TrainConfig(**{**asdict(saved), "epochs": cfg.epochs, "output_dir": cfg.output_dir,
                             "device": cfg.device, "num_workers": cfg.num_workers})
    torch.manual_seed(cfg.seed)
    splits = load_dataset(cfg.dataset, cfg.data_path, seed=cfg.seed, synthetic_scale=cfg.synthetic_scale)
    model_config = ModelConfig(**state["model_config"]) if state else model_config_for(cfg, splits)
    model = build_model(model_config, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start_epoch, best_f1, history = 0, -1.0, []
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, best_f1, history = state["epoch"], state["best_dev_f1"], state["history"]
        torch.set_rng_state(state["rng"]["torch"])
        if device.type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"], device)
    if start_epoch >= cfg.epochs:
        tqdm.write(f"checkpoint already trained for {start_epoch} epochs (>= --epochs {cfg.epochs})")

    def checkpoint(epoch):
        return {"format": "mcncl_fast", "version": CHECKPOINT_VERSION, "epoch": epoch,
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "model_config": model_config.to_dict(), "train_config": asdict(cfg),
                "class_names": splits.class_names, "best_dev_f1": best_f1, "history": history,
                "rng": {"torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}}

    dev_loader = eval_loader(cfg, splits.dev)
    started = time.time()
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        losses = []
        bar = tqdm(loaders(cfg, splits, epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", dynamic_ncols=True)
        for step, batch in enumerate(bar):
            batch = batch_to_device(batch, device, cfg.modalities)
            out = model(**batch)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            losses.append(out.loss.item())
            if step_callback is not None:
                step_callback(epoch, step, losses[-1])
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
        y_true, y_pred = predict(model, dev_loader, device, cfg.modalities, desc="dev")
        dev = metrics_report(y_true, y_pred, splits.class_names)
        history.append({"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "dev_weighted_f1": dev["weighted_f1"]})
        improved = dev["weighted_f1"] > best_f1
        if improved:
            best_f1 = dev["weighted_f1"]
        tqdm.write(f"epoch {epoch + 1}: train loss {np.mean(losses):.4f}  dev weighted F1 {dev['weighted_f1']:.4f}"
                   + ("  (best, saved)" if improved else ""))
        if improved:
            save_checkpoint(out_dir / "best.pt", checkpoint(epoch + 1))
        save_checkpoint(out_dir / "last.pt", checkpoint(epoch + 1))
    train_seconds = time.time() - started

    best_path = out_dir / "best.pt"
    if best_path.exists():
        model.load_state_dict(load_checkpoint(best_path)["model"])
    report = evaluate_split(model, cfg, splits, "test", device)
    report.update({"best_dev_weighted_f1": best_f1, "history": history, "train_seconds": train_seconds,
                   "checkpoint": str(best_path), "modalities": cfg.modalities})
    write_report(report, out_dir / "report.json")
    return report


def evaluate_split(model, cfg: TrainConfig, splits: DataSplits, split: str, device) -> dict:
    dataset = {"train": splits.train, "dev": splits.dev, "test": splits.test}[split]
    y_true, y_pred = predict(model, eval_loader(cfg, dataset), device, cfg.modalities, desc=split)
    report = metrics_report(y_true, y_pred, splits.class_names)
    report.update({"split": split, "dataset": cfg.dataset, "num_utterances": int(len(y_true))})
    return report


def evaluate(checkpoint_path, split: str = "test", device: str = "auto", output: Optional[str] = None) -> dict:
    state = load_checkpoint(checkpoint_path)
    cfg = TrainConfig(**{**state["train_config"], "device": device})
    dev = resolve_device(device)
    splits = load_dataset(cfg.dataset, cfg.data_path, seed=cfg.seed, synthetic_scale=cfg.synthetic_scale)
    model = build_model(ModelConfig(**state["model_config"]), dev)
    model.load_state_dict(state["model"])
    report = evaluate_split(model, cfg, splits, split, dev)
    report["checkpoint"] = str(checkpoint_path)
    if output:
        write_report(report, Path(output))
    return report


def write_report(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, path)


def format_report(report: dict) -> str:
    lines = [f"{report['dataset']} {report['split']}: weighted F1 {report['weighted_f1']:.4f}  "
             f"accuracy {report['accuracy']:.4f}  ({report['num_utterances']} utterances)",
             report["classification_report"]]
    return "\n".join(lines)
