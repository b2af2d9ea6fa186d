"""Top-1 of the shipped model through every precision, on its held-out split.

FP32 (torch multi-branch, torch fused, ONNX Runtime), FP16, INT8 in both layouts (default
calibration on calib/digits). Run:
    .venv/bin/python benchmarks/accuracy.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from rvdeploy.checkpoint import load_train_weights, save_deploy_weights
from rvdeploy.data import labelled_folder
from rvdeploy.eval import evaluate
from rvdeploy.export import ExportOptions, export_onnx
from rvdeploy.precision.fp16_file import Fp16Options, quantize_fp16
from rvdeploy.precision.quantize import Int8Options, quantize_int8_file
from rvdeploy.reparam import fuse
from rvdeploy.runners import open_runner

from results_io import write_results

ROOT = Path(__file__).resolve().parents[1]
CKPT = ROOT / "models/digits/repvgg_digits_train.pth"


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        deploy, _ = fuse(load_train_weights(CKPT))
        save_deploy_weights(deploy, tmp / "fused.pth")
        fp32 = export_onnx(deploy, tmp / "fp32.onnx", ExportOptions())
        quantize_fp16(fp32, tmp / "fp16.onnx", Fp16Options(calib_dir=ROOT / "calib/digits"))
        for target in ("tensorrt", "onnxruntime"):
            quantize_int8_file(fp32, tmp / f"int8-{target}.onnx",
                               Int8Options(ROOT / "calib/digits", target=target, show_progress=False))
        rows = []
        for label, path in (("torch multi-branch", CKPT), ("torch fused", tmp / "fused.pth"), ("ONNX FP32", fp32),
                            ("ONNX FP16", tmp / "fp16.onnx"), ("ONNX INT8 (tensorrt layout)", tmp / "int8-tensorrt.onnx"),
                            ("ONNX INT8 (onnxruntime layout)", tmp / "int8-onnxruntime.onnx")):
            with open_runner(path) as runner:
                result = evaluate(runner, labelled_folder(ROOT / "models/digits/heldout", runner.preprocess))
            rows.append({"model": label, **result.to_dict()})
            rows[-1]["drop"] = rows[0]["top1"] - result.top1
            print(label, result.top1)
    columns = [("model", "model"), ("backend", "backend"), ("precision", "precision"), ("images", "images"),
               ("top1", "top-1 %"), ("drop", "drop vs FP32 (points)"), ("top5", "top-5 %")]
    print(write_results("accuracy_digits", rows, columns,
                        "Held-out split of the shipped digits model (models/digits). Goals: FP16 within 0.1 point, "
                        "INT8 within 0.5 point of FP32. INT8: minmax calibration on the 256 images of calib/digits."))


if __name__ == "__main__":
    main()
