"""Command line: `python -m mcncl_fast {train,evaluate,predict,extract} ...`.

Multi-GPU: `torchrun --nproc_per_node=N -m mcncl_fast train ...` (DDP; NCCL on
GPUs, gloo on CPU; --batch-size is per process). User mistakes (bad option values, missing or corrupt checkpoints,
unreadable data files) are reported as one line on stderr with exit status 2.
"""
from __future__ import annotations

import argparse
import re
import sys
from dataclasses import fields

from .data import DATASETS
from .model import ModelConfig
from .evaluation import evaluate, format_report
from .runtime import LR_SCHEDULES, PRECISIONS, TrainConfig
from .data.errors import UserError
from .data.label_sets import LABEL_SETS
from .data.pickles import ROBERTA_MODES
from .experiments import format_summary, run_seeds, train_run
from .imbalance import CLASS_WEIGHTS
from .predict import add_predict_parser, run_from_args as run_predict

DATASET_HELP = ("synthetic: generated MELD-shaped data (no file); meld / iemocap: a feature pickle as --data-path "
                "(DialogueRNN 9-tuple, MMGCN/MM-DFN MELD 10-tuple or COSMIC RoBERTa; README: Accepted data files) - "
                "dev is the file's own valid split or 10%% of train (fixed seed); a stream the file lacks is ONE "
                "ALL-ZERO frame/vector of dim 1 per utterance (MELD's visual can come from --visual-path); "
                "features: a folder of our feature store (train/dev/test.safetensors, from `python -m mcncl_fast "
                "extract`). Pickle files (and .pt feature files) are read with a restricted unpickler (arrays, lists, "
                "dicts, strings, numbers); --trust-pickle lifts it for files you trust")

# ModelConfig fields the data decides (class_weights: from the train labels, --class-weights); everything else is
# a command-line option
DATA_FIELDS = {"text_dim", "audio_dim", "visual_dim", "num_classes", "class_weights"}


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
    tr.add_argument("--resume", default=None, metavar="CHECKPOINT",
                    help="continue the run of a checkpoint (its last.pt): its options, data and output folder; "
                         "options given explicitly may change what a resumed run may change (--epochs, "
                         "--patience, --device, ...) or name the same data at a new place (--data-path)")
    tr.add_argument("--overwrite", action="store_true",
                    help="replace the checkpoints and report of an earlier run in --output-dir")
    tr.add_argument("--label-set", choices=LABEL_SETS, default=None,
                    help="classes other than the file's own: meld-sentiment (MELD pickles with sentiment labels: "
                         "negative, neutral, positive) or iemocap-4 (happy+excited, sad, neutral, angry; frustrated "
                         "ignored)")
    tr.add_argument("--roberta", choices=ROBERTA_MODES, default=d.roberta,
                    help="COSMIC RoBERTa pickles: the text stream is the mean of the four layers (default), their "
                         "concatenation, or one layer (roberta1 = the last)")
    tr.add_argument("--class-weights", choices=CLASS_WEIGHTS, default=d.class_weights,
                    help="balanced: cross-entropy weighted by inverse class frequency of the train split "
                         "(n / (K * n_c), scikit-learn's 'balanced')")
    tr.add_argument("--tensorboard", action="store_true",
                    help="log loss, dev weighted F1 and learning rate per epoch to <output-dir>/tensorboard "
                         "(needs tensorboard: pip install -e \".[track]\")")
    tr.add_argument("--seeds", type=int, nargs="+", default=None, metavar="SEED",
                    help="one training per seed in <output-dir>/seed<k>/, then summary.md / summary.json with the "
                         "mean and std of the test scores (replaces --seed)")
    _add_model_options(tr)

    ev = sub.add_parser("evaluate", help="report the metrics of a saved model")
    ev.add_argument("--checkpoint", required=True)
    ev.add_argument("--split", choices=["train", "dev", "test"], default="test")
    ev.add_argument("--device", default="auto")
    ev.add_argument("--output", default=None,
                    help="write the report as JSON here; <stem>_f1_table.md and <stem>_confusion.png go beside it")
    ev.add_argument("--data-path", default=None,
                    help="score on this file/folder instead of the checkpoint's (another file, or the moved one)")
    ev.add_argument("--dataset", choices=DATASETS, default=None, help="the data set of --data-path (default: the "
                                                                      "checkpoint's)")
    ev.add_argument("--visual-path", default=None, help="meld/iemocap: the visual features file (as for train)")
    add_predict_parser(sub)
    _add_extract_parser(sub)
    for command in ("train", "evaluate", "predict"):
        _subparser(parser, command).add_argument("--trust-pickle", action="store_true", help=TRUST_HELP)
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
    except ValueError as exc:   # name the option the user typed: "ModelConfig.alpha" -> "--alpha"
        raise UserError(re.sub(r"ModelConfig\.(\w+)", lambda m: "--" + m.group(1).replace("_", "-"),
                               str(exc))) from None
    return TrainConfig(dataset=args.dataset, data_path=args.data_path, synthetic_scale=args.synthetic_scale,
                       device=args.device, seed=args.seed, epochs=args.epochs, batch_size=args.batch_size,
                       lr=args.lr, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
                       output_dir=args.output_dir, modalities=args.modalities, num_workers=args.num_workers,
                       model=model, visual_path=args.visual_path, precision=args.precision, compile=args.compile,
                       compile_backend=args.compile_backend, lr_schedule=args.lr_schedule,
                       warmup_ratio=args.warmup_ratio, min_lr_ratio=args.min_lr_ratio, patience=args.patience,
                       shape_buckets=args.shape_buckets, cuda_graphs=args.cuda_graphs, label_set=args.label_set,
                       roberta=args.roberta, class_weights=args.class_weights)


