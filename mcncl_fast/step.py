"""The training step as one callable: forward and loss, backward, gradient clipping, AdamW.

`TrainStep` runs it eagerly. `CudaGraphStep` captures it as one CUDA graph per batch shape and
replays it: a step at MELD scale is a few GFLOP spread over hundreds of small kernels, so on a GPU
its time is launch and Python overhead, which a replay removes. What makes the step capturable:

* no host-device synchronisation anywhere in it (the model and the ops never read a device value on
  the host; AdamW with `capturable=True` keeps its step count and learning rate on the device;
  gradient clipping scales by a device-side factor);
* static shapes: batches are padded to a few shape buckets (mcncl_fast.data.buckets), one graph each;
* everything allocated lazily (gradients, optimizer state, Triton autotuning, cuBLAS workspaces)
  happens first in an ordinary step: the first batch of each shape runs eagerly on a side stream,
  then the step is captured, and later batches of that shape replay it. No batch is run twice.

A step returns [loss, gradient norm] as a device tensor; a replayed graph overwrites it at its next
replay, so use it (e.g. add it to a running sum) before the next step.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch

from .data.errors import UserError

Batch = Dict[str, torch.Tensor]


# param-group flags that say how this optimizer runs, not what it learnt: kept when a state is loaded
RUN_MODE = ("capturable", "fused", "foreach")


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, capturable: bool = False):
    """AdamW, fused: one multi-tensor kernel updates every parameter (the per-parameter loop would be
    hundreds of launches per step). capturable: the step count and learning rate live on the device (a
    tensor the LR scheduler fills in place), so the update never syncs and can be captured in a CUDA graph."""
    device = next(model.parameters()).device
    lr_value = torch.tensor(lr, dtype=torch.float32, device=device) if capturable else lr
    return torch.optim.AdamW(model.parameters(), lr=lr_value, weight_decay=weight_decay, capturable=capturable,
                             fused=True)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load an AdamW state saved in any run mode (capturable or not, fused or not) into this optimizer's."""
    groups = optimizer.param_groups
    _check_same_parameters(groups, state)
    modes = [{key: g[key] for key in RUN_MODE if key in g} for g in groups]
    lr_is_tensor = [isinstance(g["lr"], torch.Tensor) for g in groups]
    state = {**state, "param_groups": [{**saved, "lr": float(saved["lr"]), **mode}
                                       for saved, mode in zip(state["param_groups"], modes)]}
    optimizer.load_state_dict(state)
    for group, tensor in zip(optimizer.param_groups, lr_is_tensor):
        if tensor:
            device = group["params"][0].device
            group["lr"] = torch.tensor(group["lr"], dtype=torch.float32, device=device)


def _check_same_parameters(groups, state: dict) -> None:
    """A state saved for other parameters (another model, or mcncl_fast.Model before it stored the three
    streams' MCN and head weights stacked) is refused with a UserError instead of torch's size errors."""
    saved_groups = state.get("param_groups", [])
    shapes = [tuple(p.shape) for g in groups for p in g["params"]]
    saved_ids = [i for g in saved_groups for i in g["params"]]
    saved_shapes = [tuple(state["state"][i]["exp_avg"].shape) if "exp_avg" in state.get("state", {}).get(i, {})
                    else None for i in saved_ids]
    sizes = [len(g["params"]) for g in saved_groups], [len(g["params"]) for g in groups]
    same = (sizes[0] == sizes[1] and all(saved is None or saved == now for saved, now in zip(saved_shapes, shapes)))
    if not same:
        raise UserError(f"optimizer state: saved for {len(saved_ids)} parameters, this model has {len(shapes)} "
                        f"of other shapes (a checkpoint of the reference model, or of mcncl_fast.Model before it "
                        f"stored the MCN and head weights stacked?); its model weights load with load_state_dict, "
                        f"its optimizer state cannot be resumed")


