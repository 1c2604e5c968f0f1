"""benchmarks/static_report.py: the compiled-code report parses what the compilers produce.

The report runs in a subprocess without TRITON_INTERPRET (real compiles; tests/aot.py explains why);
the parsers and the selection-pass simulation are checked in process on small inputs.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks import static_analysis as sa
from benchmarks import supcon_passes

ROOT = Path(__file__).resolve().parents[1]
NVCC = os.environ.get("CUDACXX") or shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"


def run_report(tmp_path, *args):
    out = tmp_path / "rows.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "static_report.py"), *args, "--json", str(out)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())["90"], proc.stdout


def test_report_of_one_triton_kernel(tmp_path):
    rows, text = run_report(tmp_path, "--kernels", "attention", "--only", "attn_fwd", "--dtypes", "bfloat16")
    assert len(rows) >= 2 and all(r["kernel"] == "attn_fwd" and "error" not in r for r in rows)
    for r in rows:
        assert isinstance(r["regs"], int) and 0 < r["regs"] <= 255
        assert isinstance(r["spill_stores"], int) and isinstance(r["spill_loads"], int)
        assert r["same_cubin"], "ptxas flags differ from Triton's"
        assert isinstance(r["ctas"], int) and r["ctas"] >= 1 and set(r["limit"].split(",")) <= set("TRSC")
        assert r["widest_load_op"].startswith(("LDG", "UTMALDG")) and r["widest_load_op"] != "LDGDEPBAR"
        assert r["loops"] != "none" and r["grid"] == 3 * 16 * 8 * (-(-24 // int(r["config"].split()[0][8:])))
        # a launch's specialisation: pointers and multiples of 16 (LQ_KEY = 32), not H = 8 or LQ = 24
        assert {"Q", "K", "LQ_KEY"} <= set(r["divisible"]) and not {"H", "LQ"} & set(r["divisible"])
    # 64-row tiles on sm_90 use wgmma, 16-row ones mma.sync
    by_m = {r["config"].split()[0]: r["mma"] for r in rows}
    assert by_m["BLOCK_M=64"].startswith("HGMMA") and by_m["BLOCK_M=16"].startswith("HMMA.16816")
    assert "| `attn_fwd` | attention fwd | bfloat16 |" in text


CUDA_KERNEL = r"""
__global__ void __launch_bounds__(128) scale(const float4* __restrict__ x, float4* y, int n, float a) {
  __shared__ float4 tile[128];
  for (int i = blockIdx.x * 128 + threadIdx.x; i < n; i += gridDim.x * 128) {
    tile[threadIdx.x] = x[i];
    __syncthreads();
    float4 v = tile[127 - threadIdx.x];
    y[i] = make_float4(v.x * a, v.y * a, v.z * a, v.w * a);
    __syncthreads();
  }
}
"""


@pytest.mark.skipif(not Path(NVCC).exists(), reason="no nvcc")
def test_cuda_kernel_columns(tmp_path):
    source = tmp_path / "scale.cu"
    source.write_text(CUDA_KERNEL)
    [row] = sa.analyse_cuda(source, tmp_path, 90, NVCC)
    assert row["kernel"] == "scale" and row["threads"] == 128 and row["smem"] == 128 * 16
    assert isinstance(row["regs"], int) and row["spill_stores"] == 0 and not row["dynamic_smem"]
    assert row["widest_load_op"].startswith("LDG.E.128") and row["loops"] != "none" and row["mma"] == "none"
    assert row["ctas"] == 16 and row["limit"] == "T"


SASS = """
        Function : k
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0020*/                   LDG.E.U16 R8, desc[UR4][R2.64] ;
        /*0030*/                   LDGSTS.E.BYPASS.LTC128B.128 [R3], desc[UR4][R2.64] ;
        /*0040*/                   LDGDEPBAR ;
        /*0050*/                   HGMMA.64x32x16.F32.BF16 R24, gdesc[UR4], RZ ;
        /*0060*/              @!P0 BRA 0x40 ;
        /*0070*/                   IADD3 R1, R1, 0x1, RZ ;
        /*0080*/               @P1 BRA 0x30 ;
        /*0090*/                   NOP ;
        /*00a0*/                   BRA 0x10 ;
        /*00b0*/                   EXIT ;
        /*00c0*/                   BRA 0xc0;
"""


def test_sass_parsing():
    [(name, instrs)] = sa.split_functions(SASS).items()
    assert name == "k" and len(instrs) == 13
    stats = sa.sass_stats(instrs)
    assert stats["loops"] == "10[6[3]]"            # 0x10-0xa0 around 0x30-0x80 around 0x40-0x60
    assert stats["mma"] == "HGMMA.64x32x16.F32.BF16 ×1"
    assert stats["widest_load_op"] == "LDG.E.128" and stats["widest_load"].endswith("(1/3)")


def test_ptxas_log_and_occupancy():
    log = """ptxas info    : Compiling entry function 'kern' for 'sm_90a'
ptxas info    : Function properties for kern
    8 bytes stack frame, 12 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 168 registers, used 1 barriers, 4096 bytes smem"""
    assert sa.parse_ptxas_log(log) == {"kern": {"regs": 168, "spill_stores": 12, "spill_loads": 4, "stack": 8,
                                                "smem": 4096}}
    h100 = sa.ARCHS[90]
    assert sa.occupancy(h100, 168, 256, 0) == (1, "R")        # 168 x 256 > 65536 / 2
    assert sa.occupancy(h100, 32, 128, 0) == (16, "T,R")
    assert sa.occupancy(h100, 32, 128, 100 * 1024) == (2, "S")


def test_selection_simulation_ends_at_the_threshold():
    z, labels = supcon_passes.embeddings(1500, d=32, seed=1)
    k, _ = supcon_passes.hard_counts(labels, 0.3)
    rows = np.arange(64)
    neg = labels[rows, None] != labels[None, :]
    passes, lo = supcon_passes.program_passes(z[rows] @ z.T, neg, k[rows])
    key = supcon_passes.keys(z[rows] @ z.T).astype(np.int64)
    assert 1 <= passes <= supcon_passes.MAX_HIST_PASSES
    for i in rows:
        negatives = np.sort(key[i][neg[i]])[::-1]
        at_or_above = (negatives >= lo[i]).sum()
        assert at_or_above == k[i] or lo[i] == negatives[k[i] - 1]
