"""CPU peak memory of the fast SupCon loss: N = 16384, D = 128, forward + backward.

The N x N float32 similarity matrix alone would be 1 GiB; the chunked forward + host backward
must add well under 200 MiB of peak RSS. Measured in a fresh subprocess: VmHWM is reset to the
current RSS (/proc/self/clear_refs) after a warm-up call, so the figure is what the call adds.
"""
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import os, sys, time
    import torch
    from mcncl_fast import ops

    def status_kib(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1])

    n, d = int(sys.argv[1]), int(sys.argv[2])
    torch.manual_seed(0)
    z = torch.randn(n, d, requires_grad=True)
    labels = torch.randint(0, 7, (n,))
    warm = torch.randn(64, d, requires_grad=True)          # imports, allocator, thread pools
    ops.supcon_hard_negative_loss(warm, labels[:64]).backward()
    base = status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:          # VmHWM := current RSS
        f.write("5")
    start = time.perf_counter()
    loss = ops.supcon_hard_negative_loss(z, labels)
    forward_s = time.perf_counter() - start
    loss.backward()
    total_s = time.perf_counter() - start
    peak = status_kib("VmHWM")
    finite = bool(torch.isfinite(loss)) and bool(torch.isfinite(z.grad).all())
    print(f"RESULT extra_mib={(peak - base) / 1024:.1f} forward_s={forward_s:.1f} total_s={total_s:.1f} "
          f"finite={finite}")
""")


def run_case(n, d):
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=str(ROOT))
    env.pop("MCNCL_FAST_BACKEND", None)
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(n), str(d)], capture_output=True, text=True,
                         env=env, timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]
    match = re.search(r"RESULT extra_mib=([\d.]+) forward_s=([\d.]+) total_s=([\d.]+) finite=(\w+)", out.stdout)
    assert match, out.stdout + out.stderr
    return float(match.group(1)), float(match.group(2)), float(match.group(3)), match.group(4) == "True"


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_small_case_runs_and_reports():
    extra, _, _, finite = run_case(2048, 64)
    assert finite
    assert extra < 64, f"N=2048: {extra} MiB extra peak RSS"


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_n16384_forward_backward_adds_well_under_200_mib():
    extra, forward_s, total_s, finite = run_case(16384, 128)
    print(f"\nSupCon CPU N=16384 D=128: +{extra} MiB peak RSS, forward {forward_s} s, forward+backward {total_s} s")
    assert finite
    assert extra < 100, f"{extra} MiB extra peak RSS (the N x N float32 matrix would be 1024 MiB)"
