"""The training loop: epochs of TrainStep (mcncl_fast/step.py), dev evaluation, checkpoints, the test report.

Checkpoints (mcncl_fast/checkpoints.py) are written atomically and hold everything needed to resume bit-for-bit:
model and optimizer state, epoch, best dev score, RNG state, and the run's options.
The shuffling order of epoch e depends only on (seed, e), so a resumed run
sees the same batches as an uninterrupted one.

Under `torchrun --nproc_per_node=N` the same loop runs DistributedDataParallel
(mcncl_fast/distributed.py): each process trains on its DistributedSampler
shard (--batch-size dialogues per process), the loss is that of the global
batch (all-gathered SupCon), rank 0 logs and writes checkpoints and reports,
and dev/test metrics are computed over the whole split (sharded, gathered).
"""
from __future__ import annotations

import math
import time
import uuid
from time import monotonic
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler
from tqdm.auto import tqdm

from . import distributed
from .checkpoints import CHECKPOINT_VERSION, load_checkpoint, save_checkpoint
from .data import DataSplits, load_dataset
from .data.errors import UserError
from .finite import NonFiniteOutputError, check_weights
from .evaluation import evaluate, evaluate_split, format_report, metrics_report, predict_split, write_report
from .model import ModelConfig
from .runtime import (LR_SCHEDULES, PRECISIONS, TrainConfig, autocast, batch_to_device,
                      build_model, collate_fn, model_config_for, resolve_device)
from .resume import check_same_data, data_summary, resumed_config
from .prefetch import DevicePrefetcher
from .run_dir import RunDirectory
from .step import CudaGraphStep, StepLog, TrainStep, load_optimizer_state, make_optimizer

__all__ = ["train", "evaluate", "TrainConfig", "UserError", "load_checkpoint", "save_checkpoint", "metrics_report",
           "format_report", "LR_SCHEDULES", "PRECISIONS", "CHECKPOINT_VERSION", "evaluate_split"]


# The progress bar's loss is the mean since its last refresh, read from the device (one host sync) at the
# first step, then whenever REFRESH_SECONDS have passed or REFRESH_STEPS steps, whichever comes first.
REFRESH_SECONDS = 1.0
REFRESH_STEPS = 10


def loaders(cfg: TrainConfig, splits: DataSplits, epoch: int, ctx=None):
    if ctx is not None and ctx.enabled:
        sampler = DistributedSampler(splits.train, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True,
                                     seed=cfg.seed, drop_last=False)
        sampler.set_epoch(epoch)
    else:
        sampler = RandomSampler(splits.train, generator=torch.Generator().manual_seed(cfg.seed * 100003 + epoch))
    # pinned host memory on CUDA: the prefetcher's copy to the device is then asynchronous
    pin = ctx is not None and ctx.device.type == "cuda"
    common = dict(batch_size=cfg.batch_size, collate_fn=collate_fn(cfg), num_workers=cfg.num_workers, pin_memory=pin)
    return DataLoader(splits.train, sampler=sampler, **common)


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
          step_callback: Optional[Callable[[int, int, float], None]] = None,
          explicit: Optional[Iterable[str]] = None, overwrite: bool = False,
          epoch_callback: Optional[Callable[[dict], None]] = None) -> dict:
    """Train, keep the best dev checkpoint, report on test. Returns the report dict.

    resume: a checkpoint to continue (mcncl_fast/resume.py); `explicit` names the options the user gave
    (the command line knows; from Python, the fields of `cfg` that differ from the defaults).
    overwrite: replace the checkpoints of an earlier run in the output folder.
    epoch_callback(entry): called on the main process after each epoch with the epoch's history entry
    (epoch, train_loss, dev_weighted_f1, lr), e.g. mcncl_fast.tracking.TensorBoardCallback.
    Under torchrun (WORLD_SIZE > 1) this runs DDP; every rank returns the same report.
    """
    state, notes = None, []
    if resume:
        state = load_checkpoint(resume)
        cfg, notes = resumed_config(state["train_config"], cfg, explicit, Path(resume))
    if cfg.dataset == "synthetic" and (cfg.data_path or cfg.visual_path):   # else: trains on generated data
        raise UserError("--data-path / --visual-path: not used by the synthetic data set; name the file's data set "
                        "with --dataset meld|iemocap|features")
    device = resolve_device(cfg.device)
    ctx = distributed.setup(device)
    run_dir = RunDirectory(cfg.output_dir)
    try:
        if ctx.is_main:
            run_dir.open(resuming=state is not None, overwrite=overwrite,
                         run_id=state.get("run_id") if state else None)
        for note in notes if ctx.is_main else ():
            tqdm.write(f"resume: {note}")
        return _train(cfg, state, ctx, Path(cfg.output_dir), step_callback, epoch_callback)
    finally:
        run_dir.close()
        distributed.cleanup(ctx)


