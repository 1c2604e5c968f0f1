"""Helpers of benchmarks/static_report.py: compile as a launch would, read what the compiler produced.

* `load_kernels(root)`: the Triton kernels package of any checkout (`mcncl_fast/kernels/`, or the top-level
  `mcncl_fast/kernels/` of older checkouts), imported by path.
* `record_launches(package)`: run the real launchers on CPU tensors with every Triton kernel's `run`
  replaced by a recorder; `expand(launch, target)` then applies the autotuner's pruning, the
  heuristics and Triton's own launch binder (`JITFunction._pack_args`, triton 3.9) to each recorded
  call: signature, constexprs (an integer argument equal to 1 becomes the constexpr 1) and
  `tt.divisibility=16` attrs (pointers, integers divisible by 16) are exactly a real launch's.
* `ptxas_usage`, `sass_stats`, `occupancy`: registers / spills, MMA, loads, loops, CTAs per SM.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import math
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

KERNEL_MODULES = ("supcon", "attention", "psa", "psa_backward", "psa_pool", "psa_se")


# ------------------------------------------------------------------ per-SM limits and occupancy
@dataclass(frozen=True)
class Arch:
    capability: int
    name: str
    smem_per_sm: int          # bytes of shared memory per SM usable by CTAs
    sms: int
    threads_per_sm: int = 2048
    regs_per_sm: int = 65536
    max_ctas_per_sm: int = 32
    reserved_smem_per_cta: int = 1024
    reg_unit_per_warp: int = 256     # registers are allocated per warp in units of 256


ARCHS = {90: Arch(90, "H100", 228 * 1024, 132), 80: Arch(80, "A100", 164 * 1024, 108)}


def occupancy(arch: Arch, regs: int, threads: int, smem: int):
    """(CTAs per SM, the limiting resources: T threads / R registers / S shared memory / C CTA cap)."""
    warps = math.ceil(threads / 32)
    per_warp = math.ceil(max(regs, 1) * 32 / arch.reg_unit_per_warp) * arch.reg_unit_per_warp
    limits = {"T": arch.threads_per_sm // (warps * 32),
              "R": (arch.regs_per_sm // per_warp) // warps,
              "S": arch.smem_per_sm // (smem + arch.reserved_smem_per_cta),
              "C": arch.max_ctas_per_sm}
    best = min(limits.values())
    return best, ",".join(k for k in "TRSC" if limits[k] == best)


# ------------------------------------------------------------------ tools
def triton_tool(name: str) -> str:
    import triton
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.exists():
        raise FileNotFoundError(f"{path}: Triton's bundled {name} is missing")
    return str(path)


def ptxas_path(capability: int) -> str:
    from triton.backends.nvidia.compiler import get_ptxas
    return get_ptxas(capability).path


def tool_version(path: str) -> str:
    out = subprocess.run([path, "--version"], capture_output=True, text=True).stdout
    found = re.search(r"release (\d+\.\d+)", out)
    return found.group(1) if found else "?"


# ------------------------------------------------------------------ ptxas -v
PTXAS_ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(sm_\w+)'")
PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
PTXAS_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def parse_ptxas_log(log: str) -> dict:
    """{entry name: {"regs", "spill_stores", "spill_loads", "stack", "smem"}} from a `ptxas -v` log."""
    out, name = {}, None
    for line in log.splitlines():
        if m := PTXAS_ENTRY.search(line):
            name = m.group(1)
            out[name] = {"regs": None, "spill_stores": 0, "spill_loads": 0, "stack": 0, "smem": 0}
        elif name and (m := PTXAS_SPILL.search(line)):
            out[name].update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        elif name and (m := PTXAS_USED.search(line)):
            out[name].update(regs=int(m.group(1)), smem=int(m.group(2) or 0))
    return out


def ptxas_usage(compiled, capability: int) -> dict:
    """Re-assemble Triton's PTX with the flags triton/backends/nvidia/compiler.py (make_cubin) passes
    (-lineinfo, --fmad=false without fp fusion, -v, --regAllocOptLevel=2, ptx_options, sm_90a) and parse
    the -v log. "same_cubin": whether the result is byte-identical to the cubin Triton produced."""
    from triton import knobs
    from triton.backends.nvidia.compiler import sm_arch_from_capability
    md = compiled.metadata
    debug = ["-lineinfo", "-suppress-debug-info"] if knobs.compilation.disable_line_info else ["-lineinfo"]
    fmad = [] if getattr(md, "enable_fp_fusion", True) else ["--fmad=false"]
    extra = md.ptx_options.split(" ") if getattr(md, "ptx_options", None) else []
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = Path(tmp) / "k.ptx", Path(tmp) / "k.cubin"
        ptx.write_text(compiled.asm["ptx"])
        cmd = [ptxas_path(capability), *debug, *fmad, "-v", "--regAllocOptLevel=2", *extra,
               f"--gpu-name={sm_arch_from_capability(capability)}", str(ptx), "-o", str(cubin)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"ptxas failed: {proc.stderr[-2000:]}")
        usage = next(iter(parse_ptxas_log(proc.stderr + proc.stdout).values()))
        usage["same_cubin"] = cubin.read_bytes() == compiled.asm["cubin"]
    return usage


# ------------------------------------------------------------------ SASS
SASS_FUNCTION = re.compile(r"^\s*Function : (\S+)", re.M)
SASS_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+([^;]*?)\s*;")
BRANCH = re.compile(r"^(?:@!?U?P\w+\s+)?(?:BRA|JMP)\b[^;]*?0x([0-9a-f]+)\s*$")
MMA = re.compile(r"\b((?:U?TC)?[HIDQ]G?MMA(?:\.SP)?(?:\.[\w]+)*)")
GLOBAL_LOAD = re.compile(r"\b((?:LDGSTS|LDG|UTMALDG|UBLKCP)(?:\.\w+)*)(?=\s)")   # not LDGDEPBAR
SHARED_ACCESS = re.compile(r"\b(?:LDS|STS|LDSM|STSM|LDGSTS|ATOMS|UTMALDG)\b")
WIDTH_BITS = {"U8": 8, "S8": 8, "U16": 16, "S16": 16, "64": 64, "128": 128, "256": 256}


def cuobjdump(cubin: bytes, *flags: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        proc = subprocess.run([triton_tool("cuobjdump"), *flags, str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"cuobjdump {' '.join(flags)} failed: {proc.stderr[-2000:]}")
    return proc.stdout


def split_functions(sass: str) -> dict:
    """cuobjdump -sass text -> {function name: [(address, instruction text)]}."""
    parts = SASS_FUNCTION.split(sass)
    return {parts[i]: [(int(a, 16), ins) for a, ins in SASS_INSTR.findall(parts[i + 1])]
            for i in range(1, len(parts), 2)}


def find_loops(instrs):
    """Loops = back edges: a BRA/JMP at address b to an address t <= b. Body = [t, b], in SASS
    instructions (16 bytes each). Back edges to one target are one loop (latest latch). Returns the
    loop nest in program order: [(start, end, size, children)]; the 1-instruction self-loop after EXIT
    is not a loop."""
    ends = {}
    for addr, ins in instrs:
        m = BRANCH.match(ins)
        if m and int(m.group(1), 16) < addr:
            target = int(m.group(1), 16)
            ends[target] = max(ends.get(target, addr), addr)
    loops = sorted(((s, e) for s, e in ends.items()), key=lambda se: (se[0], -se[1]))
    roots, stack = [], []
    for s, e in loops:
        node = (s, e, (e - s) // 16 + 1, [])
        while stack and not (stack[-1][0] <= s and e <= stack[-1][1]):
            stack.pop()
        (stack[-1][3] if stack else roots).append(node)
        stack.append(node)
    return roots


def format_loops(nest, sep=" ") -> str:
    """size[inner, ...] per loop: e.g. '652[80] 1195[798[80]]'."""
    return sep.join(f"{size}" + (f"[{format_loops(kids, ', ')}]" if kids else "")
                    for _, _, size, kids in nest) or "none"


def load_width(opcode: str) -> int:
    if opcode.startswith(("UTMALDG", "UBLKCP")):
        return 1 << 20                      # TMA / bulk copy: a whole tile per instruction
    return max([WIDTH_BITS.get(p, 0) for p in opcode.split(".")[1:]] + [32])


def sass_stats(instrs) -> dict:
    """MMA instructions, widest global load, loop nest of one function's SASS."""
    text = [ins for _, ins in instrs]
    mma = Counter(m.group(1) for ins in text if (m := MMA.search(ins)))
    loads = Counter(m.group(1) for ins in text if (m := GLOBAL_LOAD.search(ins)))
    widest = max(loads, key=lambda op: (load_width(op), loads[op]), default=None)
    return {"instructions": len(instrs),
            "mma": " + ".join(f"{op} ×{n}" for op, n in mma.most_common(2)) or "none",
            "widest_load": f"{widest} ({loads[widest]}/{sum(loads.values())})" if widest else "none",
            "widest_load_op": widest, "loops": format_loops(find_loops(instrs))}


