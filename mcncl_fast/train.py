"""Training and evaluation loops, checkpoints and the metrics report.

Checkpoints are written atomically (temp file in the same folder, then
os.replace) and hold everything needed to resume bit-for-bit: model and
optimizer state, epoch, best dev score, RNG state, and the run's options.
The shuffling order of epoch e depends only on (seed, e), so a resumed run
sees the same batches as an uninterrupted one.

Under `torchrun --nproc_per_node=N` the same loop runs DistributedDataParallel
(mcncl_fast/distributed.py): each process trains on its DistributedSampler
shard (--batch-size dialogues per process), the loss is that of the global
batch (all-gathered SupCon), rank 0 logs and writes checkpoints and reports,
and dev/test metrics are computed over the whole split (sharded, gathered).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from sklearn.metrics import classification_report, f1_score
from sklearn.metrics import confusion_matrix
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, Subset
from tqdm.auto import tqdm

from . import distributed
from .data import DataSplits, collate_dialogues, load_dataset
from .data.buckets import ShapeBuckets
from .checkpoints import CHECKPOINT_VERSION, load_checkpoint, save_checkpoint
from .data.errors import UserError
from .model import Model, ModelConfig
from .reference.ops import IGNORE_INDEX
from .step import CudaGraphStep, TrainStep, load_optimizer_state, make_optimizer

MODALITY_INPUTS = {"t": "text", "a": "audio", "v": "visual"}


PRECISIONS = ("fp32", "bf16")
LR_SCHEDULES = ("constant", "cosine", "linear")
# options a resumed run may change (everything else comes from the checkpoint)
RESUME_OVERRIDES = ("epochs", "output_dir", "device", "num_workers", "patience", "compile", "compile_backend",
                    "shape_buckets", "cuda_graphs")
LOG_EVERY = 50   # steps between progress-bar loss updates (each reads the running loss: one host sync)


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
    visual_path: Optional[str] = None           # per-utterance visual features for meld/iemocap pickles
    precision: str = "fp32"                     # fp32 | bf16 (torch.autocast)
    compile: bool = False                       # torch.compile the model
    compile_backend: str = "inductor"
    lr_schedule: str = "constant"               # constant | cosine | linear (after the warmup)
    warmup_ratio: float = 0.0                   # fraction of all steps with a linear warmup from 0
    min_lr_ratio: float = 0.0                   # floor of cosine/linear decay, relative to --lr
    patience: int = 0                           # stop after this many epochs without a better dev F1 (0 = off)
    shape_buckets: bool = False                 # pad batches to a few static shapes (data/buckets.py)
    cuda_graphs: bool = False                   # capture the training step per shape bucket and replay it

    def __post_init__(self):
        checks = {"epochs": self.epochs >= 1, "batch_size": self.batch_size >= 1, "lr": self.lr > 0,
                  "weight_decay": self.weight_decay >= 0, "grad_clip": self.grad_clip >= 0,
                  "synthetic_scale": self.synthetic_scale > 0, "num_workers": self.num_workers >= 0,
                  "precision": self.precision in PRECISIONS, "lr_schedule": self.lr_schedule in LR_SCHEDULES,
                  "warmup_ratio": 0.0 <= self.warmup_ratio < 1.0, "min_lr_ratio": 0.0 <= self.min_lr_ratio <= 1.0,
                  "patience": self.patience >= 0, "compile_backend": bool(self.compile_backend)}
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
    if len(y_true) == 0:   # an empty split (e.g. every clip of a tiny extraction skipped)
        zeros = {name: 0.0 for name in class_names}
        return {"weighted_f1": 0.0, "accuracy": 0.0, "per_class_f1": zeros, "support": dict.fromkeys(class_names, 0),
                "class_names": list(class_names), "confusion_matrix": [[0] * len(labels) for _ in labels],
                "classification_report": "(no utterances)"}
    report = classification_report(y_true, y_pred, labels=labels, target_names=class_names,
                                   output_dict=True, zero_division=0)
    return {"weighted_f1": float(f1_score(y_true, y_pred, labels=labels, average="weighted", zero_division=0)),
            "accuracy": float(np.mean(np.asarray(y_true) == np.asarray(y_pred))) if len(y_true) else 0.0,
            "per_class_f1": {name: float(report[name]["f1-score"]) for name in class_names},
            "support": {name: int(report[name]["support"]) for name in class_names},
            "class_names": list(class_names),
            "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
            "classification_report": classification_report(y_true, y_pred, labels=labels, target_names=class_names,
                                                           digits=4, zero_division=0)}


def autocast(device, precision: str = "fp32", cache_enabled: bool = True):
    """cache_enabled=False under CUDA graph capture (autocast's weight-cast cache would go stale)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, cache_enabled=cache_enabled)


@torch.no_grad()
def predict(model, loader, device, modalities="tav", desc="eval", precision="fp32", show=True):
    model.eval()
    y_true, y_pred = [torch.zeros(0, dtype=torch.int64)], [torch.zeros(0, dtype=torch.int64)]
    for batch in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=not show):
        batch = batch_to_device(batch, device, modalities)
        with autocast(device, precision):
            logits = model(batch["text"], batch["audio"], batch["visual"], batch["utterance_mask"],
                           batch["frame_mask"]).logits
        mask = batch["utterance_mask"] & (batch["labels"] != IGNORE_INDEX)
        y_true.append(batch["labels"][mask].cpu())
        y_pred.append(logits[mask].float().argmax(-1).cpu())
    return torch.cat(y_true).numpy(), torch.cat(y_pred).numpy()


