"""SASS instructions per similarity element per pass of the SupCon forward kernels, without a GPU.

Compiles mcncl_fast/kernels/supcon.py's three kernels as a launch would (config, K tile and tile options of
the launcher; tt.divisibility of a contiguous z, tests.aot.launch_hints), re-assembles with Triton's
ptxas flags (registers, spills) and reads the tile loops off `cuobjdump -sass`: a tile loop is a
loop whose body holds the MMA; its body divided by the similarity elements each thread holds per
tile (BM * BN / threads) is the instruction count per element per pass (with a K loop, per tile:
the tile loop's body and the K loop's once more per further K step).

    python benchmarks/supcon_pass_sass.py [--dtype bfloat16] [--d 128] [--capability 90]
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from static_analysis import MMA, cuobjdump, find_loops, ptxas_usage, split_functions  # noqa: E402
from tests.aot import POINTER, TARGETS, compile_for_targets, config_options, launch_hints  # noqa: E402

ROWS = {"labels_ptr": "*i32", "k_ptr": "*i32", "nneg_ptr": "*i32"}
INTS = ("N", "D", "row_start", "row_count", "stride_m", "stride_n", "stride_d")
SIGNATURES = {
    "sample": dict(ROWS, state_ptr="*i32", n_chunks="i32", **{a: "i32" for a in INTS}),
    "count": dict(ROWS, state_ptr="*i32", **{a: "i32" for a in INTS}),
    "final": dict(ROWS, delta_ptr="*fp32", state_ptr="*i32", cand_ptr="*fp32", mult_ptr="*i32", theta_ptr="*fp32",
                  logd_ptr="*fp32", possum_ptr="*fp32", passes_ptr="*i32", out_stride="i32", passes_stride="i32",
                  inv_tau="fp32", **{a: "i32" for a in INTS}),
}
# tile loops in program order -> what they are
LOOP_NAMES = {"sample": ["sample chunk (sort of CHUNK columns)"],
              "count": ["pass 1 (value bins + extremes, sum of positives)", "counting pass, value bins",
                        "counting pass, key bins"],
              "final": ["final pass (exp sums, extremes, candidates)"]}


def tile_loops(instrs, k_steps: int = 0):
    """[(SASS per tile, [nested loop sizes])] of the tile loops, in program order. Without a K loop
    (k_steps = 0) a tile loop is an innermost loop holding the MMA; with one, the innermost MMA
    loop is the K loop and its parent the tile loop: per tile, its body plus k_steps - 1 more K steps."""
    def has_mma(start, end):
        return any(MMA.search(ins) for addr, ins in instrs if start <= addr <= end)

    out = []

    def walk(nest, parent=None):
        for node in nest:
            start, end, size, kids = node
            if not has_mma(start, end):
                continue
            inner = [k for k in kids if has_mma(k[0], k[1])]
            if inner:
                walk(inner, node)
            elif k_steps and parent is not None:
                out.append((parent[2] + (k_steps - 1) * size, [k[2] for k in parent[3]]))
            elif not k_steps:
                out.append((size, [k[2] for k in kids]))
    walk(find_loops(instrs))
    return out


def analyse(dtype_name: str, d: int, capability: int, n: int = 32768):
    from mcncl_fast.kernels import supcon as kernel
    from mcncl_fast.kernels.supcon_select import sample_chunks
    dtype = getattr(torch, dtype_name)
    target = next(t for t in TARGETS if t.capability == capability)
    hopper = capability >= 90
    bk = kernel.block_k(d, dtype)
    one_k = d <= bk and hopper
    rows = []
    for name, signature in SIGNATURES.items():
        config = {"sample": kernel.SAMPLE_CONFIGS[0], "count": kernel.configs_for(dtype, d, hopper)[0],
                  "final": kernel.configs_for(dtype, d, hopper, final=True)[0]}[name]
        constexprs, warps, stages = config_options(config)
        values = dict(N=n, D=d, row_start=0, row_count=n, n_chunks=sample_chunks(n), stride_m=n * d, stride_n=d,
                      stride_d=1, out_stride=n, passes_stride=n // constexprs["BM"])
        fn = getattr(kernel, f"_supcon_{name}_kernel")
        sig = dict(signature, z_ptr=POINTER[dtype_name])
        divisible, ones = launch_hints(fn, sig, {a: v for a, v in values.items() if a in sig})
        cx = dict(constexprs, BK=bk, ONE_K=one_k, **ones)
        if name == "count":
            cx["GROUPED"] = one_k and dtype != torch.float32
        cx.update({"count": dict(READY_=kernel.READY.value), "final": dict(CAP_=kernel.CAP.value)}.get(name, {}))
        compiled = compile_for_targets(fn, sig, cx, warps, stages, targets=(target,), divisible=divisible)[target.name]
        usage = ptxas_usage(compiled, capability)
        instrs = next(iter(split_functions(cuobjdump(compiled.asm["cubin"], "-sass")).values()))
        per_thread = constexprs["BM"] * (constexprs["BN"] if name != "sample" else kernel.CHUNK.value) / (32 * warps)
        k_steps = 0 if one_k else -(-d // bk)
        for label, (size, kids) in zip(LOOP_NAMES[name], tile_loops(instrs, k_steps)):
            rows.append(dict(kernel=name, loop=label, config=f"BM={constexprs['BM']} BN={constexprs['BN']} w{warps}",
                             regs=usage["regs"], spills=f"{usage['spill_stores']}/{usage['spill_loads']}",
                             body=size, inner=kids, per_element=size / per_thread, elements=per_thread))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--capability", type=int, default=90)
    args = parser.parse_args(argv)
    print(f"{args.dtype}, D = {args.d}, sm_{args.capability}, launch at N = 32768\n")
    print("| kernel | tile loop | config | regs | spill st/ld (B) | body (SASS) | loops inside | "
          "elements / thread / tile | SASS / element |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in analyse(args.dtype, args.d, args.capability):
        print(f"| {r['kernel']} | {r['loop']} | {r['config']} | {r['regs']} | {r['spills']} | {r['body']} | "
              f"{', '.join(map(str, r['inner'])) or '-'} | {r['elements']:.0f} | {r['per_element']:.1f} |")


if __name__ == "__main__":
    sys.exit(main())
