"""Data-parallel training on CPU with gloo: global-batch loss/gradient equality and a torchrun smoke run."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mcncl_fast import ModelConfig
from mcncl_fast.reference import Model   # the loss plumbing is under test, not the kernels (interpreter: slow)
from mcncl_fast.data import collate_dialogues
from mcncl_fast.distributed import all_gather_rows, global_batch_loss
from tests.helpers import rel_error

CFG = dict(text_dim=6, audio_dim=5, visual_dim=4, d_model=16, num_layers=1, num_heads=2, proj_dim=8,
           num_classes=3, dropout=0.0, alpha=0.3, beta=0.2, gamma=0.5)


def _dialogues():
    g = torch.Generator().manual_seed(7)
    out = []
    for i, s in enumerate((5, 2, 3, 4)):     # uneven: rank 0 gets 5 + 3 utterances, rank 1 gets 2 + 4
        out.append({"id": str(i), "text": torch.randn(s, 6, generator=g), "audio": torch.randn(s, 5, generator=g),
                    "visual": [torch.randn(1 + (j + i) % 3, 4, generator=g) for j in range(s)],
                    "labels": torch.randint(0, 3, (s,), generator=g)})
    return out


def _model():
    torch.manual_seed(3)
    return Model(ModelConfig(**CFG))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out_dir, sharded):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        # all_gather_rows with uneven (and empty) shards: values in rank order; backward sums over ranks
        x = (torch.arange(3 * rank, dtype=torch.float32) + 10 * rank).requires_grad_()
        y = all_gather_rows(x)
        (y * torch.arange(1, len(y) + 1)).sum().backward()
        model = _model()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        batch = collate_dialogues(_dialogues()[rank::world])
        out = ddp(batch["text"], batch["audio"], batch["visual"], batch["utterance_mask"], batch["frame_mask"])
        # the reference op: every rank computes the whole gathered batch; the fast op (default):
        # each rank computes its own anchors only (sharded SupCon)
        supcon = None if sharded else model.ops.supcon_hard_negative_loss
        losses = global_batch_loss(out.logits, out.features, batch["labels"], batch["utterance_mask"], model.config,
                                   supcon=supcon)
        losses["loss"].backward()
        torch.save({"gathered": y.detach(), "x_grad": x.grad, "loss": losses["loss"].detach(),
                    "ce": losses["ce_loss"].detach(), "contrastive": losses["contrastive_loss"].detach(),
                    "n": losses["num_utterances"],
                    "grads": {k: p.grad.clone() for k, p in model.named_parameters()}},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_global_batch_loss_single_process_matches_model_loss():
    model = _model()
    batch = collate_dialogues(_dialogues())
    out = model(**batch)
    ours = global_batch_loss(out.logits, out.features, batch["labels"], batch["utterance_mask"], model.config,
                             supcon=model.ops.supcon_hard_negative_loss)
    assert rel_error(ours["loss"], out.loss) < 1e-6
    assert rel_error(ours["contrastive_loss"], out.contrastive_loss) < 1e-6


@pytest.mark.parametrize("sharded", [False, True], ids=["reference-supcon", "sharded-supcon"])
def test_two_process_loss_and_gradients_equal_concatenated_batch(tmp_path, sharded):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path), sharded), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    # reference: one process, the whole batch, the model's own loss (DESIGN.md §3)
    model = _model()
    out = model(**collate_dialogues(_dialogues()))
    out.loss.backward()
    for r in ranks:
        assert torch.equal(r["gathered"], torch.tensor([10.0, 11.0, 12.0]))
        assert r["n"] == 14
        assert rel_error(r["loss"], out.loss) < 1e-5
        assert rel_error(r["ce"], out.ce_loss) < 1e-5
        assert rel_error(r["contrastive"], out.contrastive_loss) < 1e-5
        assert out.contrastive_loss.min() > 0            # SupCon terms really contribute
        names = [n for n, _ in model.named_parameters()]
        ref = torch.cat([p.grad.flatten() for _, p in model.named_parameters()])
        got = torch.cat([r["grads"][n].flatten() for n in names])
        assert rel_error(got, ref) < 1e-5
        # per parameter, relative to the whole gradient's norm (some, e.g. the key biases, are exactly
        # zero in exact arithmetic and pure rounding noise in float32)
        for name, p in model.named_parameters():
            assert (r["grads"][name] - p.grad).norm() < 1e-5 * ref.norm(), name
    # x_grad: rank 1 owns gathered rows 0..2 (weights 1, 2, 3), summed over the two ranks' losses
    assert ranks[0]["x_grad"].numel() == 0
    assert torch.equal(ranks[1]["x_grad"], torch.tensor([2.0, 4.0, 6.0]))
    # the heads' gradient is not what per-rank (local) SupCon would give: the all-gather matters
    local = _model()
    half = collate_dialogues(_dialogues()[0::2])
    o = local(**half)
    o.loss.backward()
    assert rel_error(local.heads["t"].fc2.weight.grad, model.heads["t"].fc2.weight.grad) > 1e-3


@pytest.mark.slow
def test_torchrun_two_process_smoke_train(tmp_path, monkeypatch):
    out_dir = tmp_path / "run"
    # the production CPU path (no Triton interpreter): this test is about DDP, not the kernels
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "0"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "mcncl_fast", "train", "--synthetic-scale", "0.02", "--epochs", "2", "--batch-size", "4",
           "--d-model", "16", "--num-layers", "1", "--num-heads", "2", "--proj-dim", "8", "--device", "cpu",
           "--lr-schedule", "cosine", "--warmup-ratio", "0.2", "--output-dir", str(out_dir)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out_dir / "report.json").read_text())
    assert report["world_size"] == 2 and len(report["history"]) == 2
    assert proc.stdout.count("best checkpoint:") == 1          # rank 0 alone prints and writes
    # metrics over the WHOLE test split (sharded over the ranks, then gathered)
    from mcncl_fast.data import synthetic_splits
    test = synthetic_splits(scale=0.02).test
    assert report["num_utterances"] == sum(len(test[i]["labels"]) for i in range(len(test)))
    from mcncl_fast.train import evaluate
    monkeypatch.setenv("MCNCL_FAST_BACKEND", "reference")   # same math as the CPU path, without the interpreter
    single = evaluate(out_dir / "best.pt", split="test", device="cpu")
    assert single["confusion_matrix"] == report["confusion_matrix"]
    assert single["weighted_f1"] == pytest.approx(report["weighted_f1"], abs=1e-12)
    for name in ("test_f1_table.md", "test_confusion.png", "curves.png", "last.pt"):
        assert (out_dir / name).is_file(), name
