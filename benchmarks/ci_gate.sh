#!/usr/bin/env bash
# The latency regression gate CI runs: ONNX Runtime CPU, fused RepVGG-A0 at 64x64, batch 4, against
# the committed baseline, normalised by the reference workload timed in the same run.
# The threshold comes from the measured noise of this check (benchmarks/results/gate_noise.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RVDEPLOY=${RVDEPLOY:-.venv/bin/rvdeploy}
MAX_REGRESSION=${MAX_REGRESSION:-20}
mkdir -p build/gate
[ -f build/gate/a0.onnx ] || "$PY" benchmarks/gate_model.py build/gate/a0.onnx
"$RVDEPLOY" bench build/gate/a0.onnx --backend ort --batch 4 --threads 2 --warmup-s 2 --min-s 8 --iters 50 \
    --normalize always --baseline benchmarks/baselines/ci_cpu_a0.json --max-regression "$MAX_REGRESSION" \
    --json build/gate/latest.json "$@"
