"""Ahead-of-time compile of the SupCon forward kernels for sm_90 and sm_80 (DESIGN.md §6).

For each dtype, feature size D and target, the config a GPU launch uses (kernels.supcon.configs_for),
the K tile (block_k) and the tile options (tile_options: resident anchor tile and grouped counters
on sm_90 only) of the three kernels (sample, count, final) compile with tests/aot.py, fit the shared
memory and assemble without register spills (ptxas with the flags Triton passes). Each with the
specialisation of a launch on a contiguous z (N = 32768, tests.aot.launch_hints): pointers, N and
the strides divisible by 16 when D is, stride_d the constexpr 1.

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
    from mcncl_fast.kernels.supcon_select import sample_chunks
    from tests.aot import POINTER, TARGETS, compile_for_targets, config_options, launch_hints

    from mcncl_fast.kernels._common import interpreting
    assert not interpreting()
    ROWS = {"labels_ptr": "*i32", "k_ptr": "*i32", "nneg_ptr": "*i32"}
    INTS = ("N", "D", "row_start", "row_count")
    STRIDES = ("stride_m", "stride_n", "stride_d")
    SIGNATURES = {
        "sample": dict(ROWS, state_ptr="*i32", **{a: "i32" for a in INTS + ("n_chunks",) + STRIDES}),
        "count": dict(ROWS, state_ptr="*i32", **{a: "i32" for a in INTS + STRIDES}),
        "final": dict(ROWS, delta_ptr="*fp32", state_ptr="*i32", cand_ptr="*fp32", mult_ptr="*i32",
                      theta_ptr="*fp32", logd_ptr="*fp32", possum_ptr="*fp32", passes_ptr="*i32",
                      **{a: "i32" for a in INTS + STRIDES + ("out_stride", "passes_stride")}, inv_tau="fp32"),
    }

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
                                  "-o", os.devnull], capture_output=True, text=True, timeout=600)
        finally:
            os.unlink(f.name)
        return out.stderr

    results, done = {}, {}
    n = 32768
    for name in sys.argv[2].split(","):
        dtype = getattr(torch, name)
        for d in map(int, sys.argv[3].split(",")):
            for target in TARGETS:
                hopper = target.capability >= 90
                main = kernel.configs_for(dtype, d, hopper)[0]
                final = kernel.configs_for(dtype, d, hopper, final=True)[0]
                bk = kernel.block_k(d, dtype)
                one_k = d <= bk and hopper
                grouped = one_k and dtype != torch.float32
                for kname, signature in SIGNATURES.items():
                    config = {"sample": kernel.SAMPLE_CONFIGS[0], "count": main, "final": final}[kname]
                    constexprs, warps, stages = config_options(config)
                    values = dict(N=n, D=d, row_start=0, row_count=n, n_chunks=sample_chunks(n), stride_m=n * d,
                                  stride_n=d, stride_d=1, out_stride=n, passes_stride=n // constexprs["BM"])
                    fn = getattr(kernel, f"_supcon_{kname}_kernel")
                    sig = dict(signature, z_ptr=POINTER[name])
                    divisible, ones = launch_hints(fn, sig, {a: v for a, v in values.items() if a in sig})
                    cx = dict(constexprs, BK=bk, ONE_K=one_k, **ones)
                    if kname == "count":
                        cx["GROUPED"] = grouped
                    sizes = {"count": dict(READY_=kernel.READY.value), "final": dict(CAP_=kernel.CAP.value)}
                    cx.update(sizes.get(kname, {}))
                    case = (f"{name}-BM{cx['BM']}-BN{cx['BN']}-BK{bk}-{kname}-{target.name.split()[0]}-"
                            f"{'resident' if one_k else 'kloop'}-{'aligned' if d % 16 == 0 else 'unaligned'}")
                    if case in results:
                        continue
                    entry = results.setdefault(case, {})
                    try:
                        compiled = compile_for_targets(fn, sig, cx, warps, stages, targets=(target,),
                                                       divisible=divisible)[target.name]
                    except Exception as exc:           # reported per case by the test
                        entry["error"] = f"{type(exc).__name__}: {exc}"[-3000:]
                        continue
                    entry.update(shared=compiled.metadata.shared, max_shared=target.max_shared,
                                 ptxas=ptxas_log(compiled, target.capability))
    json.dump(results, open(sys.argv[1], "w"), indent=1)
""")


@pytest.fixture(scope="module")
def aot_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("supcon_aot") / "results.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(out), ",".join(DTYPES),
                           ",".join(map(str, FEATURE_SIZES))], capture_output=True, text=True, env=env,
                          timeout=3600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


EXPECTED_CASES = {
    # dtype -> (BM, BN, BK) of the count / final launches: 16-bit BN = 32 where the anchor tile stays
    # resident (sm_90, D <= 128, BK = D rounded up, at least 32), else BN = 16 (sm_80: a K loop;
    # D = 200: BK = 64); float32 (FMA dot) 128 x 16 (one stage), BK = 16
    "float32": {(128, 16, 16)},
    "float16": {(128, 32, 32), (128, 32, 128), (128, 16, 32), (128, 16, 128), (128, 16, 64)},
    "bfloat16": {(128, 32, 32), (128, 32, 128), (128, 16, 32), (128, 16, 128), (128, 16, 64)},
}


@pytest.mark.slow
def test_launch_cases_are_the_expected_ones(aot_results):
    found = {}
    for case in aot_results:
        name, bm, bn, bk, kname = case.split("-")[:5]
        if kname != "sample":                  # the sample kernel: 64 rows on 4 warps
            found.setdefault(name, set()).add((int(bm[2:]), int(bn[2:]), int(bk[2:])))
    assert found == EXPECTED_CASES
    assert {case.split("-")[4] for case in aot_results} == {"sample", "count", "final"}


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_kernels_compile_for_sm90_and_sm80(aot_results, dtype):
    cases = {k: v for k, v in aot_results.items() if k.startswith(dtype + "-")}
    assert cases
    for case, entry in cases.items():
        assert "error" not in entry, f"{case}: {entry.get('error')}"
        print(f"\n{case}: shared={entry['shared']} bytes")
        assert entry["shared"] <= entry["max_shared"], case
        if entry["ptxas"] is not None:
            assert "0 bytes spill stores, 0 bytes spill loads" in entry["ptxas"], (case, entry["ptxas"])
