"""Which calibration method quantizes best: top-1 and logit error against FP32, per INT8 target.

On the shipped model and its held-out split (real data). The method with the smallest logit error at
the best top-1 is the default of `rvdeploy quantize --int8`. Run:
    .venv/bin/python benchmarks/int8_methods.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from rvdeploy.checkpoint import load_train_weights
from rvdeploy.data import labelled_folder
from rvdeploy.eval import predictions
from rvdeploy.export import ExportOptions, export_onnx
from rvdeploy.precision.quantize import Int8Options, quantize_int8_file
from rvdeploy.reparam import fuse
from rvdeploy.runners import OrtRunner

from results_io import write_results

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export_onnx(fuse(load_train_weights(ROOT / "models/digits/repvgg_digits_train.pth"))[0],
                           Path(tmp) / "fp32.onnx", ExportOptions())
        with OrtRunner(fp32) as runner:
            images = labelled_folder(ROOT / "models/digits/heldout", runner.preprocess)
            reference, kept = predictions(runner, images, runner.preprocess)
        labels = np.asarray([images.labels[i] for i in kept])
        fp32_top1 = float((reference.argmax(1) == labels).mean() * 100)
        for target in ("tensorrt", "onnxruntime"):
            for method in ("minmax", "entropy", "percentile"):
                out = Path(tmp) / f"{target}-{method}.onnx"
                quantize_int8_file(fp32, out, Int8Options(ROOT / "calib/digits", target=target, method=method, show_progress=False))
                with OrtRunner(out) as runner:
                    logits, _ = predictions(runner, images, runner.preprocess)
                error = np.abs(logits - reference) / np.abs(reference).max()
                rows.append({
                    "target": target, "method": method,
                    "top1": float((logits.argmax(1) == labels).mean() * 100),
                    "top1_drop": fp32_top1 - float((logits.argmax(1) == labels).mean() * 100),
                    "agreement": float((logits.argmax(1) == reference.argmax(1)).mean() * 100),
                    "mean_logit_error": float(error.mean()), "max_logit_error": float(error.max()),
                })
                print(rows[-1])
    columns = [("target", "target"), ("method", "method"), ("top1", "top-1 %"), ("top1_drop", "drop (points)"),
               ("agreement", "argmax = FP32 %"), ("mean_logit_error", "mean logit error"), ("max_logit_error", "max logit error")]
    print(write_results("int8_methods", rows, columns,
                        f"Shipped digits model, held-out split ({len(labels)} images), FP32 top-1 {fp32_top1:.2f}%. "
                        "Logit error: |INT8 - FP32 logits| / max |FP32 logits|. 256 calibration images."))


if __name__ == "__main__":
    main()
