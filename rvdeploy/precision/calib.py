"""Calibration: activation ranges measured on real images, with a cache.

ONNX Runtime's calibrators (min-max, entropy, percentile) do the measuring. Their ranges are kept
in a JSON cache keyed by the model's sha256, the method and the image set, so a rebuild with the
same inputs skips calibration.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from rich.progress import Progress

from rvdeploy.data import ImageSet, batches, pad_batch
from rvdeploy.errors import RvdeployError
from rvdeploy.files import atomic_output
from rvdeploy.onnx_io import fixed_batch, ort_session
from rvdeploy.preprocess import Preprocess
from rvdeploy.progress import progress_bar

METHODS = ("entropy", "percentile", "minmax")
QUANTIZED_OPS = ("Conv", "Gemm")
CALIBRATED_OPS = (*QUANTIZED_OPS, "Relu")  # Relu ranges let the CPU layout fold Relu into its Q/DQ
HISTOGRAM_BINS = 2048
CACHE_FORMAT = "rvdeploy-calibration-cache/1"


class CalibrationError(RvdeployError):
    """Calibration that cannot run or a cache that cannot be used."""


@contextlib.contextmanager
def quiet_onnxruntime_tools() -> Iterator[None]:
    """onnxruntime.quantization logs advice on the root logger and prints its progress on stdout;
    rvdeploy shows its own progress bar and report."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logging.disable(previous)


def method_enum(method: str):
    """onnxruntime's enum for a calibration method name."""
    from onnxruntime.quantization import CalibrationMethod

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    if method not in methods:
        raise CalibrationError(f"unknown calibration method {method!r}; choose {', '.join(METHODS)}")
    return methods[method]


def model_feeds(model: onnx.ModelProto, images: ImageSet, recipe: Preprocess, batch_size: int,
                progress: Progress | None = None, description: str = "") -> Iterator[dict[str, np.ndarray]]:
    """Input feeds of the model's batch size; a fixed-batch model's last batch is padded by repetition."""
    name = model.graph.input[0].name
    fixed = fixed_batch(model)
    task = progress.add_task(description, total=len(images)) if progress else None
    for pixels, indices in batches(images, recipe, fixed or batch_size):
        yield {name: pad_batch(pixels, fixed) if fixed else pixels}
        if progress:
            progress.advance(task, len(indices))


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over our batches."""

    def __init__(self, feeds: Iterator[dict[str, np.ndarray]]) -> None:
        self._feeds = feeds

    def get_next(self):
        return next(self._feeds, None)


def image_set_digest(images: ImageSet) -> str:
    """Which images, in which versions: paths, sizes and modification times."""
    digest = hashlib.sha256()
    for path in images.paths:
        stat = path.stat()
        digest.update(f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def cache_key(model_sha256: str, method: str, images: ImageSet) -> str:
    return f"{model_sha256}:{method}:{len(images)}:{image_set_digest(images)[:16]}"


@dataclass
class Calibration:
    """Activation ranges in onnxruntime's serialized form, and where they came from."""

    ranges: dict
    method: str
    images: int
    seconds: float
    from_cache: bool


def _read_cache(path: Path) -> dict:
    if not path.exists():
        return {"format": CACHE_FORMAT, "entries": {}}
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CalibrationError(f"calibration cache {path} is not readable JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT or not isinstance(data.get("entries"), dict):
        raise CalibrationError(f"{path} is not an rvdeploy calibration cache")
    return data


def measure_ranges(model_path: str | os.PathLike, images: ImageSet, recipe: Preprocess, method: str,
                   batch_size: int = 16, show_progress: bool = True) -> dict:
    """Run onnxruntime's calibrator for ``method`` over ``images``; the ranges in its JSON form."""
    from onnxruntime.quantization import create_calibrator, save_tensors_data

    model = onnx.load(str(model_path), load_external_data=False)
    with tempfile.TemporaryDirectory(prefix="rvdeploy-calib-") as tmp, quiet_onnxruntime_tools():
        calibrator = create_calibrator(
            Path(model_path), list(CALIBRATED_OPS), augmented_model_path=str(Path(tmp) / "augmented.onnx"),
            calibrate_method=method_enum(method),
            # onnxruntime's entropy default (128 bins for 128 quantized bins) leaves it no threshold to
            # choose but the maximum; TensorRT's entropy calibrator uses 2048 bins.
            extra_options={"num_bins": HISTOGRAM_BINS} if method == "entropy" else {},
        )
        with progress_bar(show_progress) as progress:
            calibrator.collect_data(_Reader(model_feeds(model, images, recipe, batch_size, progress, f"calibrating ({method})")))
        ranges_path = Path(tmp) / "ranges.json"
        save_tensors_data(calibrator.compute_data(), ranges_path)
        return json.loads(ranges_path.read_text())


def calibrate(model_path: str | os.PathLike, model_sha256: str, images: ImageSet, recipe: Preprocess, method: str,
              cache_path: str | os.PathLike | None = None, show_progress: bool = True) -> Calibration:
    """Ranges for ``method`` on ``images``, from ``cache_path`` when it holds them, else measured (and stored)."""
    key = cache_key(model_sha256, method, images)
    cache = _read_cache(Path(cache_path)) if cache_path else None
    if cache is not None and key in cache["entries"]:
        return Calibration(cache["entries"][key], method, len(images), 0.0, from_cache=True)
    start = time.perf_counter()
    ranges = measure_ranges(model_path, images, recipe, method, show_progress=show_progress)
    seconds = time.perf_counter() - start
    if cache is not None:
        cache["entries"][key] = ranges
        with atomic_output(cache_path) as tmp:
            tmp.write_text(json.dumps(cache))
    return Calibration(ranges, method, len(images), seconds, from_cache=False)


def activation_peaks(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> dict[str, float]:
    """The largest |value| every float tensor of ``model`` takes on ``feeds`` (run with onnxruntime)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    for node in probe.graph.node:
        for name in node.output:
            if name not in known:
                probe.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
                known.add(name)
    session = ort_session(probe.SerializeToString(), name="the graph with every tensor as an output")
    names = [o.name for o in session.get_outputs()]
    peaks: dict[str, float] = {}
    for feed in feeds:
        for name, value in zip(names, session.run(names, feed)):
            peak = float(np.abs(value).max()) if value.size else 0.0
            peaks[name] = max(peaks.get(name, 0.0), peak)
    return peaks
