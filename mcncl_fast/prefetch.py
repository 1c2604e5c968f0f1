"""Batches to the device one step ahead: the next batch's host-to-device copy overlaps the current step.

    for batch in DevicePrefetcher(loader, device):   # loader built with pin_memory=True on CUDA
        step(batch)

On CUDA each batch is copied on a side stream (from pinned host memory the copy is asynchronous; from
pageable memory it is not, so the loader should pin). The stream semantics that keep eager steps and
CUDA-graph replays correct:

* the consumer (the stream current when a batch is handed out) waits on an event recorded after the copy,
  so no kernel and no copy into a graph's static input buffers reads the batch before it has landed;
* every device tensor of the batch is `record_stream`-ed on the consumer, so the caching allocator does not
  hand its memory to a later copy while the step that reads it is still queued;
* the host batch is kept referenced until its copy has finished, and the next host batch is not requested
  before then: a producer that refills one pinned buffer in place cannot overwrite data still being copied.

On a CPU device (or any non-CUDA device) it is a pass-through: each batch is moved when it is handed out,
no streams. Batches may be tensors or nested dicts, lists and tuples of them; other values pass unchanged.
An exception raised by the loader reaches the caller at the batch where it happened, after every batch
before it has been handed out.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Optional

import torch


def to_device(batch: Any, device: torch.device) -> Any:
    """batch with every tensor moved to `device` (non-blocking), its dicts, lists and tuples rebuilt."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return type(batch)((key, to_device(value, device)) for key, value in batch.items())
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):          # a namedtuple
        return type(batch)(*(to_device(value, device) for value in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(value, device) for value in batch)
    return batch


def _tensors(batch: Any) -> Iterator[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        yield batch
    elif isinstance(batch, dict):
        for value in batch.values():
            yield from _tensors(value)
    elif isinstance(batch, (list, tuple)):
        for value in batch:
            yield from _tensors(value)


class DevicePrefetcher:
    """Iterates `batches`, handing out `move(batch)`; on CUDA the move of batch k+1 is queued on a side
    stream before batch k is handed out (see the module docstring).

    move: host batch -> device batch, run on the side stream (default: `to_device`); it may also do
    device work on the copied batch (e.g. zero an input), which the consumer then waits for too."""

    def __init__(self, batches: Iterable, device, move: Optional[Callable[[Any], Any]] = None):
        self.batches = batches
        self.device = torch.device(device)
        self.move = move or (lambda batch: to_device(batch, self.device))

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator:
        if self.device.type != "cuda":
            for batch in self.batches:
                yield self.move(batch)
            return
        yield from self._prefetched(iter(self.batches))

    def _prefetched(self, source: Iterator) -> Iterator:
        copy_stream = torch.cuda.Stream(self.device)
        pending = self._start_copy(source, copy_stream)
        while pending is not None:
            host_batch, device_batch, copied = pending
            consumer = torch.cuda.current_stream(self.device)
            consumer.wait_event(copied)
            for tensor in _tensors(device_batch):
                if tensor.is_cuda:
                    tensor.record_stream(consumer)
            # the producer may reuse this batch's host memory once asked for the next: the copy must be done
            copied.synchronize()
            del host_batch
            try:
                pending, failure = self._start_copy(source, copy_stream), None
            except Exception as error:          # hand out this batch first, then raise where the loader did
                pending, failure = None, error
            yield device_batch
            if failure is not None:
                raise failure

    def _start_copy(self, source: Iterator, copy_stream):
        """(host batch, device batch, event after its copy), or None at the end of `source`."""
        try:
            host_batch = next(source)
        except StopIteration:
            return None
        with torch.cuda.stream(copy_stream):
            device_batch = self.move(host_batch)
            copied = torch.cuda.Event()
            copied.record(copy_stream)
        return host_batch, device_batch, copied
