"""Ahead-of-time compile of the SupCon forward kernel for sm_90 and sm_80 (DESIGN.md §6, issue #4).

Every autotune config the launcher can pick for each dtype (kernels.supcon.configs_for) and the K tile
it uses (block_k) compiles for Hopper and Ampere, fits the shared memory, and (where ptxas is present)
assembles without register spills.
"""
import os
import subprocess

import pytest
import torch

from mcncl_fast.kernels import supcon as kernel
from tests.aot import POINTER, TARGETS, compile_for_targets, config_options
from tests.test_attention_aot import real_jit   # swaps InterpretedFunctions for JITFunctions

SIGNATURE = {"z_ptr": None, "labels_ptr": "*i32", "k_ptr": "*i32", "nneg_ptr": "*i32", "theta_ptr": "*fp32", "logd_ptr": "*fp32",
             "possum_ptr": "*fp32", "passes_ptr": "*i32", "N": "i32", "D": "i32", "stride_m": "i32",
             "stride_n": "i32", "stride_d": "i32", "inv_tau": "fp32", "passes_stride": "i32"}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _gpu_configs(dtype):
    # the configs a GPU launch keeps for this dtype (the pruning rule, outside the interpreter)
    return [c for c in kernel.GPU_CONFIGS if dtype != torch.float32 or c.kwargs["BM"] == 64]


def _cases():
    for dtype in DTYPES:
        for config in _gpu_configs(dtype):
            bks = sorted({16 if dtype == torch.float32 else min(64, max(32, 1 << (d - 1).bit_length()))
                          for d in (16, 32, 128)})
            for bk in bks:
                name = f"{str(dtype).replace('torch.', '')}-BM{config.kwargs['BM']}-BN{config.kwargs['BN']}-BK{bk}"
                yield pytest.param(dtype, config, bk, id=name)


def test_pruning_rule_matches_the_kernel_module():
    if kernel.INTERPRET:
        pytest.skip("the interpreter keeps only its own config")
    for dtype in DTYPES:
        assert kernel.configs_for(dtype) == _gpu_configs(dtype)


def test_block_k_rule():
    # what the launcher passes on a GPU (the interpreter uses the whole feature dimension)
    if not kernel.INTERPRET:
        assert kernel.block_k(128, torch.float32) == 16
        assert kernel.block_k(200, torch.bfloat16) == 64
        assert kernel.block_k(16, torch.float16) == 32


def _ptxas_spills(compiled, capability):
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        ptxas = get_ptxas(capability).path
    except Exception:  # pragma: no cover - no ptxas shipped with this triton
        return None
    if not os.path.exists(ptxas):
        return None
    import tempfile
    arch = f"sm_{capability}a" if capability == 90 else f"sm_{capability}"
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(compiled.asm["ptx"])
    try:
        out = subprocess.run([ptxas, f"-arch={arch}", "-v", f.name, "-o", os.devnull], capture_output=True,
                             text=True, timeout=300)
    finally:
        os.unlink(f.name)
    return out.stderr


@pytest.mark.slow
@pytest.mark.parametrize("dtype,config,bk", list(_cases()))
def test_forward_kernel_compiles_for_sm90_and_sm80(dtype, config, bk):
    constexprs, num_warps, num_stages = config_options(config)
    constexprs["BK"] = bk
    signature = dict(SIGNATURE, z_ptr=POINTER[str(dtype).replace("torch.", "")])
    with real_jit(kernel):
        compiled = compile_for_targets(kernel.supcon_forward_kernel, signature, constexprs, num_warps, num_stages)
    for target in TARGETS:
        c = compiled[target.name]
        print(f"\n{target.name} {dtype} {constexprs} warps={num_warps}: shared={c.metadata.shared} bytes")
        assert c.metadata.shared <= target.max_shared
        log = _ptxas_spills(c, target.capability)
        if log is not None:
            assert "0 bytes spill stores, 0 bytes spill loads" in log, log[-2000:]
