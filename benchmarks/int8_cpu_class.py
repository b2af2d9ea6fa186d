"""INT8 for the CPU class it runs on: accuracy and ONNX Runtime speed of the onnxruntime layout made for
VNNI CPUs (u8s8 everywhere) and for CPUs without VNNI (u8u8 where u8s8 saturates), measured on this CPU.

- Digits model: held-out top-1 and logit SQNR against FP32 (models/digits/heldout), for the tensorrt
  layout and the onnxruntime layout with --cpu vnni, avx2 and auto (this CPU's class).
- RepVGG-A0 at 224 px (trained-like weights, BN fitted to images): logit SQNR against FP32 on 64
  held-out crops of scikit-learn's sample photographs (calibration on 64 others), and latency at batch 8:
  FP32 and each INT8 graph timed interleaved in blocks of 5 runs, spinning off on every session.

Writes results/int8_cpu_class_<class>.{md,json}, <class> as ONNX Runtime's kernels show it
(rvdeploy.machine.cpu_int8_class). Under an emulator (qemu-x86_64 -cpu EPYC-Milan: a Zen 3 without
VNNI) the arithmetic is the emulated CPU's and the timings mean nothing: pass --emulated NAME, which
skips the timing and names the emulation. Run:
    .venv/bin/python benchmarks/int8_cpu_class.py [--batch 8] [--seconds 20]
    qemu-x86_64 -cpu EPYC-Milan .venv/bin/python benchmarks/int8_cpu_class.py --emulated "qemu EPYC-Milan (Zen 3)" [--digits-only]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from rvdeploy.arch import zoo_spec
from rvdeploy.compare import sqnr_db
from rvdeploy.data import batches, image_folder, labelled_folder
from rvdeploy.export import ExportOptions, export_onnx
from rvdeploy.machine import cpu_int8_class, describe_machine
from rvdeploy.onnx_io import ort_session, read_metadata
from rvdeploy.pipeline import Int8Options, export_model, quantize_model
from rvdeploy.preprocess import Preprocess
from rvdeploy.reparam import fuse
from rvdeploy.synthetic import trained_like_state_dict
from rvdeploy.weights import TrainWeights

from int8_cpu import write_crops
from int8_robust import CALIB, DIGITS, HELDOUT, cpu_flags, interleaved
from results_io import write_results

GRAPHS = {"INT8 tensorrt layout": {"target": "tensorrt"},
          **{f"INT8 onnxruntime --cpu {cpu}": {"target": "onnxruntime", "cpu": cpu} for cpu in ("vnni", "avx2", "auto")}}


def recipe_of(path: Path) -> Preprocess:
    return Preprocess.from_dict(read_metadata(onnx.load(path))["preprocess"])


def logits(path: Path, pixels: list[np.ndarray]) -> np.ndarray:
    session = ort_session(path)
    return np.concatenate([session.run(None, {"input": x})[0] for x in pixels])


def graph_rows(model: str, fp32: Path, calib: Path, pixels: list[np.ndarray], labels: np.ndarray | None,
               folder: Path, num_images: int | None = None) -> tuple[list[dict], dict[str, Path]]:
    reference = logits(fp32, pixels)
    rows, paths = [], {"FP32": fp32}
    fp32_top1 = float((reference.argmax(1) == labels).mean() * 100) if labels is not None else None
    rows.append({"model": model, "graph": "FP32", "top1": fp32_top1})
    for name, settings in GRAPHS.items():
        out = folder / f"{model}_{name.replace(' ', '_').replace('--', '')}.onnx"
        start = time.perf_counter()
        report = quantize_model(fp32, out, Int8Options(calib, num_images=num_images, show_progress=False, **settings))
        seconds = time.perf_counter() - start
        out_logits = logits(out, pixels)
        fmt = report.cpu_format
        rows.append({"model": model, "graph": name, "cpu": fmt.cpu if fmt else "-",
                     "u8u8": f"{len(fmt.unsigned)} of {report.quantized_nodes}" if fmt else "-",
                     "sqnr_db": sqnr_db(out_logits, reference), "quantize_s": seconds,
                     "top1": float((out_logits.argmax(1) == labels).mean() * 100) if labels is not None else None})
        rows[-1]["top1_vs_fp32"] = rows[-1]["top1"] - fp32_top1 if labels is not None else None
        paths[name] = out
        print({k: round(v, 3) if isinstance(v, float) else v for k, v in rows[-1].items()}, flush=True)
    return rows, paths


def digits(folder: Path) -> list[dict]:
    fp32 = export_model(DIGITS, folder / "digits.onnx").output
    recipe = recipe_of(fp32)
    held = labelled_folder(HELDOUT, recipe)
    pixels, labels = [], []
    for batch, indices in batches(held, recipe, 64):
        pixels.append(batch)
        labels += [held.labels[i] for i in indices]
    return graph_rows("digits", fp32, CALIB, pixels, np.asarray(labels), folder)[0]


def repvgg_a0(folder: Path, batch: int, seconds: float | None) -> list[dict]:
    spec = zoo_spec("RepVGG-A0")
    (folder / "crops").mkdir(exist_ok=True)
    write_crops(folder / "crops", 128)
    calib, held = folder / "calib", folder / "held"
    # write_crops alternates the two photographs: both sets take crops of both.
    for sub, names in ((calib, [i for i in range(128) if i % 4 < 2]), (held, [i for i in range(128) if i % 4 >= 2])):
        sub.mkdir(exist_ok=True)
        for i in names:
            os.replace(folder / "crops" / f"{i:04d}.jpg", sub / f"{i:04d}.jpg")
    deploy, _ = fuse(TrainWeights(spec, trained_like_state_dict(spec, inputs="image")))
    fp32 = export_onnx(deploy, folder / "a0.onnx", ExportOptions(input_size=(224, 224)))
    recipe = recipe_of(fp32)
    pixels = [x for x, _ in batches(image_folder(held, recipe), recipe, 16)]
    rows, paths = graph_rows("RepVGG-A0 224 px", fp32, calib, pixels, None, folder)
    if seconds is None:
        return rows
    timed = {name: paths[name] for name in ("FP32", "INT8 onnxruntime --cpu vnni", "INT8 onnxruntime --cpu avx2")}
    load_before = os.getloadavg()[0]
    speeds = interleaved(timed, batch, seconds)
    load = f"load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after"
    for name, latency in speeds.items():
        row = next(r for r in rows if r["graph"] == name)
        row.update(batch=batch, p50_ms=latency.p50, throughput_ips=latency.throughput_ips,
                   vs_fp32=speeds["FP32"].p50 / latency.p50, load=load)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--emulated", help="the emulated CPU, when run under an emulator: timings are skipped")
    parser.add_argument("--digits-only", action="store_true", help="skip RepVGG-A0 (slow under an emulator)")
    args = parser.parse_args()
    here = cpu_int8_class()
    with tempfile.TemporaryDirectory() as tmp:
        rows = digits(Path(tmp))
        if not args.digits_only:
            rows += repvgg_a0(Path(tmp), args.batch, None if args.emulated else args.seconds)
    columns = [("model", "model"), ("graph", "graph"), ("cpu", "made for"), ("u8u8", "u8u8 layers"),
               ("top1", "top-1 %"), ("top1_vs_fp32", "Δ top-1"), ("sqnr_db", "logit SQNR dB"), ("quantize_s", "quantize s"),
               ("p50_ms", "p50 ms"), ("throughput_ips", "img/s"), ("vs_fp32", "× FP32 (p50)")]
    cpu = f"emulated {args.emulated} under {describe_machine()['cpu']}" if args.emulated else describe_machine()["cpu"]
    notes = (f"CPU: {cpu}; class as ONNX Runtime's kernels show it: {here}"
             + ("" if args.emulated else f" ({cpu_flags()})")
             + f"; ONNX Runtime {describe_machine()['versions']['onnxruntime']}. Every figure was measured on this CPU. "
             "--cpu auto is this CPU's class. A graph made for avx2 on a VNNI CPU is u8u8 everywhere (saturation cannot be "
             "seen there); made on an AVX2 CPU, it is u8u8 only where u8s8 saturation cost most. "
             + ("Timings skipped: under emulation they mean nothing." if args.emulated else
                f"Latency: batch {args.batch}, interleaved in blocks of 5 runs, session.intra_op.allow_spinning = 0 on every session."))
    name = f"int8_cpu_class_{here}" + ("_emulated" if args.emulated else "")
    print(write_results(name, rows, columns, notes))


if __name__ == "__main__":
    main()
