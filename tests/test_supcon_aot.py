"""Ahead-of-time compile of the SupCon forward kernel for sm_90 and sm_80 (DESIGN.md §6, issue #4).

Every autotune config a GPU launch keeps for each dtype (kernels.supcon.configs_for) and every K tile
the launcher passes (block_k) compiles for Hopper and Ampere with tests/aot.py, fits the shared
memory, and (where Triton's ptxas is present) assembles without register spills (ptxas with the flags
Triton passes). Each with the specialisation of a launch on a contiguous z (N = 32768): pointers,
N and the strides divisible by 16 when D is (case suffix "aligned", else "unaligned"), stride_d the
constexpr 1.

The compiles run in one subprocess without TRITON_INTERPRET: in this process the interpreter has
patched triton.language (and the kernel module was imported interpreted), which breaks real
compiles depending on which interpreted tests ran before; the subprocess also sees the GPU config
list and pruning rule, which the interpreter replaces.
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DTYPES = ("float32", "float16", "bfloat16")
FEATURE_SIZES = (16, 32, 128, 200)

SCRIPT = textwrap.dedent("""
    import json, os, subprocess, sys, tempfile
    import torch
    from mcncl_fast.kernels import supcon as kernel
    from tests.aot import POINTER, TARGETS, compile_for_targets, config_options, launch_hints

    assert not kernel.INTERPRET
    SIGNATURE = {"labels_ptr": "*i32", "k_ptr": "*i32", "nneg_ptr": "*i32", "delta_ptr": "*fp32",
                 "theta_ptr": "*fp32", "logd_ptr": "*fp32", "possum_ptr": "*fp32", "passes_ptr": "*i32",
                 "N": "i32", "D": "i32", "row_start": "i32", "row_count": "i32", "stride_m": "i32",
                 "stride_n": "i32", "stride_d": "i32", "inv_tau": "fp32", "passes_stride": "i32"}

    def ptxas_log(compiled, capability):
        try:
            from triton.backends.nvidia.compiler import get_ptxas
            ptxas = get_ptxas(capability).path
        except Exception:
            return None
        if not os.path.exists(ptxas):
            return None
        arch = f"sm_{capability}a" if capability == 90 else f"sm_{capability}"
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(compiled.asm["ptx"])
        try:
            out = subprocess.run([ptxas, "-lineinfo", "-v", "--regAllocOptLevel=2", f"-arch={arch}", f.name,
                                  "-o", os.devnull],
                                 capture_output=True, text=True, timeout=300)
        finally:
            os.unlink(f.name)
        return out.stderr

    results = {}
    for name in sys.argv[2].split(","):
        dtype = getattr(torch, name)
        configs = kernel.configs_for(dtype)
        launches = {}          # (K tile, D multiple of 16) -> integer arguments of such a launch
        for d in map(int, sys.argv[3].split(",")):
            n = 32768
            launches.setdefault((kernel.block_k(d, dtype), d % 16 == 0),
                                dict(N=n, D=d, row_start=0, row_count=n, stride_m=n * d, stride_n=d, stride_d=1,
                                     passes_stride=-(-n // 16)))
        sig = dict(SIGNATURE, z_ptr=POINTER[name])
        for config in configs:
            for (bk, aligned), values in sorted(launches.items()):
                constexprs, warps, stages = config_options(config)
                divisible, ones = launch_hints(kernel.supcon_forward_kernel, sig, values)
                constexprs.update(ones, BK=bk)
                case = (f"{name}-BM{constexprs['BM']}-BN{constexprs['BN']}-BK{bk}-w{warps}-"
                        f"{'aligned' if aligned else 'unaligned'}")
                entry = results.setdefault(case, {})
                try:
                    compiled = compile_for_targets(kernel.supcon_forward_kernel, sig, constexprs, warps, stages,
                                                   divisible=divisible)
                except Exception as exc:           # reported per case by the test
                    entry["error"] = f"{type(exc).__name__}: {exc}"[-3000:]
                    continue
                for target in TARGETS:
                    c = compiled[target.name]
                    entry[target.name] = {"shared": c.metadata.shared, "max_shared": target.max_shared,
                                          "ptxas": ptxas_log(c, target.capability)}
    json.dump(results, open(sys.argv[1], "w"), indent=1)
""")


@pytest.fixture(scope="module")
def aot_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("supcon_aot") / "results.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(out), ",".join(DTYPES),
                           ",".join(map(str, FEATURE_SIZES))], capture_output=True, text=True, env=env,
                          timeout=1800, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


EXPECTED_CASES = {
    # dtype -> the (BM, BN, BK) a GPU launch can use: float32 keeps BM = 64 and BK = 16,
    # 16-bit keeps both configs and BK in {32, 64}
    "float32": {(64, 64, 16)},
    "float16": {(64, 64, 32), (64, 64, 64), (128, 32, 32), (128, 32, 64)},
    "bfloat16": {(64, 64, 32), (64, 64, 64), (128, 32, 32), (128, 32, 64)},
}


@pytest.mark.slow
def test_launch_cases_are_the_expected_ones(aot_results):
    found = {}
    for case in aot_results:
        name, bm, bn, bk = case.split("-")[:4]
        found.setdefault(name, set()).add((int(bm[2:]), int(bn[2:]), int(bk[2:])))
    assert found == EXPECTED_CASES


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_kernel_compiles_for_sm90_and_sm80(aot_results, dtype):
    cases = {k: v for k, v in aot_results.items() if k.startswith(dtype + "-")}
    assert cases
    for case, entry in cases.items():
        assert "error" not in entry, f"{case}: {entry.get('error')}"
        for target, info in entry.items():
            print(f"\n{case} {target}: shared={info['shared']} bytes")
            assert info["shared"] <= info["max_shared"], (case, target)
            if info["ptxas"] is not None:
                assert "0 bytes spill stores, 0 bytes spill loads" in info["ptxas"], (case, target, info["ptxas"])
