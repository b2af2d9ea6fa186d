"""The CI gate's model: RepVGG-A0 (synthetic trained-looking weights, seed 0), fused, exported at 64x64.

The same bytes on every machine, so the gate measures the toolchain and the machine, nothing else.
Run: .venv/bin/python benchmarks/gate_model.py OUT.onnx
"""

from __future__ import annotations

import sys

from rvdeploy.arch import zoo_spec
from rvdeploy.export import ExportOptions, export_onnx
from rvdeploy.reparam import fuse
from rvdeploy.synthetic import trained_like_state_dict
from rvdeploy.weights import TrainWeights

GATE_INPUT = (64, 64)


def main() -> None:
    spec = zoo_spec("RepVGG-A0")
    deploy, _ = fuse(TrainWeights(spec, trained_like_state_dict(spec, seed=0)))
    export_onnx(deploy, sys.argv[1], ExportOptions(input_size=GATE_INPUT))


if __name__ == "__main__":
    main()