def predict_split(model, cfg, dataset, device, ctx=None, desc="eval"):
    """Labels and predictions over the WHOLE dataset; under DDP each rank predicts a shard, then gather."""
    ctx = ctx or distributed.DistContext(device=device)
    if ctx.enabled:
        dataset = Subset(dataset, distributed.shard_indices(len(dataset), ctx))
    loader = eval_loader(cfg, dataset)
    y_true, y_pred = predict(model, loader, device, cfg.modalities, desc, cfg.precision, show=ctx.is_main) \
        if len(dataset) else (np.zeros(0, np.int64), np.zeros(0, np.int64))
    parts = distributed.gather_objects((y_true, y_pred), ctx)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def build_model(model_config: ModelConfig, device) -> Model:
    return Model(model_config).to(device)


def model_config_for(cfg: TrainConfig, splits: DataSplits) -> ModelConfig:
    try:
        return ModelConfig(**{**cfg.model, **splits.model_dims()})
    except (TypeError, ValueError) as exc:
        raise UserError(str(exc)) from None


def loaders(cfg: TrainConfig, splits: DataSplits, epoch: int, ctx=None):
    if ctx is not None and ctx.enabled:
        sampler = DistributedSampler(splits.train, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True,
                                     seed=cfg.seed, drop_last=False)
        sampler.set_epoch(epoch)
    else:
        sampler = RandomSampler(splits.train, generator=torch.Generator().manual_seed(cfg.seed * 100003 + epoch))
    common = dict(batch_size=cfg.batch_size, collate_fn=collate_fn(cfg), num_workers=cfg.num_workers)
    return DataLoader(splits.train, sampler=sampler, **common)


def eval_loader(cfg: TrainConfig, dataset):
    return DataLoader(dataset, batch_size=cfg.batch_size, shuffle=False, collate_fn=collate_fn(cfg),
                      num_workers=cfg.num_workers)


def collate_fn(cfg: TrainConfig):
    """Shape buckets with --shape-buckets or --cuda-graphs (a graph per shape), else the tightest padding."""
    return ShapeBuckets(batch_size=cfg.batch_size) if cfg.shape_buckets or cfg.cuda_graphs else collate_dialogues


