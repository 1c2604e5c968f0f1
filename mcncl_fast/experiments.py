"""Runs made of trainings: one training with its epoch callbacks, and a seed sweep (`train --seeds 0 1 2`).

A sweep trains once per seed in `<output-dir>/seed<k>/` (each a complete run: checkpoints,
report.json, figures) and writes `<output-dir>/summary.json` and `summary.md`: per seed the best
epoch, the dev weighted F1 there and the test weighted F1, macro F1 and accuracy of that epoch's
checkpoint, then their mean ± std (sample standard deviation, ddof = 1; 0 for a single seed).
Every test score is taken at the epoch chosen on dev, never at the best test epoch.
With the synthetic data set the seed also draws the data (`synthetic_splits(seed=...)`); with a
data file only the initialisation, the shuffling and dropout change (a carved dev split is fixed).
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from tqdm.auto import tqdm

from ._files import write_text_atomic
from .data.errors import UserError
from .runtime import TrainConfig
from .tracking import epoch_callback

# summary.json keys of each run -> the key in that run's report.json
RUN_METRICS = {"test_weighted_f1": "weighted_f1", "test_macro_f1": "macro_f1", "test_accuracy": "accuracy",
               "dev_weighted_f1": "best_dev_weighted_f1"}
STD_DDOF = 1


def train_run(cfg: TrainConfig, tensorboard: bool = False, **train_options) -> dict:
    """`train(cfg, **train_options)` with the epoch callbacks the command line asks for (TensorBoard)."""
    from .train import train
    with epoch_callback(cfg.output_dir, tensorboard) as callback:
        return train(cfg, epoch_callback=callback, **train_options)


def summarize(seeds: Sequence[int], reports: Sequence[dict], output_dirs: Sequence[str]) -> dict:
    """summary.json's content from the per-seed reports (same order as `seeds`)."""
    runs = []
    for seed, report, out in zip(seeds, reports, output_dirs):
        dev = [h["dev_weighted_f1"] for h in report.get("history", [])]
        run = {"seed": int(seed), "output_dir": str(out), "epochs": len(dev),
               "best_epoch": int(np.argmax(dev)) + 1 if dev else 0}
        run.update({key: float(report[source]) for key, source in RUN_METRICS.items()})
        runs.append(run)
    ddof = STD_DDOF if len(runs) > 1 else 0
    values = {key: np.array([run[key] for run in runs], dtype=np.float64) for key in RUN_METRICS}
    return {"dataset": reports[0]["dataset"], "seeds": [int(s) for s in seeds], "runs": runs,
            "mean": {key: float(v.mean()) for key, v in values.items()},
            "std": {key: float(v.std(ddof=ddof)) for key, v in values.items()}, "std_ddof": ddof,
            "protocol": "each run's test scores are those of its best dev weighted F1 epoch (best.pt)"}


def write_summary(summary: dict, directory) -> dict:
    from .reports import seeds_table
    directory = Path(directory)
    files = {"summary_json": directory / "summary.json", "summary_md": directory / "summary.md"}
    write_text_atomic(files["summary_json"], json.dumps(summary, indent=2))
    write_text_atomic(files["summary_md"], seeds_table(summary))
    return {k: str(v) for k, v in files.items()}


def run_seeds(cfg: TrainConfig, seeds: Sequence[int], tensorboard: bool = False,
              overwrite: bool = False) -> Optional[dict]:
    """One training per seed in `<cfg.output_dir>/seed<k>/`, then summary.json / summary.md there.

    Returns the summary (None on the non-main processes of a torchrun job)."""
    seeds = list(seeds)
    if not seeds:
        raise UserError("--seeds: give at least one seed")
    if len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds: each seed once, got {seeds}")
    for seed in seeds:   # every option is checked before the first run starts
        replace(cfg, seed=seed)
    out = Path(cfg.output_dir)
    reports, dirs = [], []
    for i, seed in enumerate(seeds):
        run_cfg = replace(cfg, seed=seed, output_dir=str(out / f"seed{seed}"))
        tqdm.write(f"seed {seed} ({i + 1}/{len(seeds)}): {run_cfg.output_dir}")
        reports.append(train_run(run_cfg, tensorboard=tensorboard, overwrite=overwrite))
        dirs.append(run_cfg.output_dir)
    if not all(r.get("files") for r in reports):   # only the main process writes files
        return None
    summary = summarize(seeds, reports, dirs)
    summary["files"] = write_summary(summary, out)
    return summary


def format_summary(summary: dict) -> str:
    from .reports import seeds_table
    return seeds_table(summary) + "written: " + "  ".join(summary.get("files", {}).values())
