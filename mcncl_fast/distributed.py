"""Data-parallel training helpers: process group set-up and the global-batch loss.

`torchrun --nproc_per_node=N -m mcncl_fast train ...` sets RANK/WORLD_SIZE/LOCAL_RANK;
`setup()` then starts a process group (NCCL on CUDA, gloo on CPU) and each
process trains a DistributedDataParallel replica on its shard of the data.

The loss of the global batch. DESIGN.md §3's loss is a mean CE over all valid
utterances plus SupCon over all valid utterances of the batch. With the batch
spread over W ranks, `global_batch_loss` all-gathers (autograd-aware) the
projections z_m, the labels and the per-rank CE sums, so every rank computes
exactly the loss of the concatenated batch, and its anchors see every rank's
embeddings as positives / negatives. The gather's backward sums the incoming
gradients over the ranks (all-reduce) and keeps the local slice: every rank
holds the same global loss, so rank r's local embeddings receive W times the
true gradient and DDP's gradient averaging (1/W) gives exactly the gradient of
the global-batch loss. Each rank computes the (cheap, O(N) memory) SupCon of
the whole global batch redundantly; that keeps it one call of the model's op.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict

import torch
import torch.distributed as dist

from .reference.model import MODALITIES, mcncl_loss


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False   # True when setup() created the process group (and cleanup() ends it)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_distributed() -> bool:
    """True under torchrun (or any env:// launcher) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or (dist.is_available() and dist.is_initialized()
                                                          and dist.get_world_size() > 1)


def setup(device: torch.device) -> DistContext:
    """Join (or create, from the torchrun environment) the process group; one device per process.

    `device` is the device the user asked for (resolved); CUDA gets `cuda:LOCAL_RANK` and NCCL,
    CPU gets gloo.
    """
    if not launched_distributed():
        return DistContext(device=device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        owns = True
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                       device=device, owns_group=owns)


def cleanup(ctx: DistContext) -> None:
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        if ctx.device.type == "cuda":
            dist.barrier(device_ids=[ctx.device.index])
        else:
            dist.barrier()


class _AllGatherSum(torch.autograd.Function):
    """[m, ...] per rank -> [W, m, ...]; backward: all-reduce(sum) the gradient, keep this rank's slice."""

    @staticmethod
    def forward(ctx, x):
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return torch.stack(out)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[dist.get_rank()]


def _sizes(n: int, device) -> list:
    local = torch.tensor([n], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, local)
    return [int(s) for s in sizes]


def all_gather_rows(x: torch.Tensor, with_grad: bool = True) -> torch.Tensor:
    """Concatenate every rank's x [n_r, ...] along dim 0 in rank order (n_r may differ per rank).

    With `with_grad`, gradients flow back to each rank's own rows (see the module docstring for the
    scaling that makes DDP's averaging exact). Without a process group, returns x.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    sizes = _sizes(x.shape[0], x.device)
    m = max(sizes)
    if m == 0:
        return x
    pad = x.new_zeros((m - x.shape[0],) + tuple(x.shape[1:]))
    padded = torch.cat([x, pad]) if with_grad else torch.cat([x.detach(), pad])
    if with_grad:
        gathered = _AllGatherSum.apply(padded)
    else:
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous())
        gathered = torch.stack(parts)
    return torch.cat([gathered[r, :n] for r, n in enumerate(sizes)])


def global_batch_loss(logits: torch.Tensor, features: Dict[str, torch.Tensor], labels: torch.Tensor,
                      utterance_mask: torch.Tensor, config, supcon=None) -> Dict[str, torch.Tensor]:
    """DESIGN.md §3's loss over the batch of all ranks (the local batch without a process group).

    logits [B, S, K], features["proj_t"/"proj_a"/"proj_v"] [B, S, P] (ModelOutput.features),
    labels [B, S], utterance_mask [B, S]; `config` is the ModelConfig (temperature, hard_ratio,
    alpha, beta, gamma); `supcon` the SupCon op (default: mcncl_fast.ops'). Returns
    {"loss", "ce_loss", "contrastive_loss" [3], "num_utterances"} - identical on every rank.
    """
    if supcon is None:
        from .ops import supcon_hard_negative_loss as supcon
    projections = {m: features[f"proj_{m}"] for m in MODALITIES}
    with torch.autocast(device_type=logits.device.type, enabled=False):   # the loss is computed in fp32
        return mcncl_loss(config, logits, projections, labels, utterance_mask, supcon, gather_rows=all_gather_rows)


def shard_indices(n: int, ctx: DistContext) -> list:
    """Evaluation shard of this rank: every sample exactly once over all ranks (no padding)."""
    return list(range(ctx.rank, n, ctx.world_size))


def gather_objects(obj, ctx: DistContext) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank ([obj] without a process group)."""
    if not ctx.enabled:
        return [obj]
    out = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def unwrap(model):
    """The plain module under DDP and/or torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model