def _explicit_options(argv) -> set:
    """The train options given on the command line, as TrainConfig field names ("model:<key>" for model
    options): the train parser again with every default suppressed, so only given options appear."""
    parser = build_parser()
    train_parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["train"]
    for action in train_parser._actions:
        action.default = argparse.SUPPRESS
    given = vars(parser.parse_args(sys.argv[1:] if argv is None else argv))
    names = {dest for dest in given if dest not in ("command", "resume", "overwrite", "tensorboard", "seeds",
                                                    "trust_pickle")}
    return {f"model:{d[len('model_'):]}" if d.startswith("model_") else d for d in names}


TRUST_HELP = ("load data pickles and .pt feature files without restriction (they can run code): only files you "
              "trust; by default only arrays, lists, dicts, strings and numbers are read")


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .data.safe_pickle import trusted_pickles
    with trusted_pickles(getattr(args, "trust_pickle", False)):
        return _run(args, argv)


def _subparser(parser, name):
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]


def _run(args, argv) -> int:
    try:
        if args.command == "train" and args.seeds is not None:
            if args.resume:
                raise UserError("--seeds: starts one new run per seed; --resume continues one run (resume a seed's "
                                "run with --resume <output-dir>/seed<k>/last.pt, without --seeds)")
            summary = run_seeds(_train_config(args), args.seeds, tensorboard=args.tensorboard,
                                overwrite=args.overwrite)
            if summary is not None:   # rank 0 only under torchrun
                print(format_summary(summary))
        elif args.command == "train":
            report = train_run(_train_config(args), tensorboard=args.tensorboard, resume=args.resume,
                               overwrite=args.overwrite, explicit=_explicit_options(argv))
            if report.get("files"):   # rank 0 only under torchrun
                print(format_report(report))
                print(f"best checkpoint: {report['checkpoint']}  report: {report['files']['report_json']}")
        elif args.command == "extract":
            from .data.extract import run_from_args
            run_from_args(args)
        elif args.command == "predict":
            print(run_predict(args))
        else:
            report = evaluate(args.checkpoint, split=args.split, device=args.device, output=args.output,
                              data_path=args.data_path, dataset=args.dataset, visual_path=args.visual_path)
            print(format_report(report))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
