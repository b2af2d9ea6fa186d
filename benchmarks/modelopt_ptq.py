"""NVIDIA ModelOpt's ONNX PTQ on the same FP32 graphs rvdeploy quantizes: the public anchor for int8_robust.

Runs in a venv of its own (ModelOpt pins onnx and onnxruntime-gpu, which runs on CPU):

    python3 -m venv .venv-modelopt
    .venv-modelopt/bin/pip install torch==2.13.0 && .venv-modelopt/bin/pip install "nvidia-modelopt[onnx]"
    .venv-modelopt/bin/python benchmarks/modelopt_ptq.py build/int8_robust

It reads every ``*.onnx`` FP32 graph in the folder and ``calib.npy`` (the preprocessed calibration
batch benchmarks/int8_robust.py writes there) and writes ``modelopt/<graph>_<method>.onnx`` for the
entropy (ModelOpt's default) and max calibrations. It imports nothing from rvdeploy: int8_robust.py
scores the graphs in the project's own venv.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="Folder with the FP32 graphs and calib.npy")
    parser.add_argument("--methods", default="entropy,max", help="ModelOpt calibration methods")
    args = parser.parse_args()

    from modelopt.onnx.quantization import quantize

    calib = np.load(args.folder / "calib.npy")
    out_dir = args.folder / "modelopt"
    out_dir.mkdir(exist_ok=True)
    timings = {}
    for graph in sorted(args.folder.glob("*.onnx")):
        for method in args.methods.split(","):
            out = out_dir / f"{graph.stem}_{method}.onnx"
            start = time.perf_counter()
            quantize(str(graph), quantize_mode="int8", calibration_data=calib, calibration_method=method,
                     calibration_eps=["cpu"], output_path=str(out), log_level="ERROR")
            timings[out.name] = round(time.perf_counter() - start, 2)
            print(f"{out} ({timings[out.name]} s)")
    import modelopt
    (out_dir / "modelopt.json").write_text(json.dumps({"modelopt_version": modelopt.__version__,
                                                        "calibration_images": int(calib.shape[0]),
                                                        "seconds": timings}, indent=2) + "\n")


if __name__ == "__main__":
    main()
