"""Plumbing shared by every Triton kernel file (DESIGN.md §5, §6).

* `interpreting()`: the one reader of TRITON_INTERPRET, evaluated at call time (tests flip it per test).
* The interpreter's bfloat16 dot work-around (applied on import; only the interpreter uses it).
* `launch_configs` / `prune_by`: the one rule for the configs a launch may take. The autotuner's
  benchmark needs a GPU driver, so under the interpreter a launch takes the FIRST config of its
  kernel's list (every list puts the interpreter's config first: large tiles, as the interpreter pays
  per program x loop iteration); on a GPU a kernel-specific rule (or all configs, benchmarked).
  Every autotuned kernel uses `@triton.autotune(..., prune_configs_by=prune_by(...))`.
* `empty` / `empty_like`: the allocation of every buffer a kernel writes. Tests set POISON: floating
  buffers then start as NaN and integer ones as -1, so an element no kernel wrote shows up.
* Shared constants: LOG2E; DTYPES, the dtypes the Triton kernels take.
"""
from __future__ import annotations

import os

import torch
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)      # log2(e); Python code uses LOG2E.value
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreting() -> bool:
    """True when Triton kernels run through the CPU interpreter (TRITON_INTERPRET=1), read at call time."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ------------------------------------------------------------------ interpreter work-around
def _fix_interpreter_bf16_dot():
    """triton 3.9's interpreter multiplies bfloat16 `tl.dot` operands as raw uint16 bit patterns
    (results ~1e10 off). On a GPU, bf16 dots multiply bf16 values and accumulate in fp32; converting
    the operands to fp32 first gives exactly those products, so the interpreter then agrees with the
    GPU. Only the interpreter's builder is patched: compiled kernels are unaffected."""
    from triton.runtime import interpreter as _interp

    create_dot = _interp.InterpreterBuilder.create_dot
    if getattr(create_dot, "_mcncl_bf16_fixed", False):
        return

    def create_dot_bf16(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype.scalar == tl.bfloat16:
            a, b = self.cast_impl(a, tl.float32), self.cast_impl(b, tl.float32)
        return create_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    create_dot_bf16._mcncl_bf16_fixed = True
    _interp.InterpreterBuilder.create_dot = create_dot_bf16


_fix_interpreter_bf16_dot()


# ------------------------------------------------------------------ configs
def launch_configs(configs, gpu_choice=None) -> list:
    """The configs a launch may take: under the interpreter the first of `configs`; on a GPU
    gpu_choice(configs) (default: all of them, for the autotuner to benchmark)."""
    if interpreting():
        return list(configs[:1])
    return list(configs) if gpu_choice is None else list(gpu_choice(configs))


def prune_by(gpu_prune=None) -> dict:
    """`prune_configs_by` of every @triton.autotune: launch_configs, with
    gpu_prune(configs, named_args, **kwargs) choosing on a GPU."""
    def early_config_prune(configs, named_args, **kwargs):
        if gpu_prune is None:
            return launch_configs(configs)
        return launch_configs(configs, lambda cs: gpu_prune(cs, named_args, **kwargs))
    return {"early_config_prune": early_config_prune}


# ------------------------------------------------------------------ allocation
POISON = False    # tests set it: buffers the kernels write start as NaN (floats) / -1 (integers)


def _poisoned(t: torch.Tensor) -> torch.Tensor:
    return t.fill_(float("nan") if t.is_floating_point() else -1)


def empty(shape, like: torch.Tensor, dtype=None) -> torch.Tensor:
    """A buffer a kernel writes, on like's device, in `dtype` (default like's)."""
    t = torch.empty(tuple(shape), device=like.device, dtype=like.dtype if dtype is None else dtype)
    return _poisoned(t) if POISON else t


def empty_like(t: torch.Tensor) -> torch.Tensor:
    """A buffer a kernel writes, with t's shape, dtype, device and (dense) strides."""
    out = torch.empty_like(t)
    return _poisoned(out) if POISON else out
