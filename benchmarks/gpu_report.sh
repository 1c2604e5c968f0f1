#!/usr/bin/env bash
# On a GPU machine with no internet: build, run the GPU parity tests and the
# benchmarks, and write a markdown report naming the device under
# benchmarks/results/ (and under $OUT when that variable is set).
#   bash benchmarks/gpu_report.sh [extra pytest args for the benchmarks]
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
python -m pip install --no-build-isolation --no-deps -e . >/tmp/mcncl_build.log 2>&1 \
  || { tail -50 /tmp/mcncl_build.log; exit 1; }
python - <<'PY'
import torch, triton, mcncl_fast._C as C
print(f"torch {torch.__version__}, triton {triton.__version__}, extension CUDA: {C.has_cuda()}, "
      f"device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
PY
device=$(python -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")
stamp=$(date -u +%Y%m%d-%H%M)
results=benchmarks/results
mkdir -p "$results"
json="$results/${stamp}-${device}.json"
report="$results/${stamp}-${device}.md"

set +e
python -m pytest -m gpu -q tests/ 2>&1 | tee /tmp/mcncl_gpu_tests.log
tests_rc=${PIPESTATUS[0]}
python -m pytest benchmarks/ -q --benchmark-json="$json" --benchmark-group-by=group \
  --benchmark-columns=min,mean,stddev,rounds "$@" 2>&1 | tee /tmp/mcncl_bench.log
bench_rc=${PIPESTATUS[0]}
set -e

python - "$json" "$report" "$device" "$tests_rc" <<'PY'
import json, sys
src, dst, device, tests_rc = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
data = json.load(open(src))
lines = [f"# mcncl_fast GPU report: {device.replace('_', ' ')}", "",
         f"GPU parity tests (`pytest -m gpu`): {'passed' if tests_rc == 0 else f'FAILED (rc={tests_rc})'}", "",
         "| group | benchmark | mean (ms) | min (ms) | vs first in group | peak extra mem (MiB) |",
         "|---|---|---|---|---|---|"]
groups = {}
for b in data["benchmarks"]:
    groups.setdefault(b["group"], []).append(b)
for group, items in groups.items():
    base = items[0]["stats"]["mean"]
    for b in items:
        s = b["stats"]
        peak = b["extra_info"].get("peak_mem_mib", "")
        lines.append(f"| {group} | {b['name']} | {s['mean']*1e3:.3f} | {s['min']*1e3:.3f} | "
                     f"{base / s['mean']:.2f}x | {peak} |")
open(dst, "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
if [ -n "${OUT:-}" ]; then cp "$json" "$report" /tmp/mcncl_gpu_tests.log /tmp/mcncl_bench.log "$OUT/"; fi
exit $(( tests_rc != 0 || bench_rc != 0 ))
