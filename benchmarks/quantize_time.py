"""INT8 quantize time against ONNX Runtime's own `quantize_static`, measured in one run on the same
graph and images (issue 16's goal: rvdeploy's default ≤ 3x quantize_static's calibration and
quantization alone).

quantize_static: MinMax calibration, QDQ format, per-channel int8 weights, int8 activations, fed by
rvdeploy's own image pipeline (so both read the same pixels). rvdeploy: `rvdeploy quantize --int8`
as a whole process, at its defaults and with its costlier steps turned off one by one. Each row also
gives the held-out output SQNR against FP32 (images not among the calibration ones).

The graph is ultralytics' YOLOv10n (random weights, BN statistics fitted to the images, exported
unfolded by the TorchScript exporter and folded by `rvdeploy fuse`) where ultralytics imports, else
the synthetic RepVGG-A0. Run (ultralytics lives in .venv-timm):
    .venv-timm/bin/python benchmarks/quantize_time.py [--size 320] [--images 32]
"""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from rvdeploy.compare import sqnr_db
from rvdeploy.data import batches, image_folder
from rvdeploy.machine import describe_machine
from rvdeploy.onnx_io import ort_session, read_metadata
from rvdeploy.preprocess import Preprocess

from int8_cpu import write_crops
from results_io import write_results

RVDEPLOY = str(Path(sys.executable).with_name("rvdeploy"))
HELD_OUT = 16
VARIANTS = {  # rvdeploy's extra flags per row
    "rvdeploy default": (),
    "rvdeploy --rounding nearest": ("--rounding", "nearest"),
    "rvdeploy --rounding nearest --min-sqnr 0": ("--rounding", "nearest", "--min-sqnr", "0"),
    "rvdeploy --rounding nearest --min-sqnr 0 --no-bias-correction --no-equalize":
        ("--rounding", "nearest", "--min-sqnr", "0", "--no-bias-correction", "--no-equalize"),
}


def yolov10n(tmp: Path, size: int, calib: Path) -> Path:
    """YOLOv10n, unfolded export, BN fitted to the calibration images (as tests/test_real_graphs.py
    builds it), folded by rvdeploy."""
    importlib.import_module("ultralytics")  # ImportError here: no ultralytics, RepVGG-A0 instead

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_real_graphs import export_fitted

    recipe = Preprocess((size, size), size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    pixels = np.concatenate([x for x, _ in batches(image_folder(calib, recipe, 16), recipe, 16)])
    unfolded, folded = tmp / "yolov10n_unfolded.onnx", tmp / "yolov10n.onnx"
    export_fitted("yolov10n", pixels, unfolded)
    subprocess.run([RVDEPLOY, "fuse", str(unfolded), "-o", str(folded)], check=True, capture_output=True)
    return folded


def repvgg_a0(tmp: Path, size: int) -> Path:
    from rvdeploy.arch import zoo_spec
    from rvdeploy.export import ExportOptions, export_onnx
    from rvdeploy.reparam import fuse
    from rvdeploy.synthetic import trained_like_state_dict
    from rvdeploy.weights import TrainWeights

    spec = zoo_spec("RepVGG-A0")
    deploy, _ = fuse(TrainWeights(spec, trained_like_state_dict(spec, inputs="image")))
    return export_onnx(deploy, tmp / "a0.onnx", ExportOptions(input_size=(size, size)))


def quantize_static_seconds(fp32: Path, out: Path, calib: Path, recipe: Preprocess, images: int) -> float:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    name = onnx.load(str(fp32), load_external_data=False).graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = (x for x, _ in batches(image_folder(calib, recipe, images), recipe, 1))

        def get_next(self):
            x = next(self.batches, None)
            return None if x is None else {name: x}

    start = time.perf_counter()
    quantize_static(str(fp32), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    return time.perf_counter() - start


def held_out_sqnr(fp32: Path, int8: Path, held: list[np.ndarray]) -> float:
    def run(path: Path) -> np.ndarray:
        session = ort_session(path)
        name = session.get_inputs()[0].name
        return np.concatenate([session.run(None, {name: x})[0] for x in held])

    return sqnr_db(run(int8), run(fp32))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3, help="rounds, each tool once a round in turn; medians reported")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        calib, held_dir = tmp / "calib", tmp / "held"
        calib.mkdir()
        held_dir.mkdir()
        write_crops(calib, args.images + HELD_OUT, size=int(args.size * 1.2))
        for path in sorted(calib.iterdir())[args.images:]:
            path.rename(held_dir / path.name)
        try:
            fp32, name = yolov10n(tmp, args.size, calib), f"YOLOv10n {args.size} px"
            recipe = Preprocess((args.size, args.size), args.size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
            flags = ("--mean", "0,0,0", "--std", "1,1,1", "--input-size", str(args.size), "--resize", str(args.size))
        except ImportError:
            print("ultralytics does not import here: RepVGG-A0 instead (run in .venv-timm for YOLOv10n)", file=sys.stderr)
            fp32, name, flags = repvgg_a0(tmp, args.size), f"RepVGG-A0 {args.size} px", ()
            recipe = Preprocess.from_dict(read_metadata(onnx.load(str(fp32)))["preprocess"])
        held = [x for x, _ in batches(image_folder(held_dir, recipe), recipe, 8)]
        rounds: dict[str, list[float]] = {}
        scores: dict[str, float] = {}
        static_label = "onnxruntime quantize_static (MinMax, QDQ, per-channel)"
        for _ in range(args.repeat):  # interleaved: a slower spell of the machine lands on every tool
            out = tmp / "static.onnx"
            rounds.setdefault(static_label, []).append(quantize_static_seconds(fp32, out, calib, recipe, args.images))
            scores[static_label] = held_out_sqnr(fp32, out, held)
            for label, extra in VARIANTS.items():
                out = tmp / "rvdeploy.onnx"
                start = time.perf_counter()
                subprocess.run([RVDEPLOY, "quantize", str(fp32), "-o", str(out), "--int8", "--calib", str(calib),
                                "--num-images", str(args.images), *flags, *extra], check=True, capture_output=True)
                rounds.setdefault(label, []).append(time.perf_counter() - start)
                scores[label] = held_out_sqnr(fp32, out, held)
            print({label: [round(t, 2) for t in times] for label, times in rounds.items()}, flush=True)
        static = float(np.median(rounds[static_label]))
        for label, times in rounds.items():
            seconds = float(np.median(times))
            rows.append({"model": name, "tool": label, "seconds": seconds, "x_static": seconds / static,
                         "spread": f"{min(times):.2f}-{max(times):.2f}", "sqnr_db": scores[label]})
    machine = describe_machine()
    columns = [("model", "model"), ("tool", "tool"), ("seconds", "median seconds"), ("spread", "fastest-slowest"),
               ("x_static", "x quantize_static"), ("sqnr_db", "held-out SQNR dB")]
    notes = (f"{args.images} calibration images (crops of scikit-learn's sample photos), {HELD_OUT} other crops held "
             "out; tensorrt layout for rvdeploy. quantize_static's seconds are its calibration and quantization in "
             "this process; rvdeploy's are whole `rvdeploy quantize` processes (imports, equalization choice, "
             "rounding, bias correction, the 20 dB floor's search; with the floor on, a quarter of the images are held out "
             f"to judge it, the rest fitted on). Medians of {args.repeat} rounds, each tool once a round in turn, in one run on "
             f"{machine.get('cpu', 'this CPU')}; the seconds compare only within this run.")
    print(write_results("quantize_time", rows, columns, notes))


if __name__ == "__main__":
    main()
