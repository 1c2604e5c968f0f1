"""Ahead-of-time compile of Triton kernels for real GPUs, without a GPU (DESIGN.md §6).

The interpreter accepts code the GPU compiler rejects (tl.dot operand shapes,
layouts, bf16 arithmetic), so every kernel is also compiled for sm_90 (Hopper)
and sm_80 (Ampere) with each autotune config and dtype it is launched with, and
its shared-memory use is checked against the device limit.

Use:
    from tests.aot import compile_for_targets, TARGETS
    compile_for_targets(kernel_fn, signature={"x_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"},
                        constexprs={"BLOCK": 128}, num_warps=4, num_stages=2)
`kernel_fn` may be the @triton.jit function or an @triton.autotune wrapper
(its `.fn` is unwrapped); the caller loops over configs.
"""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402


@dataclass(frozen=True)
class Target:
    name: str
    capability: int
    max_shared: int   # bytes of shared memory one block may use (opt-in maximum)


TARGETS = (Target("sm_90 (H100)", 90, 232448), Target("sm_80 (A100)", 80, 166912))

# torch dtype name -> Triton pointer type
POINTER = {"float32": "*fp32", "float16": "*fp16", "bfloat16": "*bf16", "int64": "*i64",
           "int32": "*i32", "int8": "*i8", "bool": "*i1", "uint8": "*u8", "float64": "*fp64"}


def unwrap(kernel):
    """@triton.autotune / @triton.heuristics wrappers -> a JITFunction.

    Under TRITON_INTERPRET=1, @triton.jit yields an InterpretedFunction wrapping
    the plain Python function: rebuild a real JITFunction from it to compile.
    """
    from triton.runtime.interpreter import InterpretedFunction
    while True:
        if isinstance(kernel, triton.runtime.JITFunction):
            return kernel
        if isinstance(kernel, InterpretedFunction):
            return triton.runtime.JITFunction(kernel.fn)
        kernel = kernel.fn


def _language_objects():
    import triton.language as tl
    names = ("tensor", "dtype", "condition", "tensor_descriptor_base")
    objs = [tl, tl.core, tl.math] + [getattr(tl.core, n) for n in names if hasattr(tl.core, n)]
    return [o for i, o in enumerate(objs) if all(o is not p for p in objs[:i])]


# triton.language as it is before anything is interpreted (tests/conftest.py imports this module
# first). The interpreter patches tl's builtins while it runs a kernel, and a call of a @triton.jit
# helper leaves them patched for good (triton 3.9, InterpretedFunction.__call__): a later GPU
# compile in the same process then fails. real_jit() puts the pristine attributes back meanwhile.
_PRISTINE = [(obj, dict(vars(obj))) for obj in _language_objects()]


@contextlib.contextmanager
def _pristine_language():
    changed = []
    for obj, original in _PRISTINE:
        current = vars(obj)
        for name, value in original.items():
            if current.get(name, value) is not value:
                changed.append((obj, name, current[name]))
                setattr(obj, name, value)
    try:
        yield
    finally:
        for obj, name, value in reversed(changed):
            setattr(obj, name, value)


@contextlib.contextmanager
def real_jit():
    """Under TRITON_INTERPRET=1 every @triton.jit function — triton.language's own (tl.max, tl.sum,
    tl.cdiv, ...) and the helpers our kernels call — is an InterpretedFunction, which the GPU
    compiler rejects: swap real JITFunctions in (and triton.language's pristine builtins back) for
    the duration of a compile. No-op otherwise."""
    from triton.runtime.interpreter import InterpretedFunction
    with _pristine_language():   # first the builtins, then the jit functions on top
        swapped = []
        owners = [m for name, m in list(sys.modules.items()) if m is not None
                  and (name.startswith("triton.language") or name.startswith("mcncl_fast.kernels"))]
        for module in owners:
            for name, value in list(vars(module).items()):
                if isinstance(value, InterpretedFunction):
                    swapped.append((module, name, value))
                    setattr(module, name, triton.runtime.JITFunction(value.fn))
        try:
            yield
        finally:
            for module, name, value in reversed(swapped):
                setattr(module, name, value)


def compile_for_targets(kernel, signature: dict, constexprs: dict, num_warps: int = 4,
                        num_stages: int = 2, targets=TARGETS):
    """Compile for every target; assert the shared memory fits. Returns {target.name: compiled}."""
    with real_jit():
        return _compile_for_targets(kernel, signature, constexprs, num_warps, num_stages, targets)


def _compile_for_targets(kernel, signature, constexprs, num_warps, num_stages, targets):
    fn = unwrap(kernel)
    sig = dict(signature)
    for name in constexprs:
        sig[name] = "constexpr"
    missing = [a for a in fn.arg_names if a not in sig]
    if missing:
        raise ValueError(f"signature misses kernel arguments {missing}")
    results = {}
    for target in targets:
        src = ASTSource(fn, signature=sig, constexprs=dict(constexprs))
        compiled = triton.compile(src, target=GPUTarget("cuda", target.capability, 32),
                                  options={"num_warps": num_warps, "num_stages": num_stages})
        shared = compiled.metadata.shared
        assert shared <= target.max_shared, (
            f"{fn.__name__} on {target.name}: {shared} bytes of shared memory > {target.max_shared} "
            f"(constexprs={constexprs}, num_warps={num_warps}, num_stages={num_stages})")
        results[target.name] = compiled
    return results


def config_options(config) -> dict:
    """A triton.Config -> (constexprs, num_warps, num_stages)."""
    return dict(config.kwargs), config.num_warps, config.num_stages
