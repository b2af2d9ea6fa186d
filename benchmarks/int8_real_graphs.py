"""INT8 on real graphs against the public anchors, same graphs and images (issue 16's anchor table):
rvdeploy's default, NVIDIA ModelOpt's ONNX PTQ and Qualcomm AIMET (CLE + AdaRound).

The graphs: timm's MobileOne-S0, RepVGG-A0, FastViT-SA12 and EfficientViT-M0 and ultralytics'
YOLOv10n, random weights with their BN statistics fitted to the calibration crops (one train-mode
pass), exported unfolded by the TorchScript exporter and folded by `rvdeploy fuse`. Calibration:
crops of scikit-learn's sample photos; held out: other crops of the same photos. Each tool's INT8
graph is scored by the held-out SQNR of its first output against the FP32 graph's.

Three steps, each tool in its own venv:

    .venv-timm/bin/python benchmarks/int8_real_graphs.py build build/int8_real   # graphs, images, rvdeploy
    for d in build/int8_real/*/; do
        .venv-modelopt/bin/python benchmarks/modelopt_ptq.py $d --methods entropy,max
        .venv-aimet/bin/python benchmarks/aimet_ptq.py $d --recipes plain,cle,cle_adaround --iterations 200
    done
    .venv/bin/python benchmarks/int8_real_graphs.py score build/int8_real         # the table

``build`` writes, per net, a folder with its folded FP32 graph and ``calib.npy`` / ``heldout.npy``
(the crops as that graph takes them, from rvdeploy's own image pipeline: what the anchors read), and
runs `rvdeploy quantize` on the same crops as files; its INT8 graph and seconds go to ``rvdeploy/``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from rvdeploy.compare import sqnr_db
from rvdeploy.data import batches, image_folder
from rvdeploy.machine import describe_machine
from rvdeploy.onnx_io import ort_session
from rvdeploy.preprocess import Preprocess

from int8_cpu import write_crops
from results_io import write_results

RVDEPLOY = str(Path(sys.executable).with_name("rvdeploy"))
SIZE, CALIB, HELD_OUT = 160, 64, 32
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
SIZED = ("efficientvit_m", "efficientformerv2", "levit", "deit", "vit_")  # timm nets built for one input size
MODELS = {  # name → (framework, mean and std the net takes)
    "mobileone_s0": ("timm", IMAGENET), "repvgg_a0": ("timm", IMAGENET), "fastvit_sa12": ("timm", IMAGENET),
    "efficientvit_m0": ("timm", IMAGENET), "yolov10n": ("ultralytics", ((0.0,) * 3, (1.0,) * 3)),
}


def recipe_of(name: str) -> Preprocess:
    mean, std = MODELS[name][1]
    return Preprocess((SIZE, SIZE), SIZE, mean, std)


def flags_of(name: str) -> tuple[str, ...]:
    mean, std = MODELS[name][1]
    return ("--mean", ",".join(map(str, mean)), "--std", ",".join(map(str, std)), "--input-size", str(SIZE),
            "--resize", str(SIZE))


def pixels(folder: Path, recipe: Preprocess) -> np.ndarray:
    return np.concatenate([x for x, _ in batches(image_folder(folder, recipe), recipe, 32)])


def fitted_net(name: str, calib: np.ndarray, size: int = SIZE):
    """The framework's net (ultralytics' for a ``yolo*`` / ``rtdetr*`` name, else timm's) with random
    weights, BN statistics fitted to ``calib`` (as tests/test_real_graphs.py fits its detectors); a
    detector's first output only. benchmarks/every_stage.py builds its nets with it too."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_real_graphs import FirstOutput, bn_fitted

    torch.manual_seed(0)
    if name.startswith(("yolo", "rtdetr")):
        import ultralytics

        net = FirstOutput((ultralytics.RTDETR if name.startswith("rtdetr") else ultralytics.YOLO)(f"{name}.yaml").model)
    else:
        import timm

        kwargs = {"img_size": size} if name.startswith(SIZED) else {}
        net = timm.create_model(name, pretrained=False, **kwargs)
    return bn_fitted(net, calib)


