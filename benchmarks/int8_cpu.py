"""INT8 on the CPU: calibration time, and ONNX Runtime speed of INT8 vs. FP32, for RepVGG-A0 at 224.

Calibration images: 512 random 256x256 crops (with flips) of the two photographs scikit-learn ships
(`sklearn.datasets.load_sample_images`), real images at ImageNet scale. Weights are synthetic but
trained-looking (speed and calibration time do not depend on what the weights learned). Run:
    .venv/bin/python benchmarks/int8_cpu.py [--images 512] [--batch 8] [--seconds 10]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image
from sklearn.datasets import load_sample_images

from rvdeploy.arch import zoo_spec
from rvdeploy.export import ExportOptions, export_onnx
from rvdeploy.onnx_io import ort_session
from rvdeploy.precision.quantize import Int8Options, quantize_int8_file
from rvdeploy.timing import measure
from rvdeploy.reparam import fuse
from rvdeploy.synthetic import trained_like_state_dict
from rvdeploy.weights import TrainWeights

from results_io import write_results


def write_crops(folder: Path, count: int, size: int = 256) -> None:
    rng = np.random.default_rng(0)
    photos = load_sample_images().images
    for i in range(count):
        photo = photos[i % len(photos)]
        top, left = rng.integers(0, photo.shape[0] - size), rng.integers(0, photo.shape[1] - size)
        crop = photo[top:top + size, left:left + size]
        Image.fromarray(crop[:, ::-1] if rng.random() < 0.5 else crop).save(folder / f"{i:04d}.jpg", quality=92)


def latency(path: Path, batch: int, seconds: float):
    session = ort_session(path)
    feed = {"input": np.random.default_rng(1).standard_normal((batch, 3, 224, 224), dtype=np.float32)}
    return measure(lambda: session.run(None, feed), batch, warmup_s=2.0, min_s=seconds, min_iters=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    spec = zoo_spec("RepVGG-A0")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "calib").mkdir()
        write_crops(tmp / "calib", args.images)
        deploy, _ = fuse(TrainWeights(spec, trained_like_state_dict(spec)))
        fp32 = export_onnx(deploy, tmp / "fp32.onnx", ExportOptions(input_size=(224, 224)))
        graphs = {"fp32": fp32}
        for target, method in (("onnxruntime", "minmax"), ("tensorrt", "minmax"), ("tensorrt", "entropy"), ("tensorrt", "percentile")):
            out = tmp / f"int8-{target}-{method}.onnx"
            start = time.perf_counter()
            report = quantize_int8_file(fp32, out, Int8Options(tmp / "calib", target=target, method=method, show_progress=False))
            total = time.perf_counter() - start
            rows.append({"what": f"calibrate + quantize ({target}, {method})", "images": report.calibration_images,
                         "seconds": total, "calibration_seconds": report.calibration_seconds})
            print(rows[-1])
            graphs.setdefault(f"int8-{target}", out)
        speeds = {}
        for name, path in graphs.items():
            speeds[name] = latency(path, args.batch, args.seconds)
            print(name, speeds[name])
        for name, stats in speeds.items():
            rows.append({"what": f"ONNX Runtime {name}, batch {args.batch}", "p50_ms": stats.p50, "mean_ms": stats.mean,
                         "throughput_ips": stats.throughput_ips,
                         "vs_fp32": stats.throughput_ips / speeds["fp32"].throughput_ips})
    columns = [("what", "measurement"), ("images", "images"), ("seconds", "wall s"), ("calibration_seconds", "calibration s"),
               ("p50_ms", "p50 ms"), ("mean_ms", "mean ms"), ("throughput_ips", "img/s"), ("vs_fp32", "× FP32")]
    print(write_results("int8_cpu_RepVGG-A0", rows, columns,
                        f"RepVGG-A0, 224x224, ONNX Runtime {ort.__version__} CPUExecutionProvider (default threads). "
                        "int8-onnxruntime: uint8 activations / int8 per-channel weights; int8-tensorrt: the TensorRT "
                        "layout (symmetric int8, Q/DQ on Conv inputs only), which ONNX Runtime runs but was not made for."))


if __name__ == "__main__":
    main()
