"""Evaluation: predictions over a split, the metrics report (scikit-learn), `evaluate` of a checkpoint."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from sklearn.metrics import classification_report, confusion_matrix, f1_score
from torch.utils.data import Subset
from tqdm.auto import tqdm

from . import distributed
from ._files import write_text_atomic
from .checkpoints import load_checkpoint
from .data import DataSplits, load_dataset
from .data.errors import UserError
from .model import ModelConfig
from .reference.ops import IGNORE_INDEX
from .runtime import TrainConfig, build_model, eval_loader, forward_logits, resolve_device


def metrics_report(y_true, y_pred, class_names) -> dict:
    labels = list(range(len(class_names)))
    if len(y_true) == 0:   # an empty split (e.g. every clip of a tiny extraction skipped)
        zeros = {name: 0.0 for name in class_names}
        return {"weighted_f1": 0.0, "macro_f1": 0.0, "accuracy": 0.0, "per_class_f1": zeros,
                "support": dict.fromkeys(class_names, 0),
                "class_names": list(class_names), "confusion_matrix": [[0] * len(labels) for _ in labels],
                "classification_report": "(no utterances)"}
    report = classification_report(y_true, y_pred, labels=labels, target_names=class_names,
                                   output_dict=True, zero_division=0)
    return {"weighted_f1": float(f1_score(y_true, y_pred, labels=labels, average="weighted", zero_division=0)),
            # the unweighted mean over ALL classes of the data set (classification_report's "macro avg"; a class
            # that neither occurs nor is predicted counts as F1 0)
            "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
            "accuracy": float(np.mean(np.asarray(y_true) == np.asarray(y_pred))) if len(y_true) else 0.0,
            "per_class_f1": {name: float(report[name]["f1-score"]) for name in class_names},
            "support": {name: int(report[name]["support"]) for name in class_names},
            "class_names": list(class_names),
            "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
            "classification_report": classification_report(y_true, y_pred, labels=labels, target_names=class_names,
                                                           digits=4, zero_division=0)}


@torch.no_grad()
def predict(model, loader, device, modalities="tav", desc="eval", precision="fp32", show=True):
    model.eval()
    y_true, y_pred = [torch.zeros(0, dtype=torch.int64)], [torch.zeros(0, dtype=torch.int64)]
    for batch in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=not show):
        batch, logits = forward_logits(model, batch, device, modalities, precision)
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


def evaluate_split(model, cfg: TrainConfig, splits: DataSplits, split: str, device, ctx=None) -> dict:
    dataset = {"train": splits.train, "dev": splits.dev, "test": splits.test}[split]
    y_true, y_pred = predict_split(model, cfg, dataset, device, ctx, desc=split)
    report = metrics_report(y_true, y_pred, splits.class_names)
    report.update({"split": split, "dataset": cfg.dataset, "num_utterances": int(len(y_true))})
    return report


def restore(checkpoint_path, device: str = "auto", dataset: Optional[str] = None, data_path=None,
            visual_path=None, batch_size: Optional[int] = None):
    """A checkpoint's model on `device` and the data to run it on -> (model, cfg, splits, device).

    The data are the checkpoint's (same data set, file, label set, RoBERTa mode, synthetic seed and
    scale) unless `dataset` / `data_path` name another file or the new place of a moved one;
    `visual_path` replaces the checkpoint's visual file (kept when the data set is the same). The
    data must have the checkpoint's classes and feature dims (one-line UserError otherwise)."""
    state = load_checkpoint(checkpoint_path)
    cfg = TrainConfig(**{**state["train_config"], "device": device})
    same = dataset is None or dataset == cfg.dataset
    dataset = cfg.dataset if dataset is None else dataset
    if dataset == "synthetic" and (data_path is not None or visual_path is not None):
        raise UserError("--data-path / --visual-path: not used with the synthetic data set (it is generated); "
                        "name the file's data set with --dataset meld|iemocap|features")
    if data_path is None and same and cfg.data_path is not None and not Path(cfg.data_path).exists():
        raise UserError(f"--data-path: the checkpoint's data {cfg.data_path} does not exist (moved?); "
                        f"pass its new place with --data-path")
    if visual_path is None and same and cfg.visual_path is not None and not Path(cfg.visual_path).exists():
        raise UserError(f"--visual-path: the checkpoint's visual features {cfg.visual_path} do not exist "
                        f"(moved?); pass their new place with --visual-path")
    cfg = replace(cfg, dataset=dataset,
                  data_path=str(data_path) if data_path is not None else (cfg.data_path if same else None),
                  visual_path=str(visual_path) if visual_path is not None else (cfg.visual_path if same else None),
                  batch_size=cfg.batch_size if batch_size is None else batch_size)
    dev = resolve_device(device)
    splits = load_dataset(cfg.dataset, cfg.data_path, seed=cfg.seed, synthetic_scale=cfg.synthetic_scale,
                          visual_path=cfg.visual_path, label_set=cfg.label_set, roberta=cfg.roberta)
    model_config = ModelConfig.from_dict(state["model_config"])
    where = cfg.data_path or cfg.dataset
    if list(splits.class_names) != list(state.get("class_names", splits.class_names)):
        raise UserError(f"{where}: classes {splits.class_names} differ from the checkpoint's {state['class_names']}")
    dims = {k: (v, getattr(model_config, k)) for k, v in splits.model_dims().items() if v != getattr(model_config, k)}
    if dims:
        name, (got, want) = next(iter(dims.items()))
        raise UserError(f"{where}: {name.replace('_', ' ')} {got} differs from the checkpoint's {want} "
                        f"(a model runs only on features like those it was trained on)")
    model = build_model(model_config, dev)
    model.load_state_dict(state["model"])
    return model, cfg, splits, dev


