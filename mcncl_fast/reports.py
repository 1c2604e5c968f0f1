"""Reports written after train/evaluate: the paper-style F1 table, a confusion matrix and training curves.

* `f1_table(report)`: markdown laid out like the paper's Tables 1-2: one row,
  the classes as columns in the data set's class order, then weighted F1, macro F1
  and accuracy, values in percent with two decimals.
* `save_confusion_png(report, path)`: row-normalised confusion matrix (true
  class per row) with the counts printed in each cell.
* `save_curves_png(history, path)`: mean training loss and dev weighted F1 per epoch.

Figures use matplotlib's Agg canvas directly (no pyplot, no display needed).
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np


# overall scores after the per-class columns: (column title, report key, name); a key the report lacks is left out
SUMMARY_COLUMNS = (("W-F1", "weighted_f1", "weighted F1"), ("M-F1", "macro_f1", "macro F1"),
                   ("Acc", "accuracy", "accuracy"))


def f1_table(report: dict, row_name: str = "MCN-CL (mcncl_fast)") -> str:
    classes = list(report["per_class_f1"])
    summary = [column for column in SUMMARY_COLUMNS if column[1] in report]
    header = "| Model | " + " | ".join([c.capitalize() for c in classes] + [c[0] for c in summary]) + " |"
    rule = "|---|" + "---:|" * (len(classes) + len(summary))
    cells = [f"{100 * report['per_class_f1'][c]:.2f}" for c in classes] + [f"{100 * report[c[1]]:.2f}" for c in summary]
    scores = ", ".join(c[2] for c in summary)
    title = f"{report.get('dataset', '')} {report.get('split', '')}: per-class F1 (%), {scores}".strip()
    return "\n".join([f"**{title}**", "", header, rule, f"| {row_name} | " + " | ".join(cells) + " |", ""])


def _figure(width, height):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height), dpi=120)
    FigureCanvasAgg(fig)
    return fig


def save_confusion_png(report: dict, path, title: Optional[str] = None) -> Path:
    names: List[str] = list(report["per_class_f1"])
    cm = np.asarray(report["confusion_matrix"], dtype=np.int64)
    rows = cm.sum(axis=1, keepdims=True)
    frac = np.divide(cm, np.maximum(rows, 1), dtype=np.float64)
    size = 1.2 + 0.75 * len(names)
    fig = _figure(size + 1.5, size)
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    ax.set_xticks(range(len(names)), labels=names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), labels=names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, f"{cm[i, j]}", ha="center", va="center", fontsize=8,
                    color="white" if frac[i, j] > 0.5 else "black")
    ax.set_title(title or f"{report.get('dataset', '')} {report.get('split', '')}: "
                 f"weighted F1 {100 * report['weighted_f1']:.2f}")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def save_curves_png(history: Sequence[dict], path) -> Path:
    epochs = [h["epoch"] for h in history]
    fig = _figure(9, 3.6)
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    ax1.plot(epochs, [h["train_loss"] for h in history], marker="o")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("mean training loss")
    ax1.set_title("training loss")
    ax2.plot(epochs, [100 * h["dev_weighted_f1"] for h in history], marker="o", color="tab:green")
    if history:
        best = max(range(len(history)), key=lambda i: history[i]["dev_weighted_f1"])
        ax2.scatter([epochs[best]], [100 * history[best]["dev_weighted_f1"]], s=80, facecolors="none",
                    edgecolors="red", label="best (checkpoint)")
        ax2.legend(loc="lower right")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("dev weighted F1 (%)")
    ax2.set_title("dev weighted F1")
    from matplotlib.ticker import MaxNLocator
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def write_reports(report: dict, directory, prefix: str, history: Optional[Sequence[dict]] = None) -> dict:
    """Write `{prefix}_f1_table.md`, `{prefix}_confusion.png` (and `curves.png` given a history).

    Returns {kind: path} of what was written.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    table = directory / f"{prefix}_f1_table.md"
    table.write_text(f1_table(report))
    confusion = save_confusion_png(report, directory / f"{prefix}_confusion.png")
    written = {"f1_table": str(table), "confusion_png": str(confusion)}
    if history:
        written["curves_png"] = str(save_curves_png(history, directory / "curves.png"))
    return written


def seeds_table(summary: dict) -> str:
    """Markdown of a seed sweep (experiments.summarize): one row per seed, then mean ± std."""
    columns = [("Dev W-F1", "dev_weighted_f1"), ("Test W-F1", "test_weighted_f1"), ("Test M-F1", "test_macro_f1"),
               ("Test Acc", "test_accuracy")]
    lines = [f"**{summary['dataset']}: {len(summary['runs'])} seeds, test at the best dev weighted F1 epoch (%)**", "",
             "| Seed | Best epoch | " + " | ".join(title for title, _ in columns) + " |",
             "|---:|---:|" + "---:|" * len(columns)]
    for run in summary["runs"]:
        cells = [f"{100 * run[key]:.2f}" for _, key in columns]
        lines.append(f"| {run['seed']} | {run['best_epoch']} | " + " | ".join(cells) + " |")
    cells = [f"{100 * summary['mean'][key]:.2f} ± {100 * summary['std'][key]:.2f}" for _, key in columns]
    lines.append("| mean ± std | | " + " | ".join(cells) + " |")
    lines += ["", f"std: sample standard deviation over the seeds (ddof={summary['std_ddof']})", ""]
    return "\n".join(lines)
