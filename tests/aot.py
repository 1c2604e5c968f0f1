"""Ahead-of-time compile of Triton kernels for real GPUs, without a GPU (DESIGN.md §6).

The interpreter accepts code the GPU compiler rejects (tl.dot operand shapes,
layouts, bf16 arithmetic), so every kernel is also compiled for sm_90 (Hopper)
and sm_80 (Ampere) with each autotune config and dtype it is launched with, and
its shared-memory use is checked against the device limit.

Use:
    from tests.aot import compile_for_targets, launch_hints, TARGETS
    sig = {"x_ptr": "*fp32", "n": "i32"}
    divisible, ones = launch_hints(kernel_fn, sig, {"n": 4096})
    compile_for_targets(kernel_fn, signature=sig, constexprs={"BLOCK": 128, **ones}, num_warps=4,
                        num_stages=2, divisible=divisible)
`kernel_fn` may be the @triton.jit function or an @triton.autotune wrapper
(its `.fn` is unwrapped); the caller loops over configs.

Specialisation: a real launch marks every pointer argument (allocations are 256-byte aligned) and
every integer argument whose value is a multiple of 16 as divisible by 16 (tt.divisibility), and
turns an integer equal to 1 into the constexpr 1. Vector widths (LDG.E.128 vs LDG.E), register use
and spills depend on it: pass `divisible=` (and the constexprs) of the launch being checked;
`launch_hints` derives them from the argument values with Triton's own rule.
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


def launch_hints(kernel, signature: dict, values: dict = None):
    """(divisible, ones) of a launch: the argument names it specialises as divisible by 16 (every
    pointer; each integer in `values` that is a multiple of 16) and {name: 1} for the integers equal to
    1, which it passes as constexprs. The integer rule is the launcher's (native_specialize_impl),
    including the kernel's do_not_specialize lists."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend
    params = {p.name: p for p in unwrap(kernel).params}
    divisible, ones = [], {}
    for name, ty in signature.items():
        p = params[name]
        if ty.startswith("*"):
            if not p.do_not_specialize_on_alignment:
                divisible.append(name)
        elif values and name in values and isinstance(values[name], int) and not isinstance(values[name], bool):
            kind, spec = native_specialize_impl(BaseBackend, values[name], False, not p.do_not_specialize,
                                                not p.do_not_specialize_on_alignment)[:2]
            if kind == "constexpr":
                ones[name] = spec
            elif spec == "D":
                divisible.append(name)
    return divisible, ones


def compile_for_targets(kernel, signature: dict, constexprs: dict, num_warps: int = 4,
                        num_stages: int = 2, targets=TARGETS, divisible=()):
    """Compile for every target; assert the shared memory fits. Returns {target.name: compiled}.
    divisible: argument names a launch specialises as divisible by 16 (see launch_hints)."""
    with real_jit():
        return _compile_for_targets(kernel, signature, constexprs, num_warps, num_stages, targets, divisible)


def _compile_for_targets(kernel, signature, constexprs, num_warps, num_stages, targets, divisible=()):
    fn = unwrap(kernel)
    sig = dict(signature)
    for name in constexprs:
        sig[name] = "constexpr"
    missing = [a for a in fn.arg_names if a not in sig]
    if missing:
        raise ValueError(f"signature misses kernel arguments {missing}")
    bad = [a for a in divisible if a not in sig or sig[a] == "constexpr"]
    if bad:
        raise ValueError(f"divisible names no runtime argument: {bad}")
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in divisible}
    results = {}
    for target in targets:
        src = ASTSource(fn, signature=sig, constexprs=dict(constexprs), attrs=attrs)
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
