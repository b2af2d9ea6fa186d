"""Which FP32 graph the INT8 quantizer calibrates and quantizes: the equalized one, or the graph as
it is. Cross-layer equalization undoes channel imbalance, but on a balanced net it can widen the
per-tensor activation ranges (the shipped digits model: 27.2 dB output SQNR equalized, 29.2 dB
without, weights rounded to nearest). So by default both are calibrated and quantized, and the one
whose outputs score the higher SQNR on the calibration images is kept."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import onnx

from rvdeploy.data import ImageSet
from rvdeploy.files import sha256_file
from rvdeploy.machine import cpu_int8_class
from rvdeploy.onnx_io import save_onnx
from rvdeploy.precision.calib import Calibration, Twin, calibrate, calibrate_twins
from rvdeploy.precision.equalize import EqualizeReport, equalize_graph
from rvdeploy.precision.int8 import encode_weights, quantizable_nodes, quantize_int8
from rvdeploy.precision.sensitivity import OutputProbe
from rvdeploy.preprocess import Preprocess


@dataclass(frozen=True)
class QuantizeSettings:
    target: str
    method: str
    cache_path: str | os.PathLike | None
    show_progress: bool


@dataclass
class Quantizable:
    """The FP32 graph that is calibrated and quantized, its file and calibration, and the equalization
    report (None: --no-equalize)."""

    model: onnx.ModelProto
    path: Path
    calibration: Calibration
    equalization: EqualizeReport | None
    quantized: onnx.ModelProto | None = None  # its all-INT8 graph, where measured to choose it...
    quantized_sqnr_db: float | None = None  # ... and that graph's output SQNR, where it was measured as it is


def graph_to_quantize(model: onnx.ModelProto, model_path: str | os.PathLike, source_sha256: str, equalize: bool | None,
                      settings: QuantizeSettings, images: ImageSet, recipe: Preprocess, probe: OutputProbe,
                      tmp: Path) -> Quantizable:
    """The graph to quantize. ``equalize`` True or False: equalized or not. None (the default): both,
    calibrated and quantized, measured on ``probe``; the equalized one is kept where it scores at
    least as high, and the report says what each scored."""

    def calibrated(path: Path, sha256: str) -> Calibration:
        return calibrate(path, sha256, images, recipe, settings.method, settings.cache_path, settings.show_progress)

    def plain(report: EqualizeReport | None) -> Quantizable:
        return Quantizable(model, Path(model_path), calibrated(Path(model_path), source_sha256), report)

    if equalize is False:
        return plain(None)
    equalized, report = equalize_graph(model, name=str(model_path))
    if report.nothing_to_equalize:  # the same graph: the same calibration cache entry as without equalization
        return plain(report)
    path = save_onnx(equalized, tmp / "equalized.onnx")
    if equalize is True:
        return Quantizable(equalized, path, calibrated(path, sha256_file(path)), report)
    if report.rescaled is not None:  # both calibrated in one pass: the equalized graph's tensors as rescaled copies
        mine, its = calibrate_twins(model, model_path, source_sha256, Twin(sha256_file(path), report.rescaled), images,
                                    recipe, settings.method, settings.cache_path, settings.show_progress)
        candidates = [Quantizable(equalized, path, its, report), Quantizable(model, Path(model_path), mine, report)]
    else:
        candidates = [Quantizable(equalized, path, calibrated(path, sha256_file(path)), report), plain(report)]
    scores = []
    for candidate in candidates:
        candidate.quantized = quantize_int8(candidate.path, candidate.calibration, settings.target)
        measured = _measured(candidate.quantized, settings.target)
        scores.append(probe.sqnr(measured))
        candidate.quantized_sqnr_db = scores[-1] if measured is candidate.quantized else None
    report.sqnr_equalized_db, report.sqnr_plain_db = scores
    report.kept = report.sqnr_equalized_db >= report.sqnr_plain_db
    return candidates[0 if report.kept else 1]


def _measured(quantized: onnx.ModelProto, target: str) -> onnx.ModelProto:
    """``quantized`` as this CPU measures what its target computes: an onnxruntime-layout graph on a
    CPU whose u8s8 kernels saturate (no VNNI) through its u8u8 twin, which computes what VNNI does."""
    if target == "onnxruntime" and cpu_int8_class() == "avx2":
        return encode_weights(quantized, frozenset(quantizable_nodes(quantized)))
    return quantized
