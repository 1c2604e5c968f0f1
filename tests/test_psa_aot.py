"""Ahead-of-time compile of the PSA kernels for sm_90 and sm_80 (DESIGN.md §6).

Every kernel x autotune config x dtype (float32 / float16 / bfloat16) it launches with, at the
main shape (C = 256: BLOCK_Q = 64; L = 32) with a frame mask; for float32 the first config also
without a mask at L = 1 / C = 64 (BLOCK_Q = 16) and with a row as long as the tile (L = BLOCK_M).
BLOCK_L comes from each kernel's own heuristic (the psa_pool window kernels keep >= 16 rows per tile).
The SE and parameter-gradient kernels with POOL on and off. The shared memory must fit each target.
The shared-memory bytes per kernel/config are recorded as a test property (max over targets).
Compiled with the specialisation of a launch at N = 2048 rows (launch_values): at the main shape every
integer argument is a multiple of 16; at L = 1 the frame count is the constexpr 1.
"""
from __future__ import annotations


import pytest
import torch
import triton.language as tl

import mcncl_fast.kernels._common as common
import mcncl_fast.kernels._psa_common as psa_common
import mcncl_fast.kernels.psa as fwd
import mcncl_fast.kernels.psa_backward as bwd
import mcncl_fast.kernels.psa_pool as pool_kernels
import mcncl_fast.kernels.psa_se as se
from tests.aot import POINTER, TARGETS, compile_for_targets, launch_hints, unwrap


DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DOT = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}  # compiled
FP32_ARGS = {"z_ptr", "h_ptr", "g_ptr", "a_ptr", "dpre2_ptr", "dpre1_ptr", "dw_ptr", "db_ptr", "s_ptr",
             "dw_part_ptr", "db_part_ptr"}
CONSTEXPR = {"HAS_MASK", "DOT_DTYPE", "BLOCK_Q", "BLOCK_M", "BLOCK_L", "BLOCK_C", "BLOCK_R", "BLOCK_H", "POOL"}


def signature(kernel, dtype, pool=False):
    data = POINTER[str(dtype).replace("torch.", "")]
    sig = {}
    for name in unwrap(kernel).arg_names:
        if name in CONSTEXPR:
            continue
        if name in FP32_ARGS:
            sig[name] = "*fp32"
        elif name == "mask_ptr":
            sig[name] = "*u8"
        elif name == "dg_ptr":          # dg (fp32) for psa, d pool (input dtype) for psa_pool
            sig[name] = data if pool else "*fp32"
        elif name == "pool_ptr":
            sig[name] = data if pool else "*fp32"
        elif name.endswith("_ptr"):
            sig[name] = data
        else:
            sig[name] = "i32"
    return sig


# frame-tiled kernels (their autotune configs, BLOCK_Q / BLOCK_L); the window kernels of psa_pool dot fp32 row sums
CONV = {
    "conv_fwd": fwd._psa_conv_fwd_kernel,
    "conv_dx": bwd._psa_conv_dx_kernel,
    "conv_dw": bwd._psa_conv_dw_kernel,
    "pool_window_squeeze": pool_kernels._psa_window_squeeze_kernel,
    "pool_window_dx": pool_kernels._psa_window_dx_kernel,
}
SMALL = {
    "se_fwd": (se._psa_se_fwd_kernel, psa_common.SE_CONFIGS, True),
    "se_bwd": (se._psa_se_bwd_kernel, psa_common.SE_CONFIGS, True),
    "gate_apply": (fwd._psa_gate_apply_kernel, psa_common.ELEMENTWISE_CONFIGS, False),
    "gate_grad": (bwd._psa_gate_grad_kernel, psa_common.ELEMENTWISE_CONFIGS, False),
    "param_grad": (se._psa_param_grad_kernel, psa_common.SE_CONFIGS, True),
}


def launch_values(q=64, length=32, n=2048, partials=32):
    """Integer arguments of a launch on x [n, length, 4 q] (conv_dw: `partials` row chunks; the SE
    backward reads a contiguous d pool [n, 4 q])."""
    return dict(N=n, L=length, C=4 * q, Q=q, ROWS_PER_PROG=-(-n // partials), TOTAL_W=24 * q * q, PARTS=partials,
                stride_dn=4 * q, stride_dc=1)


def block_l_of(kernel, length, block_m):
    """BLOCK_L of a launch at row length `length`, from the kernel's own heuristic."""
    heuristics = kernel.fn            # @triton.autotune(@triton.heuristics(@triton.jit))
    return heuristics.values["BLOCK_L"](dict(L=length, BLOCK_M=block_m))


def _compile(kernel, sig, constexprs, config, values=None):
    divisible, ones = launch_hints(kernel, sig, values or launch_values())
    out = compile_for_targets(kernel, sig, dict(constexprs, **ones), num_warps=config.num_warps,
                              num_stages=config.num_stages, divisible=divisible)
    for target in TARGETS:
        assert "cubin" in out[target.name].asm
    return max(c.metadata.shared for c in out.values())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", list(CONV))
def test_conv_kernels_compile(kind, dtype, record_property):
    kernel = CONV[kind]
    shared = {}
    for index, config in enumerate(kernel.configs):
        block_m = config.kwargs["BLOCK_M"]
        # every config at the main shape (C = 256, L = 32) with a mask; with float32 the first config
        # also at L = 1 with C = 64 (BLOCK_Q = 16) and no mask, and a row as long as the tile
        shapes = [(64, 32, True)]
        if index == 0 and dtype == torch.float32:
            shapes += [(16, 1, False), (64, block_m, True)]
        for block_q, length, has_mask in shapes:
            block_l = block_l_of(kernel, length, block_m)
            if True:
                constexprs = dict(config.kwargs, BLOCK_Q=block_q, BLOCK_L=block_l, HAS_MASK=has_mask)
                if "DOT_DTYPE" in unwrap(kernel).arg_names:
                    constexprs["DOT_DTYPE"] = DOT[dtype]
                key = f"BLOCK_M={block_m},w{config.num_warps},s{config.num_stages},Q{block_q},L{block_l}"
                shared[key] = max(shared.get(key, 0), _compile(kernel, signature(kernel, dtype), constexprs,
                                                               config, launch_values(block_q, length)))
    record_property("shared_bytes", shared)
    print(kind, dtype, shared)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", list(SMALL))
def test_small_kernels_compile(kind, dtype, record_property):
    kernel, configs, has_pool = SMALL[kind]
    shared = {}
    for config in configs:
        for pool in ((False, True) if has_pool else (False,)):
            constexprs = dict(config.kwargs)
            arg_names = unwrap(kernel).arg_names
            if has_pool:
                constexprs.update(POOL=pool, BLOCK_H=64)
            constexprs.update({name: value for name, value in dict(HAS_MASK=True, BLOCK_Q=64).items()
                               if name in arg_names})
            if kind == "gate_grad":
                constexprs.update(BLOCK_L=32)
            key = ",".join(f"{k}={v}" for k, v in config.kwargs.items()) + f",w{config.num_warps},pool={pool}"
            shared[key] = _compile(kernel, signature(kernel, dtype, pool), constexprs, config)
    record_property("shared_bytes", shared)
    print(kind, dtype, shared)


def test_interpreter_prunes_to_first_config(monkeypatch):
    """The rule of kernels/_common.py, read at call time: the first config in the interpreter, all on a GPU."""
    prune = fwd._psa_conv_fwd_kernel.early_config_prune
    configs = psa_common.CONV_CONFIGS
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert prune(configs, {}) == configs[:1] == common.launch_configs(configs)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert prune(configs, {}) == configs == common.launch_configs(configs)
