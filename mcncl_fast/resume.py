"""`train --resume CHECKPOINT`: continue the saved run, whatever folder it is started from.

The run's own options come from the checkpoint: data, model, optimisation, epochs and output folder (the
checkpoint's own folder). An option given explicitly is
* applied, and said, when a resumed run may change it (RESUME_OVERRIDES: epochs, patience, device, ...);
* applied when it is `--data-path` / `--visual-path`: the same data at a new place (checked against the
  data summary the checkpoint holds once the data is loaded);
* an error when it conflicts with the checkpoint (model shape, data set, learning rate, seed, ...);
* ignored when equal to the saved value.
"""
from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Iterable, List, Optional, Set, Tuple

from .data.errors import UserError
from .runtime import RESUME_OVERRIDES, TrainConfig

MOVABLE = ("data_path", "visual_path")     # the same data at a new place


def option(name: str) -> str:
    return "--" + name.split(":")[-1].replace("_", "-")


def explicit_fields(cfg: TrainConfig) -> Set[str]:
    """For the Python API: the fields of `cfg` that differ from TrainConfig's defaults ("model:<key>" for
    model options)."""
    default = TrainConfig()
    names = {f.name for f in fields(TrainConfig)
             if f.name != "model" and getattr(cfg, f.name) != getattr(default, f.name)}
    return names | {f"model:{key}" for key in cfg.model}


def resumed_config(saved: dict, cfg: TrainConfig, explicit: Optional[Iterable[str]],
                   checkpoint: Path) -> Tuple[TrainConfig, List[str]]:
    """-> (the config to run, notes on the options that changed)."""
    explicit = explicit_fields(cfg) if explicit is None else set(explicit)
    values = dict(saved)
    values["model"] = dict(saved.get("model", {}))
    notes = []
    if "output_dir" not in explicit:
        values["output_dir"] = str(Path(checkpoint).resolve().parent)
    for name in sorted(explicit):
        if name.startswith("model:"):
            key = name.split(":", 1)[1]
            new, old = cfg.model[key], values["model"].get(key)
            if new != old:
                raise UserError(f"{option(name)} {new}: conflicts with the checkpoint ({old}); a resumed run keeps "
                                f"its model")
            continue
        new, old = getattr(cfg, name), values.get(name)
        if new == old:
            continue
        if name in RESUME_OVERRIDES or name in MOVABLE:
            values[name] = new
            notes.append(f"{option(name)}: {old} -> {new}")
        else:
            raise UserError(f"{option(name)} {new}: conflicts with the checkpoint ({old}); a resumed run keeps the "
                            f"data, model and optimisation options it was started with (allowed to change: "
                            f"{', '.join(option(n) for n in RESUME_OVERRIDES + MOVABLE)})")
    known = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in values.items() if k in known}), notes


def data_summary(splits) -> dict:
    """What identifies a data set well enough to tell the same data at a new place from other data."""
    return {"class_names": list(splits.class_names), "train": len(splits.train), "dev": len(splits.dev),
            "test": len(splits.test), **splits.model_dims()}


def check_same_data(saved: Optional[dict], splits, cfg: TrainConfig) -> None:
    if saved is None:
        return
    now = data_summary(splits)
    diff = [f"{k} {saved[k]} -> {now.get(k)}" for k in saved if saved[k] != now.get(k)]
    if diff:
        raise UserError(f"--data-path {cfg.data_path}: not the data this run was trained on ({'; '.join(diff)})")