def build(folder: Path) -> None:
    import torch

    images = folder / "images"
    calib_dir, held_dir = images / "calib", images / "held"
    for path in (calib_dir, held_dir):
        path.mkdir(parents=True, exist_ok=True)
    write_crops(calib_dir, CALIB + HELD_OUT, size=SIZE)
    for path in sorted(calib_dir.iterdir())[CALIB:]:
        path.rename(held_dir / path.name)
    for name in MODELS:
        recipe, net_dir = recipe_of(name), folder / name
        (net_dir / "rvdeploy").mkdir(parents=True, exist_ok=True)
        calib, held = pixels(calib_dir, recipe), pixels(held_dir, recipe)
        np.save(net_dir / "calib.npy", calib)
        np.save(net_dir / "heldout.npy", held)
        unfolded, folded = images / f"{name}_unfolded.onnx", net_dir / f"{name}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(fitted_net(name, calib), torch.from_numpy(calib[:1]), str(unfolded), dynamo=False,
                              opset_version=17, input_names=["input"], output_names=["output"],
                              dynamic_axes={"input": {0: "batch"}})
        subprocess.run([RVDEPLOY, "fuse", str(unfolded), "-o", str(folded)], check=True, capture_output=True)
        start = time.perf_counter()
        subprocess.run([RVDEPLOY, "quantize", str(folded), "--int8", "--calib", str(calib_dir), "-o",
                        str(net_dir / "rvdeploy" / f"{name}.onnx"), *flags_of(name)], check=True, capture_output=True)
        seconds = round(time.perf_counter() - start, 1)
        print(name, seconds, "s", flush=True)
        (net_dir / "rvdeploy" / "rvdeploy.json").write_text(json.dumps({"seconds": {name: seconds}}, indent=2) + "\n")


def first_output(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort_session(path)
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i:i + 16]})[0] for i in range(0, len(x), 16)])


def score(folder: Path, remark: str = "") -> Path:
    def seconds_of(path: Path) -> dict:
        return json.loads(path.read_text())["seconds"] if path.exists() else {}

    rows = []
    for name in MODELS:
        net_dir = folder / name
        held = np.load(net_dir / "heldout.npy")
        reference = first_output(net_dir / f"{name}.onnx", held)
        rv, mo, ai = (seconds_of(net_dir / tool / f"{tool}.json") for tool in ("rvdeploy", "modelopt", "aimet"))
        found = [("rvdeploy default", net_dir / "rvdeploy" / f"{name}.onnx", rv.get(name))]
        found += [(f"ModelOpt {p.stem.split('_')[-1]}", p, mo.get(p.name)) for p in sorted((net_dir / "modelopt").glob("*.onnx"))]
        found += [(f"AIMET {p.stem[len(name) + 1:]}", p, ai.get(p.stem)) for p in sorted((net_dir / "aimet").glob("*.npy"))]
        for tool, path, seconds in found:
            output = np.load(path) if path.suffix == ".npy" else first_output(path, held)
            rows.append({"model": name, "tool": tool, "sqnr_db": sqnr_db(output.astype(np.float32), reference),
                         "seconds": seconds})
            print(rows[-1], flush=True)
    machine = describe_machine()
    notes = (f"{SIZE} px, {CALIB} calibration crops, {HELD_OUT} held-out crops of scikit-learn's sample photos; "
             "held-out SQNR of the first output against the FP32 graph's. rvdeploy: `rvdeploy quantize --int8` at its "
             "defaults (tensorrt layout; the 20 dB floor judges 16 of the 64 crops, fitted on 48), a whole process. "
             "ModelOpt: modelopt.onnx.quantization.quantize, int8, on the 64 crops. AIMET: aimet-onnx with a "
             "TensorRT-like config (benchmarks/aimet_ptq.py). Seconds measured on "
             f"{machine.get('cpu', 'this CPU')}, one tool after the other; they compare only within this table. {remark}")
    columns = [("model", "model"), ("tool", "tool"), ("sqnr_db", "held-out SQNR dB"), ("seconds", "seconds")]
    return write_results("int8_real_graphs", rows, columns, notes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=("build", "score"))
    parser.add_argument("folder", type=Path)
    parser.add_argument("--remark", default="", help="score: what the notes should add about this run")
    args = parser.parse_args()
    if args.step == "build":
        build(args.folder)
    else:
        print(score(args.folder, args.remark))


if __name__ == "__main__":
    main()