def evaluate(checkpoint_path, split: str = "test", device: str = "auto", output: Optional[str] = None,
             data_path=None, dataset: Optional[str] = None, visual_path=None) -> dict:
    """Metrics of a saved model on a split of its data set, or of another file (`data_path`, `dataset`:
    see `restore`). With `output` (a .json path), the F1 table (markdown) and the confusion-matrix PNG
    are written beside it as <stem>_f1_table.md and <stem>_confusion.png."""
    if output is not None and Path(output).is_dir():
        raise UserError(f"--output {output}: is a folder; give the path of the .json report to write")
    model, cfg, splits, dev = restore(checkpoint_path, device, dataset, data_path, visual_path)
    if output:
        from .output_guard import check_outputs
        out = Path(output)
        check_outputs([out, out.with_name(out.stem + "_f1_table.md"), out.with_name(out.stem + "_confusion.png")],
                      [checkpoint_path, cfg.data_path, cfg.visual_path])
    report = evaluate_split(model, cfg, splits, split, dev)
    if report["num_utterances"] == 0:
        raise UserError(f"{cfg.data_path or cfg.dataset}: the {split} split has no labelled utterance to score "
                        f"(labels -1 / -100 only); `python -m mcncl_fast predict` gives predictions")
    report.update({"checkpoint": str(checkpoint_path), "data_path": cfg.data_path})
    if output:
        from .reports import write_reports
        output = Path(output)
        report["files"] = write_reports(report, output.parent, output.stem)
        report["files"]["report_json"] = str(output)
        write_report(report, output)
    return report


def write_report(report: dict, path: Path) -> None:
    """JSON, written atomically; a failure leaves no temp file."""
    write_text_atomic(path, json.dumps(report, indent=2))


def format_report(report: dict) -> str:
    from .reports import f1_table
    macro = f"macro F1 {report['macro_f1']:.4f}  " if "macro_f1" in report else ""
    lines = [f"{report['dataset']} {report['split']}: weighted F1 {report['weighted_f1']:.4f}  {macro}"
             f"accuracy {report['accuracy']:.4f}  ({report['num_utterances']} utterances)",
             report["classification_report"], f1_table(report)]
    if report.get("files"):
        lines.append("written: " + "  ".join(report["files"].values()))
    return "\n".join(lines)
