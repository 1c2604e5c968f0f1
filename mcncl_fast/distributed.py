"""Data-parallel training helpers: process group set-up and the global-batch loss.

`torchrun --nproc_per_node=N -m mcncl_fast train ...` sets RANK/WORLD_SIZE/LOCAL_RANK;
`setup()` then starts a process group (NCCL on CUDA, gloo on CPU) and each
process trains a DistributedDataParallel replica on its shard of the data.

The loss of the global batch. DESIGN.md §3's loss is a mean CE over all valid
utterances plus SupCon over all valid utterances of the batch. With the batch
spread over W ranks, `global_batch_loss` all-gathers (autograd-aware) the
per-rank CE sums and the labels, so every rank computes exactly the loss of the
concatenated batch, and every anchor sees every rank's embeddings as positives /
negatives. Every rank holds the same global loss, so rank r's local rows receive
W times the true gradient and DDP's gradient averaging (1/W) gives exactly the
gradient of the global-batch loss.

SupCon divides the work instead of repeating it (`sharded_supcon_loss`): each
rank gathers the embeddings (no gradient), computes the per-row values (theta,
log D, sum of positive similarities) of its OWN anchors only against all N
columns, and all-gathers those O(M·N) values; the loss is then the global one on
every rank. In the backward, dL/dz'_i = sum_j (G_ij + G_ji) z'_j needs only
row i's and every j's per-row values, so each rank computes the complete
gradient of its own rows, again against all columns: per-rank work falls by W
in both passes, no rank holds more than O(N·D), and no gradient of the gathered
columns has to travel back. The reference op (any other `supcon`) keeps the
plain path: gather the embeddings with gradients, compute the whole global
batch on every rank.
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


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_gather_rows(x: torch.Tensor, with_grad: bool = True, sizes=None) -> torch.Tensor:
    """Concatenate every rank's x [n_r, ...] along dim 0 in rank order (n_r may differ per rank).

    With `with_grad`, gradients flow back to each rank's own rows (see the module docstring for the
    scaling that makes DDP's averaging exact). `sizes`: every rank's n_r when already known. Without
    a process group, returns x.
    """
    if not _active():
        return x
    sizes = _sizes(x.shape[0], x.device) if sizes is None else sizes
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


class _ShardedSupCon(torch.autograd.Function):
    """z' [M, n_r, D] of this rank (normalised) -> the SupCon loss [M] of the global batch; this
    rank computes its own anchors' rows only (module docstring)."""

    @staticmethod
    def forward(ctx, zn, labels, temperature, hard_ratio, ignore_index, num_classes):
        from .ops.supcon import combine, forward_rows
        from .reference.ops import label_statistics
        sizes = _sizes(zn.shape[1], zn.device)
        rank = dist.get_rank()
        row_start, row_count = sum(sizes[:rank]), sizes[rank]
        z_all = all_gather_rows(zn.transpose(0, 1).contiguous(), with_grad=False, sizes=sizes).transpose(0, 1)
        stats = label_statistics(all_gather_rows(labels, with_grad=False, sizes=sizes), hard_ratio,
                                 ignore_index, num_classes)
        own = torch.stack(forward_rows(z_all, stats, temperature, row_start, row_count)).float()   # [3, M, n_r]
        theta, logd, possum = all_gather_rows(own.permute(2, 0, 1).contiguous(), with_grad=False,
                                              sizes=sizes).permute(1, 2, 0)                       # [M, N] each
        npos = stats.positives.float()
        ctx.save_for_backward(z_all, stats.class_ids.to(torch.int32), theta, logd, npos)
        ctx.rows = (row_start, row_count)
        ctx.temperature = temperature
        return combine(logd, possum, npos, temperature)

    @staticmethod
    def backward(ctx, grad_loss):
        from .ops.supcon import backward_rows
        z_all, ids, theta, logd, npos = ctx.saved_tensors
        grad = backward_rows(grad_loss.contiguous(), z_all, ids, theta, logd, npos, ctx.temperature, *ctx.rows)
        # every rank holds the same global loss: W x the true gradient (DDP averages over the ranks)
        return grad * dist.get_world_size(), None, None, None, None, None


def sharded_supcon_loss(z, labels, temperature=0.07, hard_ratio=0.3, normalize=True, ignore_index=-100,
                        num_classes=None):
    """mcncl_fast.ops.supcon_hard_negative_loss of the concatenated batch of all ranks, z [M, n_r, D]
    and labels [n_r] being this rank's rows; each rank computes only its own anchors (module
    docstring). Without a process group it is the op itself."""
    from .ops.supcon import normalized_embeddings, supcon_hard_negative_loss
    if not _active():
        return supcon_hard_negative_loss(z, labels, temperature, hard_ratio, normalize, ignore_index, num_classes)
    from ._checks import check_supcon_args
    check_supcon_args(z, labels, temperature, hard_ratio, ignore_index, num_classes)
    single = z.dim() == 2
    zn = normalized_embeddings(z.unsqueeze(0) if single else z, normalize)
    loss = _ShardedSupCon.apply(zn, labels.long(), float(temperature), float(hard_ratio), int(ignore_index),
                                num_classes)
    return loss[0] if single else loss


sharded_supcon_loss.gathers_rows = True   # mcncl_loss passes it the local rows


def global_batch_loss(logits: torch.Tensor, features: Dict[str, torch.Tensor], labels: torch.Tensor,
                      utterance_mask: torch.Tensor, config, supcon=None) -> Dict[str, torch.Tensor]:
    """DESIGN.md §3's loss over the batch of all ranks (the local batch without a process group).

    logits [B, S, K], features["proj_t"/"proj_a"/"proj_v"] [B, S, P] (ModelOutput.features),
    labels [B, S], utterance_mask [B, S]; `config` is the ModelConfig (temperature, hard_ratio,
    alpha, beta, gamma); `supcon` the SupCon op (default and mcncl_fast.ops': the sharded SupCon of
    the module docstring; any other op runs on the whole gathered batch). Returns {"loss",
    "ce_loss", "contrastive_loss" [3], "num_utterances"} - identical on every rank.
    """
    from .ops import supcon_hard_negative_loss as fast_supcon
    if supcon is None or supcon is fast_supcon:
        supcon = sharded_supcon_loss
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