# --------------------------------------------------------------------- training
def lr_factor(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """Multiplier of --lr at optimizer step `step`: linear warmup, then constant/cosine/linear decay."""
    warmup = int(round(cfg.warmup_ratio * total_steps))
    if step < warmup:
        return (step + 1) / warmup
    if cfg.lr_schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if cfg.lr_schedule == "cosine" else 1.0 - progress
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape


def epochs_since_best(history) -> int:
    if not history:
        return 0
    scores = [h["dev_weighted_f1"] for h in history]
    return len(scores) - 1 - int(np.argmax(scores))   # argmax: first best (a tie is no improvement)


def _compiled(module, cfg: TrainConfig):
    if not cfg.compile:
        return module
    # bucketed shapes: one static compilation per bucket; otherwise dynamo goes dynamic after a recompile
    static = cfg.shape_buckets or cfg.cuda_graphs
    return torch.compile(module, backend=cfg.compile_backend, dynamic=False if static else None)


def train(cfg: TrainConfig, resume: Optional[str] = None,
          step_callback: Optional[Callable[[int, int, float], None]] = None) -> dict:
    """Train, keep the best dev checkpoint, report on test. Returns the report dict.

    Under torchrun (WORLD_SIZE > 1) this runs DDP; every rank returns the same report.
    """
    out_dir = Path(cfg.output_dir)
    state = load_checkpoint(resume) if resume else None
    if state is not None:
        saved = TrainConfig(**state["train_config"])
        # the data and the model must be those of the checkpoint; epochs/output/... may change
        cfg = TrainConfig(**{**asdict(saved), **{k: getattr(cfg, k) for k in RESUME_OVERRIDES}})
    ctx = distributed.setup(resolve_device(cfg.device))
    try:
        return _train(cfg, state, ctx, out_dir, step_callback)
    finally:
        distributed.cleanup(ctx)


def _train(cfg, state, ctx, out_dir, step_callback):
    device, main = ctx.device, ctx.is_main
    log = tqdm.write if main else (lambda *a, **k: None)
    if cfg.precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("--precision bf16: this GPU does not support bfloat16")
    if cfg.cuda_graphs and device.type != "cuda":
        raise UserError(f"--cuda-graphs: captures the training step as CUDA graphs and needs a CUDA device; "
                        f"this run is on {device}")
    if cfg.cuda_graphs and ctx.enabled:
        raise UserError("--cuda-graphs: not supported with several processes (torchrun); run without it")
    torch.manual_seed(cfg.seed)
    splits = load_dataset(cfg.dataset, cfg.data_path, seed=cfg.seed, synthetic_scale=cfg.synthetic_scale,
                          visual_path=cfg.visual_path)
    if len(splits.train) == 0:
        raise UserError(f"--dataset {cfg.dataset}: the train split is empty")
    model_config = ModelConfig.from_dict(state["model_config"]) if state else model_config_for(cfg, splits)
    model = build_model(model_config, device)
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, capturable=cfg.cuda_graphs)
    steps_per_epoch = len(loaders(cfg, splits, 0, ctx))
    total_steps = steps_per_epoch * cfg.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, cfg))
    start_epoch, best_f1, history = 0, -1.0, []
    if state is not None:
        model.load_state_dict(state["model"])
        load_optimizer_state(optimizer, state["optimizer"])
        if state.get("scheduler") is not None:
            scheduler.load_state_dict(state["scheduler"])
        start_epoch, best_f1, history = state["epoch"], state["best_dev_f1"], state["history"]
        torch.set_rng_state(state["rng"]["torch"])
        if device.type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"], device)
    if start_epoch >= cfg.epochs:
        log(f"checkpoint already trained for {start_epoch} epochs (>= --epochs {cfg.epochs})")

    if ctx.enabled:
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
        train_forward = _compiled(ddp, cfg)
    else:
        train_forward = _compiled(model, cfg)
    eval_forward = train_forward if not ctx.enabled else _compiled(model, cfg)
    supcon = type(model).ops.supcon_hard_negative_loss

    def forward_loss(batch):
        if ctx.enabled or cfg.precision != "fp32":
            # DDP: the loss of the global batch (SupCon over every rank's embeddings); bf16: the forward
            # under autocast, the loss (CE, SupCon) outside it in fp32. Same formula as Model.forward.
            with autocast(device, cfg.precision, cache_enabled=not cfg.cuda_graphs):
                out = train_forward(batch["text"], batch["audio"], batch["visual"], batch["utterance_mask"],
                                    batch["frame_mask"])
            return distributed.global_batch_loss(out.logits, out.features, batch["labels"],
                                                 batch["utterance_mask"], model_config, supcon)["loss"]
        return train_forward(**batch).loss

    train_step = TrainStep(forward_loss, model, optimizer, cfg.grad_clip)
    if cfg.cuda_graphs:
        train_step = CudaGraphStep(train_step)

    def checkpoint(epoch):
        return {"format": "mcncl_fast", "version": CHECKPOINT_VERSION, "epoch": epoch,
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "model_config": model_config.to_dict(), "train_config": asdict(cfg),
                "class_names": splits.class_names, "best_dev_f1": best_f1, "history": history,
                "world_size": ctx.world_size,
                "rng": {"torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}}

    started, stopped_early = time.time(), False
    for epoch in range(start_epoch, cfg.epochs):
        if cfg.patience and epochs_since_best(history) >= cfg.patience:
            stopped_early = True
            log(f"early stopping: no better dev weighted F1 for {cfg.patience} epochs")
            break
        model.train()
        # the losses stay on the device (a running sum): reading each one would sync host and device
        loss_sum, window_sum, steps, window = torch.zeros((), device=device), torch.zeros((), device=device), 0, 0
        bar = tqdm(loaders(cfg, splits, epoch, ctx), desc=f"epoch {epoch + 1}/{cfg.epochs}", dynamic_ncols=True,
                   disable=not main)
        for step, batch in enumerate(bar):
            loss = train_step(batch_to_device(batch, device, cfg.modalities))
            scheduler.step()
            loss_sum += loss
            window_sum += loss
            steps, window = steps + 1, window + 1
            if step_callback is not None:
                step_callback(epoch, step, loss.item())
            if main and (window == LOG_EVERY or step == 0):
                lr_now = cfg.lr * lr_factor(scheduler.last_epoch - 1, total_steps, cfg)
                bar.set_postfix(loss=f"{window_sum.item() / window:.4f}", lr=f"{lr_now:.2e}")
                window_sum.zero_()
                window = 0
        losses = [loss_sum.item() / steps] if steps else []
        y_true, y_pred = predict_split(eval_forward, cfg, splits.dev, device, ctx, desc="dev")
        dev = metrics_report(y_true, y_pred, splits.class_names)
        history.append({"epoch": epoch + 1, "train_loss": float(np.mean(losses)) if losses else float("nan"),
                        "dev_weighted_f1": dev["weighted_f1"], "lr": float(scheduler.get_last_lr()[0])})
        improved = dev["weighted_f1"] > best_f1
        if improved:
            best_f1 = dev["weighted_f1"]
        log(f"epoch {epoch + 1}: train loss {history[-1]['train_loss']:.4f}  dev weighted F1 {dev['weighted_f1']:.4f}"
            + ("  (best, saved)" if improved else ""))
        if main:
            if improved:
                save_checkpoint(out_dir / "best.pt", checkpoint(epoch + 1))
            save_checkpoint(out_dir / "last.pt", checkpoint(epoch + 1))
        distributed.barrier(ctx)
    train_seconds = time.time() - started

    best_path = out_dir / "best.pt"
    if best_path.exists():
        model.load_state_dict(load_checkpoint(best_path)["model"])
    report = evaluate_split(eval_forward, cfg, splits, "test", device, ctx)
    report.update({"best_dev_weighted_f1": best_f1, "history": history, "train_seconds": train_seconds,
                   "checkpoint": str(best_path), "modalities": cfg.modalities, "stopped_early": stopped_early,
                   "world_size": ctx.world_size, "precision": cfg.precision, "compile": cfg.compile})
    if main:
        from .reports import write_reports
        report["files"] = write_reports(report, out_dir, "test", history)
        report["files"]["report_json"] = str(out_dir / "report.json")
        write_report(report, out_dir / "report.json")
    distributed.barrier(ctx)
    return report


def evaluate_split(model, cfg: TrainConfig, splits: DataSplits, split: str, device, ctx=None) -> dict:
    dataset = {"train": splits.train, "dev": splits.dev, "test": splits.test}[split]
    y_true, y_pred = predict_split(model, cfg, dataset, device, ctx, desc=split)
    report = metrics_report(y_true, y_pred, splits.class_names)
    report.update({"split": split, "dataset": cfg.dataset, "num_utterances": int(len(y_true))})
    return report


def evaluate(checkpoint_path, split: str = "test", device: str = "auto", output: Optional[str] = None) -> dict:
    """Metrics of a saved model on a split. With `output` (a .json path), the F1 table (markdown) and the
    confusion-matrix PNG are written beside it as <stem>_f1_table.md and <stem>_confusion.png."""
    state = load_checkpoint(checkpoint_path)
    cfg = TrainConfig(**{**state["train_config"], "device": device})
    dev = resolve_device(device)
    splits = load_dataset(cfg.dataset, cfg.data_path, seed=cfg.seed, synthetic_scale=cfg.synthetic_scale,
                          visual_path=cfg.visual_path)
    model = build_model(ModelConfig.from_dict(state["model_config"]), dev)
    model.load_state_dict(state["model"])
    report = evaluate_split(model, cfg, splits, split, dev)
    report["checkpoint"] = str(checkpoint_path)
    if output:
        from .reports import write_reports
        output = Path(output)
        report["files"] = write_reports(report, output.parent, output.stem)
        report["files"]["report_json"] = str(output)
        write_report(report, output)
    return report


def write_report(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, path)


def format_report(report: dict) -> str:
    from .reports import f1_table
    lines = [f"{report['dataset']} {report['split']}: weighted F1 {report['weighted_f1']:.4f}  "
             f"accuracy {report['accuracy']:.4f}  ({report['num_utterances']} utterances)",
             report["classification_report"], f1_table(report)]
    if report.get("files"):
        lines.append("written: " + "  ".join(report["files"].values()))
    return "\n".join(lines)
