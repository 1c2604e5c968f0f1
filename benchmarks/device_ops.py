"""Device operations and host-device syncs a region issues, counted on the CPU.

Every ATen compute op is at least one GPU kernel launch on CUDA, and every Triton kernel launch is
one more: their sum is what a launch-bound step pays for. Run under TRITON_INTERPRET=1 so the
Triton kernels execute (and are counted) on CPU tensors, exactly as CUDA tensors would launch them.

    with DeviceOps() as ops:
        loss = model(**batch).loss
        loss.backward()
    ops.total, ops.aten, ops.triton, ops.syncs, ops.by_component()

Counted: ATen ops that compute (views, metadata and allocations excluded; copies included), inside
this project's custom ops too (a dispatch mode otherwise sees a custom op as one opaque call);
Triton launches; sync points (`SYNC_OPS`, boolean-mask indexing). `component(name)` tags what runs
inside it, for a per-component table.
"""
from __future__ import annotations

import collections
import contextlib

import torch
from torch._library.custom_ops import OPDEFS
from torch.utils._python_dispatch import TorchDispatchMode

# ATen ops that force a host-device sync on CUDA (boolean-mask indexing is detected separately)
SYNC_OPS = {"_local_scalar_dense", "nonzero", "_unique2", "unique_dim", "unique_consecutive", "masked_select",
            "item"}
# no device work of their own: views, metadata, allocations
FREE_OPS = {"view", "_unsafe_view", "reshape", "expand", "permute", "transpose", "t", "unsqueeze", "squeeze",
            "select", "slice", "alias", "detach", "as_strided", "empty", "empty_like", "new_empty",
            "empty_strided", "new_empty_strided", "lift_fresh", "set_", "split", "unbind", "chunk",
            "split_with_sizes", "is_same_size", "view_as", "expand_as", "diagonal", "_reshape_alias",
            "_to_copy_meta", "result_type", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset"}


class DeviceOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.records = []            # (component, kind, name): kind in {"aten", "triton"}
        self.syncs = []
        self._component = "other"
        self._patch = None
        self._launch_depth = 0
        self._entered = 0

    # -- components
    @contextlib.contextmanager
    def component(self, name: str):
        previous, self._component = self._component, name
        try:
            yield
        finally:
            self._component = previous

    # -- counting
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "mcncl_fast":
            with self:   # run the custom op's Python implementation under this mode
                return OPDEFS[func._schema.name]._init_fn(*args, **kwargs)
        name = func.overloadpacket.__name__
        bool_index = name.startswith("index") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool
            for a in args if isinstance(a, (list, tuple)) for i in a)
        if name in SYNC_OPS or bool_index:
            self.syncs.append(name)
        out = func(*args, **kwargs)
        if name not in FREE_OPS and not (args and out is args[0]):   # `to`/`contiguous` may return the input
            self.records.append((self._component, "aten", name))
        return out

    def __enter__(self):
        self._entered += 1
        if self._entered == 1:   # custom ops re-enter the mode (`with self`): patch on the outermost entry only
            from triton.runtime import interpreter
            original = interpreter.InterpretedFunction.run
            recorder = self

            def run(fn_self, *a, **k):
                if recorder._launch_depth == 0:    # wrappers (autotune, heuristics) re-enter run: one launch
                    recorder.records.append((recorder._component, "triton", fn_self.fn.__name__))
                recorder._launch_depth += 1
                try:
                    return original(fn_self, *a, **k)
                finally:
                    recorder._launch_depth -= 1
            interpreter.InterpretedFunction.run = run
            self._patch = (interpreter.InterpretedFunction, original)
        return super().__enter__()

    def __exit__(self, *exc):
        self._entered -= 1
        if self._entered == 0:
            cls, original = self._patch
            cls.run = original
        return super().__exit__(*exc)

    # -- results
    @property
    def aten(self) -> int:
        return sum(1 for _, kind, _ in self.records if kind == "aten")

    @property
    def triton(self) -> int:
        return sum(1 for _, kind, _ in self.records if kind == "triton")

    @property
    def total(self) -> int:
        return len(self.records)

    def most_common(self, n=12):
        return collections.Counter(name for _, _, name in self.records).most_common(n)

    def by_component(self) -> dict:
        """{component: (aten ops, triton launches)} in first-seen order."""
        table = {}
        for comp, kind, _ in self.records:
            aten, tri = table.get(comp, (0, 0))
            table[comp] = (aten + (kind == "aten"), tri + (kind == "triton"))
        return table

