"""`python -m mcncl_fast predict`: a checkpoint's predictions for every utterance of a data file, as CSV.

One row per utterance, in dialogue order:

    split, dialogue_id, utterance, predicted, prob_<class 0>, ..., prob_<class K-1>

`utterance` is the utterance's index in its dialogue, `predicted` the class name of the largest
probability, the `prob_` columns the softmax over the checkpoint's classes (they sum to 1). `split`
is the split the dialogue belongs to (raw MELD numbers its dialogues per split, so an id alone may
repeat under `--split all`). Labels are not needed: a file whose labels are all -1 (or -100)
gets a row for every utterance, as does an utterance whose label is ignored (e.g. frustrated under
iemocap-4). The data set, file, label set and RoBERTa mode default to the checkpoint's; the CSV is
written atomically (a temp file in the same folder, then a rename).
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .data import DATASETS, collate_dialogues
from ._files import atomic_path
from .data.errors import UserError
from .evaluation import restore
from .output_guard import check_outputs
from .runtime import forward_logits

SPLITS = ("train", "dev", "test", "all")


def _collate_with_ids(batch):
    return collate_dialogues(batch), [str(d["id"]) for d in batch]


@torch.no_grad()
def dialogue_probabilities(model, dataset, device, batch_size: int, modalities: str = "tav",
                           precision: str = "fp32", num_workers: int = 0, desc: str = "predict",
                           show: bool = True) -> Iterator[Tuple[str, torch.Tensor]]:
    """(dialogue id, softmax probabilities [S_d, K] float32 on the CPU) per dialogue, in dataset order."""
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=_collate_with_ids,
                        num_workers=num_workers)
    for batch, ids in tqdm(loader, desc=desc, dynamic_ncols=True, disable=not show):
        lengths = batch["utterance_mask"].sum(1).tolist()
        _, logits = forward_logits(model, batch, device, modalities, precision)
        probs = torch.softmax(logits.float(), dim=-1).cpu()
        for i, (vid, n) in enumerate(zip(ids, lengths)):
            yield vid, probs[i, :n]


def header(class_names: Sequence[str]) -> List[str]:
    return ["split", "dialogue_id", "utterance", "predicted"] + [f"prob_{c}" for c in class_names]


def predict_file(checkpoint, output, data_path=None, dataset: Optional[str] = None, split: str = "all",
                 device: str = "auto", batch_size: Optional[int] = None, visual_path=None,
                 show: bool = True) -> dict:
    """Write the predictions CSV; returns {"output", "rows", "dialogues", "splits", "class_names"}."""
    if split not in SPLITS:
        raise UserError(f"--split: expected one of {', '.join(SPLITS)}, got {split!r}")
    if batch_size is not None and batch_size < 1:
        raise UserError(f"--batch-size: expected a positive number of dialogues, got {batch_size}")
    output = Path(output)
    if output.is_dir():
        raise UserError(f"--output: {output} is a folder; expected a .csv file path")
    model, cfg, splits, dev = restore(checkpoint, device, dataset, data_path, visual_path, batch_size)
    check_outputs([output], [checkpoint, cfg.data_path, cfg.visual_path])
    chosen = ("train", "dev", "test") if split == "all" else (split,)
    names = list(splits.class_names)
    rows = dialogues = 0
    with atomic_path(output) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header(names))
        for part in chosen:
            for vid, probs in dialogue_probabilities(model, getattr(splits, part), dev, cfg.batch_size,
                                                     cfg.modalities, cfg.precision, cfg.num_workers,
                                                     desc=f"predict {part}", show=show):
                best = probs.argmax(-1).tolist()
                for u, (p, k) in enumerate(zip(probs.tolist(), best)):
                    writer.writerow([part, vid, u, names[k]] + [f"{x:.8g}" for x in p])
                rows, dialogues = rows + len(best), dialogues + 1
    return {"output": str(output), "rows": rows, "dialogues": dialogues, "splits": list(chosen),
            "class_names": names}


def add_predict_parser(sub) -> None:
    p = sub.add_parser("predict", help="write a checkpoint's per-utterance predictions (CSV); labels not needed",
                       description="One CSV row per utterance: split, dialogue_id, utterance (index in the "
                                   "dialogue), predicted (class name), prob_<class> (softmax) per class.")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data-path", default=None,
                   help="data file (meld, iemocap) or folder (features); default: the checkpoint's")
    p.add_argument("--dataset", choices=DATASETS, default=None, help="default: the checkpoint's")
    p.add_argument("--visual-path", default=None, help="meld/iemocap: visual features file (as for train)")
    p.add_argument("--split", choices=SPLITS, default="all", help="all: train, dev and test (default)")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=None, help="dialogues per batch; default: the checkpoint's")
    p.add_argument("--output", required=True, help="the CSV file to write")


def run_from_args(args) -> str:
    result = predict_file(args.checkpoint, args.output, data_path=args.data_path, dataset=args.dataset,
                          split=args.split, device=args.device, batch_size=args.batch_size,
                          visual_path=args.visual_path)
    return (f"wrote {result['rows']} predictions ({result['dialogues']} dialogues, split "
            f"{'+'.join(result['splits'])}) to {result['output']}")
