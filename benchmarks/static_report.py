"""Static performance report of the GPU kernels, from what the compilers produce (no GPU needed).

    python benchmarks/static_report.py [--root CHECKOUT] [--arch 90,80] [--kernels supcon,attention,psa,cuda]
                                       [--selection-passes] [--estimate [--estimate-sizes 384,32768]]
                                       [--output FILE [--section NAME]] [--json FILE]

Triton kernels. The real launchers (mcncl_fast/kernels/*.py: supcon_fwd, attention_fwd/bwd, psa_fwd/bwd,
psa_pool_fwd/bwd; *_forward / *_backward in older checkouts) run on CPU tensors of the benchmark
shapes with every kernel's `run` replaced by a recorder. Each recorded launch is expanded like the autotuner does
on a GPU (early prune, heuristics) and specialised by Triton's own launch binder (JITFunction._pack_args): a
pointer or an integer divisible by 16 gets tt.divisibility=16, an integer equal to 1 becomes the
constexpr 1. Then triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda",
90, 32), options) — the compile of a real launch, without a driver. Per variant:
  * registers, spill stores/loads: `ptxas -v` (Triton's bundled ptxas) on the PTX with the flags
    Triton's make_cubin passes (-lineinfo, -v, --regAllocOptLevel=2, --gpu-name=sm_90a); the report
    says if the result is not byte-identical to Triton's cubin.
  * smem: compiled.metadata.shared (dynamic shared memory per CTA); for CUDA the static smem of ptxas
    ("+ dynamic": the kernel accesses shared memory it does not declare, sized at launch, not counted).
  * CTAs/SM = min(2048 / threads, (65536 / regs per warp) / warps, 228 KiB / (smem + 1 KiB),
    32), regs per warp = regs x 32 rounded up to 256 (A100: 164 KiB). The letters say which limit:
    T threads, R registers, S shared memory, C the 32-CTA cap.
  * MMA: tensor-core instructions in the SASS (HGMMA = wgmma, HMMA.16816 = mma.sync), most frequent.
  * widest global load: LDG / LDGSTS (cp.async) / UTMALDG (TMA) ranked by width (.128 > .64 > 32-bit
    > .U16 > .U8; TMA highest), with its count / all global loads.
  * loop bodies: `cuobjdump -sass` of the cubin; a loop is a back edge (BRA to an address <= its own),
    its body the instructions from the target to the branch (static count, 16 bytes each). Loops are
    listed in program order as `size[nested loops]`; the innermost ones are the hot K / key loops, the
    ones around them the per-tile bodies (e.g. SupCon forward: stats, histogram, denominator passes).
CUDA kernels (every csrc/*.cu defining a __global__ function, one nvcc run each): nvcc -cubin -O3
-std=c++17 -Xptxas=-v -gencode=arch=compute_90,code=sm_90, same columns; the block size comes from
__launch_bounds__ (EIATTR_MAX_THREADS in cuobjdump -elf), the grid is not known statically.
--selection-passes: the SupCon forward's histogram-selection pass count (benchmarks/supcon_passes.py).
--estimate: the SupCon op's time on an H100 SXM estimated from the sm_90 SASS (benchmarks/h100_estimate.py,
benchmarks/h100_supcon.py): per kernel and N, M = 3, D = 128, bfloat16 and float32, with the eager
reference's traffic estimate; `--kernels ""` gives that section alone.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":       # the interpreter patches triton.language: real compiles fail
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    os.execve(sys.executable, [sys.executable, *sys.argv], env)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")   # as tests/aot.py and benchmarks/gpu_report.sh

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import static_analysis as sa  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
GROUPS = ("supcon", "attention", "psa", "cuda")
SUPCON = dict(M=3, N=32768, D=128, classes=7, hard_ratio=0.3)              # benchmarks/test_supcon.py
ATTN = dict(G=3, B=16, H=8, L=24, DH=32)     # one grouped launch of the model: 3 streams, 16 dialogues x 24
PSA = dict(N=16 * 24, L=8, C=256)            # 16 dialogues x 24 utterances, 8 frames, d_model 256
DTYPES = {"supcon": ("bfloat16", "float32"), "attention": ("bfloat16", "float32"), "psa": ("bfloat16", "float32")}


# ------------------------------------------------------------------ launches at the benchmark shapes
def launcher(module, name: str, old_name: str):
    """The launcher `name` of a kernels module, or `old_name` in checkouts from before the *_fwd / *_bwd names."""
    return getattr(module, name, None) or getattr(module, old_name)


def supcon_launches(pkg, dtype, n=None):
    m, n, d = SUPCON["M"], n or SUPCON["N"], SUPCON["D"]
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, SUPCON["classes"], (n,), generator=gen, dtype=torch.int32)
    sizes = torch.bincount(labels)[labels.long()]
    neg = (n - sizes).to(torch.int32)
    k = torch.clamp(torch.ceil(SUPCON["hard_ratio"] * neg - 1e-6), min=1).to(torch.int32)
    values = dict(z=torch.zeros(m, n, d, dtype=dtype), labels=labels, class_ids=labels, k=k, nneg=neg, negatives=neg,
                  temperature=0.07, hard_ratio=SUPCON["hard_ratio"], delta=torch.zeros(m))
    yield "supcon fwd", launcher(pkg.supcon, "supcon_fwd", "supcon_forward"), values


def padding_mask(rows, length):
    """bool [rows, length]: a random valid prefix of 1..length per row (dialogue / frame padding)."""
    lengths = torch.randint(1, length + 1, (rows,), generator=torch.Generator().manual_seed(0))
    return torch.arange(length)[None, :] < lengths[:, None]


def attention_launches(pkg, dtype):
    g, b, h, length, dh = ATTN["G"], ATTN["B"], ATTN["H"], ATTN["L"], ATTN["DH"]

    def layout():   # the model's grouped layout: [G, B, S, H, Dh] memory seen as [G, B, H, S, Dh]
        return torch.zeros(g, b, length, h, dh, dtype=dtype).transpose(2, 3)
    mask = padding_mask(b, length)
    values = dict(q=layout(), k=layout(), v=layout(), out=layout(), grad_out=layout(), mask=mask, scale=dh ** -0.5,
                  lse=torch.zeros(g * b * h, length), key_end=torch.full((b,), length, dtype=torch.int32))
    yield "attention fwd", launcher(pkg.attention, "attention_fwd", "attention_forward"), values
    yield "attention bwd", launcher(pkg.attention, "attention_bwd", "attention_backward"), values


def psa_launches(pkg, dtype):
    n, length, c = PSA["N"], PSA["L"], PSA["C"]
    q, f32 = c // 4, torch.float32
    values = dict(x=torch.zeros(n, length, c, dtype=dtype), frame_mask=padding_mask(n, length),
                  weights=[torch.zeros(q, q, 2 * s + 3, dtype=dtype) for s in range(4)],
                  biases=[torch.zeros(q, dtype=dtype) for _ in range(4)], fc1_w=torch.zeros(q, c, dtype=dtype),
                  fc1_b=torch.zeros(q, dtype=dtype), fc2_w=torch.zeros(c, q, dtype=dtype),
                  fc2_b=torch.zeros(c, dtype=dtype), y=torch.zeros(n, length, c, dtype=dtype),
                  z=torch.zeros(n, c, dtype=f32), h=torch.zeros(n, q, dtype=f32), g=torch.zeros(n, c, dtype=f32),
                  sums=torch.zeros(n, 24 * q, dtype=f32))
    yield "psa fwd", launcher(pkg.psa, "psa_fwd", "psa_forward"), values
    yield "psa bwd", launcher(pkg.psa_backward, "psa_bwd", "psa_backward"), dict(
        values, grad=torch.zeros(n, length, c, dtype=dtype))
    yield "psa_pool fwd", launcher(pkg.psa_pool, "psa_pool_fwd", "psa_pool_forward"), values
    yield "psa_pool bwd", launcher(pkg.psa_pool, "psa_pool_bwd", "psa_pool_backward"), dict(
        values, grad=torch.zeros(n, c, dtype=dtype))


LAUNCHES = {"supcon": supcon_launches, "attention": attention_launches, "psa": psa_launches}


def short(name: str) -> str:
    return name.strip("_").removesuffix("_kernel")


def triton_rows(pkg, group, dtypes, capability, only, log):
    from triton.backends.compiler import GPUTarget
    target = GPUTarget("cuda", capability, 32)
    for dtype in dtypes:
        for launch, fn, values in LAUNCHES[group](pkg, getattr(torch, dtype)):
            base = dict(launch=launch, dtype=dtype)
            try:
                with sa.record_launches(pkg) as launches:
                    sa.call_by_name(fn, values)
                variants = [(short(v.jit.__name__), v) for rec in launches for v in sa.expand(rec, target)]
            except Exception as exc:
                yield dict(base, kernel="?", config="", error=f"launcher: {type(exc).__name__}: {exc}")
                continue
            for name, variant in variants:
                if only and not any(o in name for o in only):
                    continue
                row = dict(base, kernel=name, config=variant.label)
                log(f"sm_{capability} {launch} {name} {dtype} {variant.label}")
                try:
                    row.update(sa.analyse_triton(variant, capability))
                except Exception as exc:
                    row["error"] = f"{type(exc).__name__}: {str(exc).strip()[-300:]}"
                yield row


def cuda_rows(root, capability, log):
    """Every csrc/*.cu file that defines a __global__ kernel, compiled on its own."""
    nvcc = os.environ.get("CUDACXX") or shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    dtypes = {"__half": "float16", "half": "float16", "f16": "float16", "fp16": "float16", "__nv_bfloat16": "bfloat16",
              "bf16": "bfloat16", "float": "float32", "f32": "float32", "fp32": "float32"}
    sources = [p for p in sorted((root / "csrc").glob("*.cu")) if "__global__" in p.read_text()]
    rows = []
    for source in sources:
        log(f"sm_{capability} nvcc csrc/{source.name}")
        base = dict(launch=f"{source.name} (CUDA)", config="", grid=None)
        try:
            found = sa.analyse_cuda(source, root / "csrc", capability, nvcc)
        except Exception as exc:
            message = " ".join(str(exc).replace(str(root) + "/", "").split())
            rows.append(dict(base, kernel="?", dtype="", error=message[-300:]))
            continue
        for row in found:
            name, _, arg = row["kernel"].partition("<")
            words = [arg.rstrip(">")] + re.split(r"[_<>, ]+", name)
            dtype = next((dtypes[w] for w in words if w in dtypes), "—")
            rows.append({**base, **row, "config": f"{row['threads']} threads", "dtype": dtype})
    return rows or [dict(launch="csrc (CUDA)", kernel="?", dtype="", config="", error="no __global__ in csrc/*.cu")]


# ------------------------------------------------------------------ markdown
LEGEND = ("grid: CTAs of the launch. CTAs/SM: resident CTAs per SM and what limits them (T threads, R registers, "
          "S shared memory, C the 32-CTA cap). MMA: most frequent tensor-core instructions (HGMMA = wgmma, "
          "HMMA.16816 = mma.sync). Widest global load: (its count / all global loads). Loop bodies: SASS "
          "instructions per iteration of each loop (back edge to branch), program order, nested loops in brackets.")
ESTIMATE_LEGEND = (
    "Estimate, M = 3, D = 128, random embeddings, 7 classes, hard_ratio 0.3: per-pipe issue model of each kernel's "
    "tile loop (benchmarks/h100_estimate.py: 132 SMs x 4 schedulers at 1.755 GHz; fp32 1, integer/compare/select/"
    "conversion 2, MUFU 8, shared/L1 4 per 32 bits, wgmma 1024 FLOP per scheduler-cycle). Low: the busiest pipe "
    "for every tile, work spread evenly over the SMs. High: whole waves of CTAs, each tile the larger of the "
    "resident CTAs' pipe time and one CTA's latency chain (a waited wgmma batch, 24 cycles per barrier, 400 per "
    "L2 load not staged by cp.async/TMA). Sweeps over the N columns per program: the checkout's "
    "benchmarks/supcon_selection_model.py (programs sampled; low: mean, high: max); trips/tile: candidate "
    "trips of the final pass's nested loop. Backward: csrc/ CUDA kernels (nvcc). Eager: bytes per N x N element "
    "of the reference's ops (benchmarks/h100_supcon.py:EAGER_BYTES) at 3.35 TB/s (low) and 60% of it (high). "
    "Goals: forward + backward, bfloat16.")
COLUMNS = ["kernel", "launch", "dtype", "config", "grid", "regs", "spill st/ld (B)", "smem (B)", "CTAs/SM",
           "MMA", "widest global load", "loop bodies (SASS instrs)"]


def cells(row):
    if "error" in row:
        return [row["kernel"], row["launch"], row["dtype"], row["config"], *["—"] * 7, f"error: {row['error'][:150]}"]
    mark = "" if row.get("same_cubin", True) else " †"
    return [f"`{row['kernel']}`", row["launch"], row["dtype"], row["config"], row.get("grid") or "—",
            f"{row['regs']}{mark}", f"{row['spill_stores']}/{row['spill_loads']}",
            f"{row['smem']} + dynamic" if row.get("dynamic_smem") else row["smem"],
            f"{row['ctas']} ({row['limit']})", row["mma"], row["widest_load"], row["loops"]]


def table(rows):
    out = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in cells(r)) + " |" for r in rows]
    return "\n".join(out)


def git_describe(root: Path) -> str:
    def git(*args):
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True).stdout.strip()
    commit = git("rev-parse", "--short", "HEAD") or "unknown commit"
    changed = git("status", "--porcelain", "--", "mcncl_fast/kernels", "kernels", "csrc")
    dirty = " + uncommitted changes" if changed else ""
    return f"commit {commit}{dirty}"


def command_line(argv, root: Path) -> str:
    """The command as run, with --root shown as $ROOT when it is another checkout (paths outside the repo)."""
    args, shown = list(argv), []
    for i, a in enumerate(args):
        prev = args[i - 1] if i else ""
        if prev == "--root" and Path(a).resolve() != REPO:
            a = "$ROOT"
        elif a.startswith("--root="):
            a = "--root=$ROOT"
        shown.append(a)
    return " ".join(["python benchmarks/static_report.py", *map(shlex.quote, shown)]).replace("'$ROOT'", "$ROOT")


def render(root, archs, sections, elapsed):
    import triton
    nvcc = os.environ.get("CUDACXX") or shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    nvcc_version = sa.tool_version(nvcc) if Path(nvcc).exists() else "absent"
    gpu = f"GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "no GPU"
    ptxas = ", ".join(f"{sa.tool_version(sa.ptxas_path(a))} for sm_{a}" for a in archs)
    head = [f"Generated {datetime.date.today().isoformat()} by `{command_line(sys.argv[1:], root)}` in "
            f"{elapsed / 60:.1f} min on a {os.cpu_count()}-core CPU machine, {gpu}; mcncl_fast/kernels/ and csrc/ of "
            f"{git_describe(root)}" + (" (checked out at $ROOT)." if root != REPO else "."),
            f"triton {triton.__version__} (ptxas {ptxas}), nvcc {nvcc_version}, torch {torch.__version__}; compiled "
            f"for {', '.join(f'sm_{a}' for a in archs)}. Shapes: SupCon M={SUPCON['M']} N={SUPCON['N']} "
            f"D={SUPCON['D']}; attention G={ATTN['G']} B={ATTN['B']} H={ATTN['H']} L={ATTN['L']} Dh={ATTN['DH']} "
            f"(model layout, key padding); PSA N={PSA['N']} L={PSA['L']} C={PSA['C']} (frame mask)."]
    return "\n".join(head + [""] + sections) + "\n"


def write_section(path: Path, name: str, body: str):
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = path.read_text() if path.exists() else ""
    if begin in text and end in text:
        pre, rest = text.split(begin, 1)
        text = pre + begin + "\n" + body + end + rest.split(end, 1)[1]
    else:
        text += f"\n## {name}\n\n{begin}\n{body}{end}\n"
    path.write_text(text)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=REPO, help="checkout whose Triton kernels and csrc/ are compiled")
    parser.add_argument("--arch", default="90", help="compute capabilities, comma-separated (90, 80)")
    parser.add_argument("--kernels", default=",".join(GROUPS), help=f"groups, comma-separated: {','.join(GROUPS)}")
    parser.add_argument("--only", default="", help="kernel name substrings, comma-separated (e.g. attn_fwd)")
    parser.add_argument("--dtypes", default="", help="restrict the Triton dtypes (e.g. float32)")
    parser.add_argument("--selection-passes", action="store_true",
                        help="add the SupCon forward's selection pass counts (benchmarks/supcon_passes.py)")
    parser.add_argument("--estimate", action="store_true",
                        help="add the SupCon H100 time estimate (benchmarks/h100_supcon.py)")
    parser.add_argument("--estimate-sizes", default="384,32768,262144,1048576",
                        help="N of the estimate, comma-separated")
    parser.add_argument("--programs", type=int, default=32, help="programs sampled per N in the pass simulation")
    parser.add_argument("--output", type=Path, help="write the markdown here (default: stdout only)")
    parser.add_argument("--section", help="replace only the <!-- SECTION:begin/end --> block of --output")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    groups = [g for g in args.kernels.split(",") if g]
    if unknown := set(groups) - set(GROUPS):
        parser.error(f"--kernels: unknown {sorted(unknown)}")
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    only = [o for o in args.only.split(",") if o]
    start, pkg, sections, all_rows = time.time(), None, [], {}
    for capability in map(int, args.arch.split(",") if groups else ()):
        rows = []
        for group in groups:
            if group == "cuda":
                rows += cuda_rows(root, capability, log)
                continue
            pkg = pkg or sa.load_kernels(root)
            dtypes = [d for d in DTYPES[group] if not args.dtypes or d in args.dtypes.split(",")]
            rows += list(triton_rows(pkg, group, dtypes, capability, only, log))
        all_rows[capability] = rows
        arch = sa.ARCHS[capability]
        sections += [f"### sm_{capability} ({arch.name}: {arch.smem_per_sm // 1024} KiB shared/SM, {arch.sms} SMs)", "",
                     LEGEND, "", table(rows), ""]
        if any(not r.get("same_cubin", True) for r in rows):
            sections += ["† re-assembled cubin differs from Triton's: registers may not be the launched ones.", ""]
    if args.selection_passes:
        import supcon_passes
        sections += ["### SupCon forward: exact-selection passes per program", "",
                     "Mean over programs of the passes over the similarity tiles (stats + histogram passes + "
                     "denominator); simulation: benchmarks/supcon_passes.py, 7 random classes, hard_ratio 0.3, "
                     "D = 128; clustered = class mean + N(0, I/D) noise.", "",
                     supcon_passes.report(root, programs=args.programs, log=log), ""]
    if args.estimate:
        import h100_supcon
        dtypes = [d for d in DTYPES["supcon"] if not args.dtypes or d in args.dtypes.split(",")]
        sizes = [int(n) for n in args.estimate_sizes.split(",") if n]
        sections += ["### SupCon on an H100 SXM: estimate from the sm_90 SASS (not a measurement)", "",
                     ESTIMATE_LEGEND, "", h100_supcon.report(root, dtypes, sizes, log=log), ""]
    text = render(root, list(all_rows) or [90], sections, time.time() - start)
    print(text)
    if args.json:
        args.json.write_text(json.dumps({str(k): v for k, v in all_rows.items()}, indent=1, default=str))
    if args.output:
        if args.section:
            write_section(args.output, args.section, text)
        else:
            args.output.write_text(text)
    return 0 if not any("error" in r for rows in all_rows.values() for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