def _train(cfg, state, ctx, out_dir, step_callback, epoch_callback=None):
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
                          visual_path=cfg.visual_path, label_set=cfg.label_set, roberta=cfg.roberta)
    if len(splits.train) == 0:
        raise UserError(f"--dataset {cfg.dataset}: the train split is empty")
    check_same_data(state.get("data") if state else None, splits, cfg)
    # rank 0's id on every rank: the id names the run, whose best.pt every rank reads at the end
    run_id = distributed.gather_objects(state.get("run_id") if state else uuid.uuid4().hex, ctx)[0]
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
        # one entry point for one process and for DDP: the forward (under autocast with bf16), then the
        # loss in fp32 over the batch of every process (SupCon over every rank's embeddings; without a
        # process group, exactly Model.forward's loss)
        with autocast(device, cfg.precision, cache_enabled=not cfg.cuda_graphs):
            out = train_forward(batch["text"], batch["audio"], batch["visual"], batch["utterance_mask"],
                                batch["frame_mask"])
        return distributed.global_batch_loss(out.logits, out.features, batch["labels"], batch["utterance_mask"],
                                             model_config, supcon)["loss"]

    train_step = TrainStep(forward_loss, model, optimizer, cfg.grad_clip)
    if cfg.cuda_graphs:
        train_step = CudaGraphStep(train_step)

    def checkpoint(epoch):
        return {"format": "mcncl_fast", "version": CHECKPOINT_VERSION, "epoch": epoch,
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "model_config": model_config.to_dict(), "train_config": asdict(cfg),
                "class_names": splits.class_names, "best_dev_f1": best_f1, "history": history,
                "world_size": ctx.world_size, "run_id": run_id, "data": data_summary(splits),
                "rng": {"torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}}

    started, stopped_early = time.time(), False
    for epoch in range(start_epoch, cfg.epochs):
        if cfg.patience and epochs_since_best(history) >= cfg.patience:
            stopped_early = True
            log(f"early stopping: no better dev weighted F1 for {cfg.patience} epochs")
            break
        model.train()
        log_steps = StepLog(device, epoch, REFRESH_STEPS)      # losses stay on the device, read per refresh
        # on CUDA the next batch's copy runs on a side stream during this step (mcncl_fast/prefetch.py)
        batches = DevicePrefetcher(loaders(cfg, splits, epoch, ctx), device,
                                   move=lambda batch: batch_to_device(batch, device, cfg.modalities))
        bar = tqdm(batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", dynamic_ncols=True, disable=not main)
        shown_at = monotonic()
        for step, batch in enumerate(bar):
            log_steps.add(train_step(batch))
            scheduler.step()
            if step_callback is not None:
                step_callback(epoch, step, float(log_steps.values[log_steps.filled - 1, 0]))
            # under torchrun by step count only: every rank reads (and may stop on a non-finite loss) at the
            # same steps, never one rank alone while the others wait in a collective
            timed = not ctx.enabled and monotonic() - shown_at >= REFRESH_SECONDS
            if step == 0 or log_steps.full or timed:
                lr_now = cfg.lr * lr_factor(scheduler.last_epoch - 1, total_steps, cfg)
                bar.set_postfix(loss=f"{log_steps.read():.4f}", lr=f"{lr_now:.2e}")
                shown_at = monotonic()
        losses = [log_steps.epoch_mean()] if log_steps.steps else []
        # the last step's update can make the weights NaN with a finite loss: nothing is saved from them
        check_weights(model, f"training diverged at the end of epoch {epoch + 1} (lower --lr)")
        try:
            y_true, y_pred = predict_split(eval_forward, cfg, splits.dev, device, ctx, desc="dev")
        except NonFiniteOutputError as exc:     # finite weights can still overflow: the same divergence
            raise NonFiniteOutputError(f"training diverged at the end of epoch {epoch + 1} (lower --lr): "
                                       f"{exc}") from None
        dev = metrics_report(y_true, y_pred, splits.class_names)
        history.append({"epoch": epoch + 1, "train_loss": float(np.mean(losses)) if losses else float("nan"),
                        "dev_weighted_f1": dev["weighted_f1"], "lr": float(scheduler.get_last_lr()[0])})
        if main and epoch_callback is not None:
            epoch_callback(history[-1])
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
    best = load_checkpoint(best_path) if best_path.exists() else None
    if best is None or best.get("run_id") != run_id:      # the test score is this run's, at its best dev epoch
        raise UserError(f"{best_path}: {'missing' if best is None else 'written by another run'}; "
                        f"this run has no best checkpoint to report on")
    model.load_state_dict(best["model"])
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


