#!/usr/bin/env bash
# torch CPU latency of RepVGG-A0 at 224, batch 8: multi-branch vs. fused (rvdeploy bench on a training checkpoint).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p build/bench
.venv/bin/python -c "
import torch
from rvdeploy.arch import zoo_spec
from rvdeploy.synthetic import trained_like_state_dict
torch.save(trained_like_state_dict(zoo_spec('RepVGG-A0')), 'build/bench/a0_train.pth')"
.venv/bin/rvdeploy bench build/bench/a0_train.pth --backend torch --batch 8 --input-size 224 --warmup-s 3 --min-s 15 \
    --json benchmarks/results/torch_fold_speedup_RepVGG-A0.json --markdown
