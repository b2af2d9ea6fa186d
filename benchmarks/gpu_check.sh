#!/usr/bin/env bash
# On any machine with a CUDA GPU: the gpu-marked tests (torch on CUDA, engines vs. ONNX Runtime, INT8 accuracy,
# profile bounds) and a short bench of torch on CUDA and of the shipped model's engines.
# Engines need the TensorRT runtime that built them (make install EXTRAS=gpu,dev TORCH=torch).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RVDEPLOY=${RVDEPLOY:-.venv/bin/rvdeploy}
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: no CUDA GPU here')"
"$PY" -m pytest -q -m gpu -rs tests/
mkdir -p build/gpu
CKPT=models/digits/repvgg_digits_train.pth
"$RVDEPLOY" export "$CKPT" --onnx build/gpu/digits.onnx
targets=("$CKPT")
for precision in fp32 fp16 int8; do
    flag=$([ "$precision" = fp32 ] && echo "" || echo "--$precision")
    if "$RVDEPLOY" build-engine build/gpu/digits.onnx $flag --calib calib/digits -o "build/gpu/digits_$precision.engine"; then
        targets+=("build/gpu/digits_$precision.engine")
    fi
done
"$RVDEPLOY" bench "${targets[@]}" --device cuda --batch 1,32 --warmup-s 1 --min-s 2 \
    --json build/gpu/bench.json --plot build/gpu/bench.png