class TrainStep:
    """forward_loss(batch) -> 0-d loss; then backward, clipping (max norm `grad_clip`, 0 = off) and
    the optimizer step. Returns a device tensor [loss, gradient norm] (the norm before clipping): both
    finite unless the step diverged, which the caller can check whenever it reads them."""

    def __init__(self, forward_loss: Callable[[Batch], torch.Tensor], model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer, grad_clip: float = 0.0):
        self.forward_loss, self.optimizer, self.grad_clip = forward_loss, optimizer, grad_clip
        self.params = [p for p in model.parameters() if p.requires_grad]

    def __call__(self, batch: Batch) -> torch.Tensor:
        # set_to_none: backward writes fresh gradients instead of adding to zeroed ones; under CUDA
        # graph capture they are then allocated in the graph's own memory pool
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.forward_loss(batch)
        loss.backward()
        if self.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip, foreach=True)
        else:
            grads = [p.grad for p in self.params if p.grad is not None]
            grad_norm = torch.nn.utils.get_total_norm(grads, foreach=True)
        self.optimizer.step()
        return torch.stack([loss.detach().float(), grad_norm.float()])


Capture = Callable[[Callable[[], torch.Tensor]], Tuple[Callable[[], None], torch.Tensor]]


def capture_cuda_graph(fn: Callable[[], torch.Tensor]) -> Tuple[Callable[[], None], torch.Tensor]:
    """Record fn's kernels as a CUDA graph (nothing runs): -> (replay, fn's output, rewritten per replay)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph.replay, out


def _on_side_stream(fn, *args):
    """Warm-up work runs on a side stream, as CUDA graph capture requires of the work before it."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return fn(*args)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = fn(*args)
    torch.cuda.current_stream().wait_stream(side)
    return out


class CudaGraphStep:
    """A step callable (TrainStep) replayed as one CUDA graph per batch shape (see the module docstring).

    `capture` records a zero-argument function and returns (replay, output): `capture_cuda_graph` by
    default; tests substitute a recorder that re-runs the function to check the bookkeeping on CPU."""

    def __init__(self, step: Callable[[Batch], torch.Tensor], capture: Optional[Capture] = None):
        self.step = step
        self.capture = capture or capture_cuda_graph
        self.graphs: Dict[tuple, Tuple[Callable[[], None], Batch, torch.Tensor]] = {}

    @staticmethod
    def shape_key(batch: Batch) -> tuple:
        return tuple((name, tuple(t.shape), t.dtype, t.device) for name, t in sorted(batch.items()))

    def __call__(self, batch: Batch) -> torch.Tensor:
        key = self.shape_key(batch)
        entry = self.graphs.get(key)
        if entry is None:
            loss = _on_side_stream(self.step, batch)         # this batch's real step; also the warm-up
            static_batch = {name: t.clone() for name, t in batch.items()}
            replay, static_loss = self.capture(lambda: self.step(static_batch))
            self.graphs[key] = (replay, static_batch, static_loss)
            return loss
        replay, static_batch, static_loss = entry
        for name, t in batch.items():
            static_batch[name].copy_(t, non_blocking=True)
        replay()
        return static_loss


class NonFiniteError(UserError):
    """The loss or the gradient norm of a step was NaN or infinite."""


class StepLog:
    """The [loss, gradient norm] of each step, kept on the device and read in windows of `window` steps:
    one host read per window instead of one per step. `read()` returns the window's mean loss and
    raises NonFiniteError naming the first step whose loss or gradient norm is not finite."""

    def __init__(self, device, epoch: int, window: int = 50):
        self.values = torch.zeros(window, 2, device=device)
        self.epoch, self.steps, self.filled, self.loss_sum = epoch, 0, 0, 0.0

    def add(self, step_output: torch.Tensor) -> None:
        self.values[self.filled].copy_(step_output)
        self.steps, self.filled = self.steps + 1, self.filled + 1

    @property
    def full(self) -> bool:
        return self.filled == self.values.shape[0]

    def read(self) -> float:
        """Mean loss of the steps added since the last read (nan if none)."""
        values = self.values[:self.filled].cpu()
        first = self.steps - self.filled
        bad = (~torch.isfinite(values)).any(dim=1).nonzero()
        if len(bad):
            i = int(bad[0, 0])
            loss, norm = values[i].tolist()
            raise NonFiniteError(f"training diverged at epoch {self.epoch + 1}, step {first + i + 1}: loss {loss}, "
                                 f"gradient norm {norm}; no checkpoint was written for this epoch (lower --lr, "
                                 f"check the data, or use --grad-clip)")
        self.loss_sum += float(values[:, 0].sum())
        self.filled = 0
        return float(values[:, 0].mean()) if len(values) else float("nan")

    def epoch_mean(self) -> float:
        """Reads what is left and returns the mean loss over the epoch."""
        self.read()
        return self.loss_sum / self.steps if self.steps else float("nan")
