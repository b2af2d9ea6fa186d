"""Every real graph through every stage, as a new user takes them (issue 16): timm's and ultralytics'
nets (random weights, BN statistics fitted to the calibration crops, exported unfolded by the
TorchScript exporter) through `fuse`, `verify`, `quantize --fp16`, `quantize --int8` for both targets
at their defaults, the three TensorRT-RTX engines and `bench`; per net the exit codes, seconds and
held-out output SQNR (fold against the unfolded graph, FP16 and INT8 against the folded one).

Two steps (the nets need .venv-timm; each net's line is written as soon as it is done):

    .venv-timm/bin/python benchmarks/every_stage.py run build/every_stage repvit_m0_9,yolov9t,... > build/every_stage.jsonl
    .venv/bin/python benchmarks/every_stage.py table build/every_stage.jsonl
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
import onnx

from rvdeploy.onnx_io import read_metadata
from rvdeploy.precision.fp16 import fp16_node_names
from rvdeploy.precision.sensitivity import OutputProbe
from rvdeploy.preprocess import Preprocess

from int8_cpu import write_crops
from int8_real_graphs import IMAGENET, fitted_net, pixels
from results_io import write_results

RVDEPLOY = str(Path(sys.executable).with_name("rvdeploy"))
SIZE, CALIB, HELD_OUT = 160, 64, 16


def recipe_of(name: str) -> tuple[Preprocess, tuple[str, ...]]:
    mean, std = ((0.0,) * 3, (1.0,) * 3) if name.startswith(("yolo", "rtdetr")) else IMAGENET
    flags = ("--mean", ",".join(map(str, mean)), "--std", ",".join(map(str, std)), "--input-size", str(SIZE),
             "--resize", str(SIZE))
    return Preprocess((SIZE, SIZE), SIZE, mean, std), flags


def judge(reference: Path, x: np.ndarray) -> OutputProbe:
    """What graphs are compared with ``reference`` by on ``x``, as rvdeploy judges them: every output, those
    after a TopK by what it selects from (a detector's selection reorders near-tied queries); its own
    outputs are run once, however many graphs it judges."""
    fp32 = onnx.load(reference)
    return OutputProbe(fp32, [{fp32.graph.input[0].name: x[i:i + 8]} for i in range(0, len(x), 8)], None, reference)


def command(*args) -> list:
    """[exit code, seconds] (and the last line of stderr where it failed) of one rvdeploy process."""
    start = time.perf_counter()
    done = subprocess.run([RVDEPLOY, *map(str, args)], capture_output=True, text=True)
    result = [done.returncode, round(time.perf_counter() - start, 1)]
    return result + ([(done.stderr.strip().splitlines() or [""])[-1][:300]] if done.returncode else [])


def run_net(name: str, root: Path, calib_dir: Path, held_dir: Path) -> dict:
    import torch

    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    recipe, flags = recipe_of(name)
    calib, held = pixels(calib_dir, recipe), pixels(held_dir, recipe)
    unfolded, plain = folder / "unfolded.onnx", folder / "plain.onnx"
    try:
        net = fitted_net(name, calib, SIZE)
    except Exception as exc:  # noqa: BLE001 - a net the framework cannot build at this size is a row, not a crash
        return {"name": name, "export": repr(exc)[:200]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net.eval(), torch.from_numpy(calib[:1]), str(unfolded), dynamo=False,
                          opset_version=17, input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}})
    int8 = ("--int8", "--calib", calib_dir, *flags)
    steps = {
        "fuse": ("fuse", unfolded, "-o", plain), "verify": ("verify", plain),
        "fp16": ("quantize", plain, "--fp16", "-o", folder / "fp16.onnx"),
        "int8_trt": ("quantize", plain, *int8, "--target", "tensorrt", "-o", folder / "int8_trt.onnx"),
        "int8_ort": ("quantize", plain, *int8, "--target", "onnxruntime", "-o", folder / "int8_ort.onnx"),
        "eng_fp32": ("build-engine", plain, "-o", folder / "fp32.engine", "--backend", "tensorrt-rtx"),
        "eng_fp16": ("build-engine", folder / "fp16.onnx", "-o", folder / "fp16.engine", "--backend", "tensorrt-rtx"),
        "eng_int8": ("build-engine", folder / "int8_trt.onnx", "-o", folder / "int8.engine", "--backend", "tensorrt-rtx"),
        "bench": ("bench", unfolded, plain, folder / "int8_ort.onnx", "--backend", "onnxruntime", "--batch", "1",
                  "--warmup-s", "0", "--min-s", "0.2"),
    }
    row = {"name": name, **{step: command(*args) for step, args in steps.items()}}
    row["fold_db"] = round(judge(unfolded, held).sqnr(onnx.load(plain)), 1)  # the folded graph against the unfolded one
    folded = judge(plain, held)
    for key, graph in (("fp16_db", "fp16.onnx"), ("trt_db", "int8_trt.onnx"), ("ort_db", "int8_ort.onnx")):
        if (folder / graph).exists():
            row[key] = round(folded.sqnr(onnx.load(folder / graph)), 1)
    if (folder / "fp16.onnx").exists():  # what the FP16 plan kept FP32, of the nodes that compute floats
        fp16 = onnx.load(folder / "fp16.onnx")
        kept = len(read_metadata(fp16).get("fp32_nodes", []))
        row["fp16_fp32"] = f"{kept} of {kept + len(fp16_node_names(fp16))}"
    return row


def run(root: Path, names: list[str]) -> None:
    calib_dir, held_dir = root / "images" / "calib", root / "images" / "held"
    if not calib_dir.exists():
        calib_dir.mkdir(parents=True)
        held_dir.mkdir()
        write_crops(calib_dir, CALIB + HELD_OUT, size=SIZE)
        for path in sorted(calib_dir.iterdir())[CALIB:]:
            path.rename(held_dir / path.name)
    for name in names:
        print(json.dumps(run_net(name, root, calib_dir, held_dir)), flush=True)


def table(lines: Path, remark: str = "") -> Path:
    steps = ("fuse", "verify", "fp16", "int8_trt", "int8_ort", "eng_fp32", "eng_fp16", "eng_int8", "bench")
    rows = []
    for line in lines.read_text().splitlines():
        row = json.loads(line)
        if "export" in row:  # the framework's own export failed: no rvdeploy step ran
            rows.append({**row, "ok": "-", "failed": f"export: {row['export']}"})
            continue
        row["ok"] = f"{sum(row[s][0] == 0 for s in steps)}/{len(steps)}"
        row["failed"] = "; ".join(f"{s}: {row[s][2]}" for s in steps if row[s][0] != 0) or "-"
        row.update({f"{s}_s": row[s][1] for s in ("int8_trt", "int8_ort")})
        rows.append(row)
    columns = [("name", "net"), ("ok", "commands ok"), ("fold_db", "fold dB"), ("fp16_db", "FP16 dB"),
               ("fp16_fp32", "FP16 graph: nodes kept FP32"),
               ("trt_db", "INT8 tensorrt dB"), ("ort_db", "INT8 onnxruntime dB"), ("int8_trt_s", "INT8 tensorrt s"),
               ("int8_ort_s", "INT8 onnxruntime s"), ("failed", "failures")]
    notes = (f"{SIZE} px; {CALIB} calibration crops of scikit-learn's sample photos, {HELD_OUT} other crops held out; "
             "SQNRs on the held-out crops, every output (those after a TopK by what it selects from, as rvdeploy judges "
             "them): the fold against the unfolded graph, FP16 (the 35 dB floor on, observed on random probes) and INT8 "
             "(as written by default, the 20 dB floor on) against the folded graph. Random weights with BN fitted to the crops: harder to "
             "quantize than trained nets. Seconds are whole `rvdeploy quantize` processes.")
    return write_results("every_stage", rows, columns, notes + ("\n\n" + remark if remark else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="step", required=True)
    run_parser = sub.add_parser("run")
    run_parser.add_argument("folder", type=Path)
    run_parser.add_argument("names", help="comma-separated timm / ultralytics model names")
    table_parser = sub.add_parser("table")
    table_parser.add_argument("lines", type=Path)
    table_parser.add_argument("--remark", default="", help="what the notes should add about this run")
    args = parser.parse_args()
    if args.step == "run":
        run(args.folder, args.names.split(","))
    else:
        print(table(args.lines, args.remark))


if __name__ == "__main__":
    main()