def max_threads(elf: str) -> dict:
    """{function: threads per block} from EIATTR_MAX_THREADS (__launch_bounds__) in cuobjdump -elf."""
    out, name = {}, None
    for line in elf.splitlines():
        if line.startswith(".nv.info."):
            name = line.split()[0][len(".nv.info."):]
        elif name and line.strip().startswith("Value:") and out.get(name) == "next":
            out[name] = math.prod(int(v, 16) for v in line.split()[1:4])
        elif name and "EIATTR_MAX_THREADS" in line:
            out[name] = "next"
    return {k: v for k, v in out.items() if v != "next"}


def demangle(names):
    filt = shutil.which("c++filt")
    if not filt or not names:
        return {n: n for n in names}
    out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    # 'void ns::(anonymous namespace)::kernel<T>(ns::Params)' -> 'kernel<T>'
    short = [(re.findall(r"(\w+(?:<[^<>]*>)?)\(", d) or [d])[0] for d in out]
    return dict(zip(names, short))


# ------------------------------------------------------------------ loading and launching kernels
def kernels_dir(root: Path) -> Path:
    """The Triton kernels folder of a checkout: mcncl_fast/kernels, or mcncl_fast/kernels/ in older checkouts."""
    for sub in ("mcncl_fast/kernels", "kernels"):
        if (Path(root).resolve() / sub / "__init__.py").exists():
            return Path(root).resolve() / sub
    raise FileNotFoundError(f"no Triton kernels package under {root} (mcncl_fast/kernels/ or mcncl_fast/kernels/)")


