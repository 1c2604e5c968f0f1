"""Command line: `python -m mcncl_fast {train,evaluate,extract} ...`.

Multi-GPU: `torchrun --nproc_per_node=N -m mcncl_fast train ...` (DDP; NCCL on
GPUs, gloo on CPU; --batch-size is per process). User mistakes (bad option values, missing or corrupt checkpoints, unreadable
data files) are reported as one line on stderr with exit status 2.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

from .data import DATASETS
from .model import ModelConfig
from .evaluation import evaluate, format_report
from .runtime import LR_SCHEDULES, PRECISIONS, TrainConfig
from .data.errors import UserError
from .train import train

DATASET_HELP = ("synthetic: generated MELD-shaped data (no file); meld / iemocap: a DialogueRNN/COSMIC feature "
                "pickle (9-tuple) as --data-path - dev is carved from train (10%%, fixed seed); MELD has no visual "
                "features: the model then sees ONE ALL-ZERO visual frame (dim 1) per utterance unless --visual-path "
                "is given; features: a folder of our feature store (train/dev/test.safetensors, from "
                "`python -m mcncl_fast extract`)")

# ModelConfig fields the data decides; everything else is a command-line option
DATA_FIELDS = {"text_dim", "audio_dim", "visual_dim", "num_classes"}


def _add_model_options(parser):
    group = parser.add_argument_group("model hyper-parameters (ModelConfig)")
    for f in fields(ModelConfig):
        if f.name in DATA_FIELDS:
            continue
        kind = type(f.default)
        extra = {"choices": ["input", "layer"]} if f.name == "kv_source" else {}
        group.add_argument(f"--{f.name.replace('_', '-')}", dest=f"model_{f.name}", type=kind, default=None,
                           metavar=kind.__name__.upper(), help=f"default {f.default}", **extra)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mcncl_fast", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    d = TrainConfig()

    tr = sub.add_parser("train", help="train a model and report on the test split")
    tr.add_argument("--dataset", choices=DATASETS, default=d.dataset, help=DATASET_HELP)
    tr.add_argument("--data-path", default=None, help="data file (meld, iemocap) or folder (features)")
    tr.add_argument("--visual-path", default=None,
                    help="meld/iemocap only: pickle or torch.save file holding a dict {dialogue id: per-utterance "
                         "visual features ([Dv] vectors -> one frame, or [frames, Dv] arrays)}; replaces the "
                         "pickle's visual stream (MELD default: one zero frame of dim 1)")
    tr.add_argument("--synthetic-scale", type=float, default=d.synthetic_scale,
                    help="size of the synthetic data set relative to MELD's dialogue counts")
    tr.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:N")
    tr.add_argument("--seed", type=int, default=d.seed)
    tr.add_argument("--epochs", type=int, default=d.epochs)
    tr.add_argument("--batch-size", type=int, default=d.batch_size, help="dialogues per batch")
    tr.add_argument("--lr", type=float, default=d.lr)
    tr.add_argument("--weight-decay", type=float, default=d.weight_decay)
    tr.add_argument("--grad-clip", type=float, default=d.grad_clip, help="max gradient norm, 0 = off")
    tr.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=d.lr_schedule,
                    help="learning-rate decay after the warmup, per optimizer step")
    tr.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio,
                    help="fraction of all steps with a linear warmup from 0 to --lr")
    tr.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio,
                    help="final learning rate of cosine/linear decay, as a fraction of --lr")
    tr.add_argument("--patience", type=int, default=d.patience,
                    help="early stopping: stop after N epochs without a better dev weighted F1 (0 = off)")
    tr.add_argument("--precision", choices=PRECISIONS, default=d.precision,
                    help="bf16: torch.autocast to bfloat16 for training and evaluation")
    tr.add_argument("--compile", action="store_true", help="torch.compile the model")
    tr.add_argument("--compile-backend", default=d.compile_backend, help="torch.compile backend (with --compile)")
    tr.add_argument("--shape-buckets", action="store_true",
                    help="pad batches to a few static shapes (utterances, frames and dialogues rounded up): "
                         "--compile then compiles once per shape; results are unchanged (padding is masked)")
    tr.add_argument("--cuda-graphs", action="store_true",
                    help="CUDA only: capture the whole training step (forward, backward, AdamW with "
                         "capturable=True) as one CUDA graph per shape bucket and replay it; implies --shape-buckets")
    tr.add_argument("--modalities", default=d.modalities, help="inputs used: any of t, a, v (others zeroed)")
    tr.add_argument("--num-workers", type=int, default=d.num_workers)
    tr.add_argument("--output-dir", default=d.output_dir)
    tr.add_argument("--resume", default=None, metavar="CHECKPOINT", help="continue from a checkpoint (last.pt)")
    _add_model_options(tr)

    ev = sub.add_parser("evaluate", help="report the metrics of a saved model")
    ev.add_argument("--checkpoint", required=True)
    ev.add_argument("--split", choices=["train", "dev", "test"], default="test")
    ev.add_argument("--device", default="auto")
    ev.add_argument("--output", default=None,
                    help="write the report as JSON here; <stem>_f1_table.md and <stem>_confusion.png go beside it")
    _add_extract_parser(sub)
    return parser


def _add_extract_parser(sub):
    from .data.extract import add_arguments
    ex = sub.add_parser("extract", help="MELD raw media -> feature store (needs the [extract] extra)",
                        description="Extract text/audio/visual features from the MELD raw layout into a feature "
                                    "store folder usable with `train --dataset features --data-path OUTPUT`.")
    add_arguments(ex)


def _train_config(args) -> TrainConfig:
    model = {k[len("model_"):]: v for k, v in vars(args).items() if k.startswith("model_") and v is not None}
    try:
        ModelConfig(**model)  # validate hyper-parameters before loading any data
    except ValueError as exc:
        raise UserError(str(exc)) from None
    return TrainConfig(dataset=args.dataset, data_path=args.data_path, synthetic_scale=args.synthetic_scale,
                       device=args.device, seed=args.seed, epochs=args.epochs, batch_size=args.batch_size,
                       lr=args.lr, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
                       output_dir=args.output_dir, modalities=args.modalities, num_workers=args.num_workers,
                       model=model, visual_path=args.visual_path, precision=args.precision, compile=args.compile,
                       compile_backend=args.compile_backend, lr_schedule=args.lr_schedule,
                       warmup_ratio=args.warmup_ratio, min_lr_ratio=args.min_lr_ratio, patience=args.patience,
                       shape_buckets=args.shape_buckets, cuda_graphs=args.cuda_graphs)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "train":
            report = train(_train_config(args), resume=args.resume)
            if report.get("files"):   # rank 0 only under torchrun
                print(format_report(report))
                print(f"best checkpoint: {report['checkpoint']}  report: {Path(args.output_dir) / 'report.json'}")
        elif args.command == "extract":
            from .data.extract import run_from_args
            run_from_args(args)
        else:
            report = evaluate(args.checkpoint, split=args.split, device=args.device, output=args.output)
            print(format_report(report))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
