"""Ahead-of-time compile of the attention kernels for sm_90 and sm_80 (DESIGN.md §6).

Every kernel x autotune config it can launch with (after the shared-memory prune) x dtype x
head dim, with and without a key padding mask; the shared memory must fit each target. Compiled with
the specialisation of a launch at the model's layout (3 streams x 16 dialogues x 24 utterances,
8 heads, [G, B, S, H, Dh] memory seen as [G, B, H, S, Dh]): every stride is a multiple of Dh >= 16.
Largest shared memory (bytes, sm_90 / sm_80) at Dh = 128: fwd fp32 114944, dq fp32 147456,
dkdv fp32 147968 (A100 limit 166912); 16-bit dkdv 82176 / 90368.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import mcncl_fast.kernels.attention as kernels
from tests.aot import POINTER, TARGETS, compile_for_targets, launch_hints, unwrap


KERNELS = {"fwd": (kernels._attn_fwd_kernel, kernels.FWD_CONFIGS),
           "dq": (kernels._attn_bwd_dq_kernel, kernels.DQ_CONFIGS),
           "dkdv": (kernels._attn_bwd_dkdv_kernel, kernels.DKDV_CONFIGS)}
DATA = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV"}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _signature(kernel, dtype):
    sig = {}
    for name in unwrap(kernel).arg_names:
        if name in DATA:
            sig[name] = POINTER[str(dtype).replace("torch.", "")]
        elif name in ("LSE", "DELTA"):
            sig[name] = "*fp32"
        elif name == "MASK":
            sig[name] = "*i1"
        elif name == "END":
            sig[name] = "*i32"
        elif name in ("qk_scale", "sm_scale"):
            sig[name] = "fp32"
        elif name not in ("HEAD_DIM", "HAS_MASK", "PRECISION", "BLOCK_M", "BLOCK_N"):
            sig[name] = "i32"
    return sig


def _launch_values(head_dim, groups=3, batch=16, heads=8, length=24):
    """Integer arguments of a grouped launch in the model's layout (mask [B, Lk]: strides 0, Lk; key ends
    [B]: strides 0, 1)."""
    strides = {"g": batch * length * heads * head_dim, "b": length * heads * head_dim, "h": head_dim,
               "l": heads * head_dim}
    values = {f"s{t}_{axis}": stride for t in ("q", "k", "v", "o", "do", "dq", "dk", "dv")
              for axis, stride in strides.items()}
    key = 1 << (length - 1).bit_length()
    return dict(values, sm_g=0, sm_b=length, se_g=0, se_b=1, B=batch, H=heads, LQ=length, LK=length, LQ_KEY=key,
                LK_KEY=key)


def _launched_configs(kind, dtype, head_dim):
    """The configs the autotuner would benchmark on a GPU for this dtype / head dim."""
    configs = KERNELS[kind][1]
    fake_q = SimpleNamespace(element_size=lambda: torch.empty((), dtype=dtype).element_size())
    return kernels.fitting_configs(configs, {"Q": fake_q}, kind, HEAD_DIM=head_dim)


def test_prune_keeps_fitting_configs_and_the_first_one_in_the_interpreter(monkeypatch):
    fake_q = SimpleNamespace(element_size=lambda: 4)
    for kind, (kernel, configs) in KERNELS.items():
        assert kernel.configs == configs
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert kernel.early_config_prune(configs, {"Q": fake_q}, HEAD_DIM=128) == configs[:1]
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        assert kernel.early_config_prune(configs, {"Q": fake_q}, HEAD_DIM=16) == configs


def _cases():
    """kind x dtype x head dim. float32 at Dh >= 64 (IEEE dots unrolled to FMAs) takes ~2/3 of the
    ~15 min a cold run takes on 2 busy cores: marked slow, so CI can trade it with -m "not slow"."""
    for kind in KERNELS:
        for dtype in DTYPES:
            for head_dim in kernels.HEAD_DIMS:
                slow = dtype == torch.float32 and head_dim >= 64
                yield pytest.param(kind, dtype, head_dim, marks=[pytest.mark.slow] if slow else [],
                                   id=f"{kind}-{str(dtype).replace('torch.', '')}-Dh{head_dim}")


@pytest.mark.parametrize("kind,dtype,head_dim", list(_cases()))
def test_compiles_within_shared_memory(kind, dtype, head_dim, record_property):
    """Every config the autotuner may launch, with a mask; without one (a compile-time subset of
    the masked code) for the first config."""
    kernel = KERNELS[kind][0]
    configs = _launched_configs(kind, dtype, head_dim)
    assert configs
    sig = _signature(kernel, dtype)
    divisible, ones = launch_hints(kernel, sig, _launch_values(head_dim))
    shared = {}
    for i, config in enumerate(configs):
        for has_mask in (True, False) if i == 0 else (True,):
            constexprs = dict(config.kwargs, HEAD_DIM=head_dim, HAS_MASK=has_mask,
                              PRECISION="ieee" if dtype == torch.float32 else "tf32", **ones)
            out = compile_for_targets(kernel, sig, constexprs, num_warps=config.num_warps,
                                      num_stages=config.num_stages, divisible=divisible)
            for target in TARGETS:
                assert "cubin" in out[target.name].asm
            # the prune estimate must not under-estimate, or the autotuner could launch a config that fails
            used = max(c.metadata.shared for c in out.values())
            assert used <= kernels._smem_estimate(config, head_dim, torch.empty((), dtype=dtype).element_size(),
                                                  kind)
            shared[str(config)] = used
    record_property("shared_bytes", shared)


@pytest.mark.parametrize("lk", [24, 33, 110, 300])
@pytest.mark.parametrize("per_group", [False, True], ids=["mask-B-Lk", "mask-G-B-Lk"])
def test_keys_end_kernel_compiles(lk, per_group):
    """The key-end kernel at each column block it launches with (keys_end_block), for a shared [B, Lk]
    and a per-group [G, B, Lk] mask (3 groups x 16 dialogues)."""
    kernel = kernels._keys_end_kernel
    sig = {"MASK": "*i1", "END": "*i32", "sm_g": "i32", "sm_b": "i32", "B": "i32", "ROWS": "i32", "LK": "i32"}
    batch = 16
    values = dict(sm_g=batch * lk if per_group else 0, sm_b=lk, B=batch, ROWS=3 * batch if per_group else batch, LK=lk)
    divisible, ones = launch_hints(kernel, sig, values)
    constexprs = dict(BLOCK_R=kernels.KEYS_END_ROWS, BLOCK_L=kernels.keys_end_block(lk), **ones)
    out = compile_for_targets(kernel, sig, constexprs, num_warps=kernels.KEYS_END_WARPS,
                              num_stages=kernels.KEYS_END_STAGES,
                              divisible=divisible)
    for target in TARGETS:
        assert "cubin" in out[target.name].asm