def load_kernels(root: Path):
    """Import the checkout's kernels package under a name unique to root (any checkout, by path)."""
    init = kernels_dir(root) / "__init__.py"
    name = "static_kernels_" + hashlib.sha1(str(init).encode()).hexdigest()[:10]
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(init.parent)])
        package = importlib.util.module_from_spec(spec)
        sys.modules[name] = package
        spec.loader.exec_module(package)
        for sub in KERNEL_MODULES:
            if (init.parent / f"{sub}.py").exists():
                importlib.import_module(f"{name}.{sub}")
    return sys.modules[name]


@dataclass
class Launch:
    kernel: object        # the launched object (Autotuner / Heuristics / JITFunction)
    args: tuple
    kwargs: dict
    grid: object


class record_launches:
    """Context manager: every Triton kernel object of the package records its launches, runs nothing."""

    def __init__(self, package):
        from triton.runtime.jit import KernelInterface
        self.objects = {id(v): v for mod in list(sys.modules.values()) if mod is not None
                        and mod.__name__.startswith(package.__name__ + ".")
                        for v in vars(mod).values() if isinstance(v, KernelInterface)}
        self.launches = []

    def __enter__(self):
        self.added = []
        for obj in self.objects.values():
            obj.run = (lambda o: lambda *a, grid, warmup, **kw: self.launches.append(Launch(o, a, kw, grid)))(obj)
            if hasattr(obj, "configs") and not hasattr(obj, "best_config"):   # launchers may read it
                obj.best_config = obj.configs[0]
                self.added.append(obj)
        return self.launches

    def __exit__(self, *exc):
        for obj in self.objects.values():
            del obj.run
        for obj in self.added:
            del obj.best_config


def call_by_name(fn, values: dict):
    """fn(**{p: values[p]}) for each of fn's parameters found in values (the others keep defaults)."""
    import inspect
    params = inspect.signature(fn).parameters
    missing = [p for p, v in params.items() if v.default is inspect.Parameter.empty and p not in values
               and v.kind not in (v.VAR_POSITIONAL, v.VAR_KEYWORD)]
    if missing:
        raise TypeError(f"{fn.__name__}: no benchmark value for parameter(s) {missing}")
    return fn(**{p: values[p] for p in params if p in values})


@dataclass
class Variant:
    """One compile of a launch: a pruned autotune config with Triton's launch specialisation."""
    jit: object
    label: str            # config as text
    signature: dict
    constexprs: dict
    attrs: dict
    options: object
    grid: int


