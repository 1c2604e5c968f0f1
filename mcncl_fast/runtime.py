"""What training and evaluation share: the run's options, the device, batches and loaders, the model."""
from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch.utils.data import DataLoader

from .data import DataSplits, collate_dialogues
from .data.buckets import ShapeBuckets
from .data.errors import UserError
from .imbalance import CLASS_WEIGHTS, class_weights_for
from .model import Model, ModelConfig

MODALITY_INPUTS = {"t": "text", "a": "audio", "v": "visual"}
PRECISIONS = ("fp32", "bf16")
LR_SCHEDULES = ("constant", "cosine", "linear")
# options a resumed run may change (everything else comes from the checkpoint)
RESUME_OVERRIDES = ("epochs", "output_dir", "device", "num_workers", "patience", "compile", "compile_backend",
                    "shape_buckets", "cuda_graphs")


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
    label_set: Optional[str] = None             # meld-sentiment | iemocap-4 (data.LABEL_SETS); None: the file's
    roberta: str = "mean"                       # COSMIC pickles: how the four RoBERTa arrays become the text
    class_weights: str = "none"                 # none | balanced (inverse class frequency of train, imbalance.py)

    def __post_init__(self):
        for name in FLOAT_OPTIONS:
            if not math.isfinite(getattr(self, name)):
                raise UserError(f"--{name.replace('_', '-')}: expected a finite number, got {getattr(self, name)!r}")
        checks = {"epochs": self.epochs >= 1, "batch_size": self.batch_size >= 1, "lr": self.lr > 0,
                  "seed": 0 <= self.seed < 2**32,
                  "weight_decay": self.weight_decay >= 0, "grad_clip": self.grad_clip >= 0,
                  "synthetic_scale": self.synthetic_scale > 0, "num_workers": self.num_workers >= 0,
                  "precision": self.precision in PRECISIONS, "lr_schedule": self.lr_schedule in LR_SCHEDULES,
                  "warmup_ratio": 0.0 <= self.warmup_ratio < 1.0, "min_lr_ratio": 0.0 <= self.min_lr_ratio <= 1.0,
                  "patience": self.patience >= 0, "compile_backend": bool(self.compile_backend),
                  "class_weights": self.class_weights in CLASS_WEIGHTS}
        for name, ok in checks.items():
            if not ok:
                raise UserError(f"--{name.replace('_', '-')}: invalid value {getattr(self, name)!r}")
        if not isinstance(self.device, str) or DEVICE_PATTERN.fullmatch(self.device) is None:
            raise UserError(f"--device: expected auto, cpu, cuda or cuda:N, got {self.device!r}")
        if (not self.modalities or set(self.modalities) - set("tav")
                or len(set(self.modalities)) != len(self.modalities)):
            raise UserError(f"--modalities: expected a non-empty combination of t, a, v, got {self.modalities!r}")


FLOAT_OPTIONS = ("lr", "weight_decay", "grad_clip", "synthetic_scale", "warmup_ratio", "min_lr_ratio")
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise UserError(f"--device: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device: {name} requested but CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device: {name} requested but this machine has {torch.cuda.device_count()} GPU(s)")
    return device


def batch_to_device(batch, device, modalities: str = "tav"):
    """Move a collated batch; inputs of modalities left out are zeroed (single-modality ablations)."""
    out = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    for m, key in MODALITY_INPUTS.items():
        if m not in modalities:
            out[key] = torch.zeros_like(out[key])
    return out


def autocast(device, precision: str = "fp32", cache_enabled: bool = True):
    """cache_enabled=False under CUDA graph capture (autocast's weight-cast cache would go stale)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, cache_enabled=cache_enabled)


def forward_logits(model, batch, device, modalities: str = "tav", precision: str = "fp32"):
    """Evaluation forward: (the batch on the device, modalities left out zeroed; the model's logits)."""
    from .finite import check_logits
    batch = batch_to_device(batch, device, modalities)
    with autocast(device, precision):
        logits = model(batch["text"], batch["audio"], batch["visual"], batch["utterance_mask"],
                       batch["frame_mask"]).logits
    check_logits(model, logits, batch["utterance_mask"])
    return batch, logits


def build_model(model_config: ModelConfig, device) -> Model:
    return Model(model_config).to(device)


def model_config_for(cfg: TrainConfig, splits: DataSplits) -> ModelConfig:
    try:
        weights = class_weights_for(cfg.class_weights, splits)   # None unless --class-weights balanced
        return ModelConfig(**{**cfg.model, **splits.model_dims(), **({"class_weights": weights} if weights else {})})
    except (TypeError, ValueError) as exc:
        raise UserError(str(exc)) from None


def eval_loader(cfg: TrainConfig, dataset):
    return DataLoader(dataset, batch_size=cfg.batch_size, shuffle=False, collate_fn=collate_fn(cfg),
                      num_workers=cfg.num_workers)


def collate_fn(cfg: TrainConfig):
    """Shape buckets with --shape-buckets or --cuda-graphs (a graph per shape), else the tightest padding."""
    return ShapeBuckets(batch_size=cfg.batch_size) if cfg.shape_buckets or cfg.cuda_graphs else collate_dialogues
