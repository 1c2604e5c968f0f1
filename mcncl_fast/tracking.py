"""Experiment tracking: per-epoch scalars for TensorBoard (`train --tensorboard`).

`train(..., epoch_callback=cb)` calls `cb(entry)` once per epoch on the main process, with the
history entry it has just appended ({"epoch", "train_loss", "dev_weighted_f1", "lr"}). A
`TensorBoardCallback` writes those as scalars (x axis: the epoch) into `<output-dir>/tensorboard`;
`tensorboard --logdir <output-dir>` shows them. TensorBoard is an optional dependency
(`pip install -e ".[track]"`); without it the callback is refused with a one-line error before
training starts.
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Iterator, Optional

from .data.errors import UserError

# history entry key -> TensorBoard tag
SCALARS = {"train_loss": "train/loss", "dev_weighted_f1": "dev/weighted_f1", "lr": "train/lr"}
LOG_SUBDIR = "tensorboard"


def _summary_writer_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("--tensorboard: the tensorboard package is not installed; "
                        "pip install tensorboard (or pip install -e \".[track]\")") from None
    return SummaryWriter


class TensorBoardCallback:
    """Writes each epoch's loss, dev weighted F1 and learning rate; the event file is opened at the first
    epoch (so processes that never call it write nothing) and flushed after every epoch."""

    def __init__(self, log_dir):
        self._writer_class = _summary_writer_class()
        self.log_dir = Path(log_dir)
        self.writer = None

    def __call__(self, entry: dict) -> None:
        if self.writer is None:
            self.writer = self._writer_class(log_dir=str(self.log_dir))
        for key, tag in SCALARS.items():
            value = entry.get(key)
            if value is not None and math.isfinite(value):
                self.writer.add_scalar(tag, float(value), global_step=int(entry["epoch"]))
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


@contextlib.contextmanager
def epoch_callback(output_dir, tensorboard: bool = False) -> Iterator[Optional[TensorBoardCallback]]:
    """The epoch callback the command line passes to `train` (None without --tensorboard); closed on exit."""
    if not tensorboard:
        yield None
        return
    callback = TensorBoardCallback(Path(output_dir) / LOG_SUBDIR)
    try:
        yield callback
    finally:
        callback.close()