def expand(launch: Launch, target) -> list:
    """The variants an autotuned launch compiles (pruned configs x heuristics), each specialised by
    Triton's own launch binder for `target` (a GPUTarget). The recorded tensors live on the CPU; their
    allocations are 64-byte aligned, so pointer divisibility comes out as for CUDA allocations."""
    from triton.compiler import make_backend
    from triton.runtime.autotuner import Autotuner, Heuristics
    from triton.runtime.jit import JITFunction, create_function_from_signature
    chain, obj = [], launch.kernel
    while not isinstance(obj, JITFunction):
        chain.append(obj)
        obj = obj.fn
    jit, backend = obj, make_backend(target)
    configs = [None]
    if chain and isinstance(chain[0], Autotuner):
        tuner = chain[0]
        tuner.nargs = dict(zip(tuner.arg_names, launch.args))
        try:
            configs = tuner.prune_configs(launch.kwargs) if len(tuner.configs) > 1 else tuner.configs[:1]
        finally:
            tuner.nargs = None
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    variants = []
    for config in configs:
        kw = dict(launch.kwargs, **(config.all_kwargs() if config else {}))
        derived = dict(config.kwargs) if config else {}
        for layer in chain:
            if isinstance(layer, Heuristics):
                for name, rule in layer.values.items():
                    kw[name] = derived[name] = rule({**dict(zip(layer.arg_names, launch.args)), **kw})
        bound, spec, opts = binder(*launch.args, **kw)
        options, signature, constexprs, attrs = jit._pack_args(backend, kw, bound, spec, opts)
        grid = launch.grid(bound) if callable(launch.grid) else launch.grid
        label = " ".join([f"{k}={v}" for k, v in derived.items()] + [f"w{options.num_warps}", f"s{options.num_stages}"])
        variants.append(Variant(jit, label, signature, constexprs, attrs, options, math.prod(grid)))
    return variants


def compile_variant(variant: Variant, target):
    import triton
    from triton.compiler import ASTSource
    src = ASTSource(variant.jit, variant.signature, variant.constexprs, variant.attrs)
    return triton.compile(src, target=target, options=variant.options.__dict__)


def analyse_triton(variant: Variant, capability: int) -> dict:
    """Compile for sm_<capability> and collect every column of the report."""
    from triton.backends.compiler import GPUTarget
    compiled = compile_variant(variant, GPUTarget("cuda", capability, 32))
    usage = ptxas_usage(compiled, capability)
    [instrs] = split_functions(cuobjdump(compiled.asm["cubin"], "-sass")).values()
    threads = compiled.metadata.num_warps * 32
    ctas, limit = occupancy(ARCHS[capability], usage["regs"], threads, compiled.metadata.shared)
    divisible = sorted(variant.jit.arg_names[k[0]] for k, v in variant.attrs.items() if v)
    return dict(usage, smem=compiled.metadata.shared, threads=threads, ctas=ctas, limit=limit,
                grid=variant.grid, divisible=divisible, **sass_stats(instrs))


def analyse_cuda(source: Path, include: Path, capability: int, nvcc: str) -> list:
    """nvcc -cubin -Xptxas=-v of a .cu file: one row per kernel (static shared memory, block size from
    __launch_bounds__)."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cmd = [nvcc, "-cubin", "-O3", "-std=c++17", "-I", str(include), "-DMCNCL_WITH_CUDA=1", "-Xptxas=-v",
               f"-gencode=arch=compute_{capability},code=sm_{capability}", str(source), "-o", str(cubin)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(f"nvcc failed: {proc.stderr[-3000:]}")
        binary = cubin.read_bytes()
    usage = parse_ptxas_log(proc.stderr + proc.stdout)
    functions = split_functions(cuobjdump(binary, "-sass"))
    threads = max_threads(cuobjdump(binary, "-elf"))
    names = demangle(list(functions))
    rows = []
    for name, instrs in functions.items():
        u, block = usage.get(name, {}), threads.get(name)
        ctas, limit = occupancy(ARCHS[capability], u["regs"], block, u["smem"]) if block and u else (None, "")
        # static shared memory only: a kernel that touches shared memory with none declared uses the
        # dynamic shared memory its launch sets (not in the binary; occupancy then ignores it)
        dynamic = u.get("smem") == 0 and any(SHARED_ACCESS.search(ins) for _, ins in instrs)
        rows.append(dict(u, kernel=names[name], threads=block, ctas=ctas, limit=limit, same_cubin=True,
                         dynamic_smem=dynamic, **sass_stats(instrs)))
    return rows
