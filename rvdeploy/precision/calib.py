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
import math
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
from rvdeploy.errors import RvdeployError, first_line
from rvdeploy.files import atomic_output
from rvdeploy.onnx_io import ORT_QUIET, fixed_batch, ort_errors, ort_session, run_session, save_onnx
from rvdeploy.precision.choices import METHODS
from rvdeploy.preprocess import Preprocess
from rvdeploy.progress import progress_bar

QUANTIZED_OPS = ("Conv", "Gemm")
CALIBRATED_OPS = (*QUANTIZED_OPS, "Relu")  # Relu ranges let the CPU layout fold Relu into its Q/DQ
HISTOGRAM_BINS = 2048
PEAK_IMAGES = 4  # images per run of the graph with every tensor as an output
FP16_MAX = float(np.finfo(np.float16).max)  # 65504
FP16_SAMPLE = 4096  # values of each tensor, per run, whose FP16 rounding is measured
CACHE_FORMAT = "rvdeploy-calibration-cache/1"
ORT_DEFAULT_SEVERITY = 2  # onnxruntime's default logger level (warnings); it has no getter to restore from


class CalibrationError(RvdeployError):
    """Calibration that cannot run or a cache that cannot be used."""


@contextlib.contextmanager
def quiet_onnxruntime_tools() -> Iterator[None]:
    """onnxruntime.quantization logs advice on the root logger and prints its progress on stdout,
    and its sessions log their errors on stderr; rvdeploy shows its own progress bar, report and errors."""
    import onnxruntime

    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    onnxruntime.set_default_logger_severity(ORT_QUIET)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logging.disable(previous)
        onnxruntime.set_default_logger_severity(ORT_DEFAULT_SEVERITY)


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


def _finite_range(data) -> bool:
    low, high = getattr(data, "lowest", None), getattr(data, "highest", None)
    return (isinstance(low, np.ndarray) and isinstance(high, np.ndarray) and low.shape == high.shape and low.size > 0
            and bool(np.isfinite(low).all() and np.isfinite(high).all() and (low <= high).all()))


def calibrated_tensors(model_path: str | os.PathLike) -> set[str]:
    """The tensors onnxruntime's calibrator measures in the graph (by its own rule): a cache entry holds each."""
    from onnxruntime.quantization.calibrate import MinMaxCalibrater

    with tempfile.TemporaryDirectory(prefix="rvdeploy-calib-") as tmp, quiet_onnxruntime_tools():
        calibrator = MinMaxCalibrater(Path(model_path), list(CALIBRATED_OPS), augmented_model_path=str(Path(tmp) / "augmented.onnx"))
        return set(calibrator.select_tensors_to_calibrate(calibrator.model)[0])


def _checked_entry(entry: object, path: Path, method: str, model_path: str | os.PathLike,
                   expected: set[str] | None = None) -> dict:
    """A cached entry that onnxruntime's quantizer reads as it is, or a CalibrationError naming the cache.

    The quantizer trusts the file it is given; a damaged entry would fail deep inside it. ``expected``:
    the tensors the entry must hold, where already known (else found from ``model_path``).
    """
    from onnxruntime.quantization.calibrate import TensorsData

    problem = None
    try:
        with np.errstate(over="ignore"):  # a range beyond float32 becomes inf, refused below
            ranges = TensorsData.from_dict(entry)
    # what onnxruntime's decoder raises on JSON that is not its ranges (AttributeError: not a dict)
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
        problem = f"its entry for this model is not a set of ranges ({type(exc).__name__}: {first_line(exc)})"
    else:
        bad = [name for name, data in ranges.items() if not _finite_range(data)]
        if ranges.calibration_method != method_enum(method):
            problem = f"its entry for this model was not made with {method}"
        elif entry.get("smooth_quant", False) is not False:
            problem = "its entry for this model is marked smooth_quant, which rvdeploy does not use"
        elif not ranges.data or bad:
            problem = f"its entry for this model has no finite range for {bad[0] if bad else 'any tensor'}"
        else:
            missing = sorted((expected if expected is not None else calibrated_tensors(model_path)) - set(ranges.data))
            if missing:
                more = f" and {len(missing) - 1} more tensors" if len(missing) > 1 else ""
                problem = f"its entry for this model has no range for {missing[0]}{more}"
    if problem:
        raise CalibrationError(f"calibration cache {path}: {problem}; delete it to calibrate again")
    return entry


def _require_finite(ranges: dict, model_path: str | os.PathLike) -> None:
    """Measured ranges that can give scales: a NaN or Inf activation (non-finite or overflowing weights)
    cannot be quantized, and onnxruntime's quantizer would fail on it deep inside."""
    from onnxruntime.quantization.calibrate import TensorsData

    bad = sorted(name for name, data in TensorsData.from_dict(ranges).items() if not _finite_range(data))
    if bad:
        more = f" and {len(bad) - 1} more tensors" if len(bad) > 1 else ""
        raise CalibrationError(f"{model_path}: on the calibration images {bad[0]}{more} take NaN or infinite values "
                               "(are its weights finite?); it cannot be quantized")


def measure_ranges(model_path: str | os.PathLike, images: ImageSet, recipe: Preprocess, method: str,
                   batch_size: int = 16, show_progress: bool = True) -> dict:
    """Run onnxruntime's calibrator for ``method`` over ``images``; the ranges in its JSON form."""
    from onnxruntime.quantization import create_calibrator, save_tensors_data

    model = onnx.load(str(model_path), load_external_data=False)
    if method != "minmax" and fixed_batch(model) is None:
        # onnxruntime's histogram calibrators stack every batch's values into one array: a short last batch
        # failed there ("inhomogeneous shape"), so the batches split the images evenly
        batch_size = next(size for size in range(min(batch_size, len(images)), 0, -1) if len(images) % size == 0)
    with tempfile.TemporaryDirectory(prefix="rvdeploy-calib-") as tmp, quiet_onnxruntime_tools():
        calibrator = create_calibrator(
            Path(model_path), list(CALIBRATED_OPS), augmented_model_path=str(Path(tmp) / "augmented.onnx"),
            calibrate_method=method_enum(method),
            # onnxruntime's entropy default (128 bins for 128 quantized bins) leaves it no threshold to
            # choose but the maximum; TensorRT's entropy calibrator uses 2048 bins.
            extra_options={"num_bins": HISTOGRAM_BINS} if method == "entropy" else {},
        )
        with progress_bar(show_progress) as progress:
            try:
                calibrator.collect_data(_Reader(model_feeds(model, images, recipe, batch_size, progress, f"calibrating ({method})")))
            except ort_errors() as exc:  # a graph ONNX Runtime loads but cannot run
                raise CalibrationError(f"ONNX Runtime cannot run {model_path}: {first_line(exc)}") from None
        ranges_path = Path(tmp) / "ranges.json"
        save_tensors_data(calibrator.compute_data(), ranges_path)
        return json.loads(ranges_path.read_text())


def calibrate(model_path: str | os.PathLike, model_sha256: str, images: ImageSet, recipe: Preprocess, method: str,
              cache_path: str | os.PathLike | None = None, show_progress: bool = True) -> Calibration:
    """Ranges for ``method`` on ``images``, from ``cache_path`` when it holds them, else measured (and stored)."""
    return _cached([model_sha256], model_path, images, method, cache_path,
                   lambda: [measure_ranges(model_path, images, recipe, method, show_progress=show_progress)])[0]


def _cached(sha256s: list[str], model_path: str | os.PathLike, images: ImageSet, method: str,
            cache_path: str | os.PathLike | None, measure) -> list[Calibration]:
    """The calibrations of the graphs with ``sha256s`` (all of ``model_path``'s tensors), from
    ``cache_path`` when it holds every one, else ``measure()``-d (one set of ranges each, in one pass),
    checked finite and stored."""
    keys = [cache_key(sha256, method, images) for sha256 in sha256s]
    cache = _read_cache(Path(cache_path)) if cache_path else None
    if cache is not None and all(key in cache["entries"] for key in keys):
        expected = calibrated_tensors(model_path) if len(keys) > 1 else None  # one graph's nodes: the same tensors
        return [Calibration(_checked_entry(cache["entries"][key], Path(cache_path), method, model_path, expected),
                            method, len(images), 0.0, from_cache=True) for key in keys]
    start = time.perf_counter()
    measured = measure()
    seconds = time.perf_counter() - start
    for key, ranges in zip(keys, measured):
        _require_finite(ranges, model_path)
        if cache is not None:
            cache["entries"][key] = ranges
    if cache is not None:
        with atomic_output(cache_path) as tmp:
            tmp.write_text(json.dumps(cache))
    return [Calibration(ranges, method, len(images), seconds, from_cache=False) for ranges in measured]


@dataclass(frozen=True)
class ActivationStats:
    """What every float tensor of a graph takes on some inputs: its largest |value|, and the SQNR (dB)
    of its FP16 copy against it, on a random sample of its values (FP16's 11-bit significand gives
    normal values about 74 dB; values below FP16's normal range, 6.1e-5, keep fewer bits)."""

    peaks: dict[str, float]
    fp16_sqnr_db: dict[str, float]


def activation_stats(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], what: str | os.PathLike = "the graph") -> ActivationStats:
    """:class:`ActivationStats` of every float tensor of ``model`` on ``feeds`` (run with onnxruntime);
    ``what`` names the graph in errors. Every tensor becomes an output with no declared type, so that
    ONNX Runtime gives each its own (shape arithmetic is int64); only the float ones are kept."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    for node in probe.graph.node:
        for name in node.output:
            if name and name not in known:
                probe.graph.output.append(onnx.ValueInfoProto(name=name))
                known.add(name)
    session = ort_session(probe.SerializeToString(), name="the graph with every tensor as an output")
    names = [o.name for o in session.get_outputs()]
    peaks: dict[str, float] = {}
    energy: dict[str, list[float]] = {}  # [signal, FP16 rounding noise] summed over the inputs
    sampler = np.random.default_rng(0)
    # a few images at a time where the batch is dynamic: every tensor of a batch leaves the session at
    # once (RT-DETR-L at 160 px, 32 images a batch: 12 GB)
    fixed = fixed_batch(model) is not None
    for batch in feeds:
        rows = len(next(iter(batch.values())))
        step = rows if fixed else PEAK_IMAGES
        for feed in ({name: value[i:i + step] for name, value in batch.items()} for i in range(0, rows, step)):
            for name, value in zip(names, run_session(session, feed, what, names)):
                if isinstance(value, np.ndarray) and value.dtype.kind == "f":
                    peak = float(np.abs(value).max()) if value.size else 0.0
                    peaks[name] = max(peaks.get(name, 0.0), peak)
                    if value.dtype == np.float32 and peak <= FP16_MAX:  # beyond FP16's range the peak says it all
                        # a sample of each tensor: FP16 conversion of every value took RT-DETR-L 25 s for 32 images
                        flat = value.ravel()
                        if flat.size > FP16_SAMPLE:
                            flat = flat[sampler.integers(0, flat.size, FP16_SAMPLE)]
                        exact = flat.astype(np.float64)  # FP32 squares of values under 1e-19 would be 0
                        rounding = exact - flat.astype(np.float16)
                        sums = energy.setdefault(name, [0.0, 0.0])
                        sums[0] += float(np.dot(exact, exact))
                        sums[1] += float(np.dot(rounding, rounding))
    # rounding noise needs a non-zero value, so its signal is non-zero too
    fp16_sqnr = {name: math.inf if noise == 0 else 10 * math.log10(signal / noise) for name, (signal, noise) in energy.items()}
    return ActivationStats(peaks, fp16_sqnr)


@dataclass(frozen=True)
class Twin:
    """A graph that computes what the calibrated one does with some tensors scaled per channel (the
    equalized graph): ``rescaled`` maps each to its factor, shaped to broadcast along axis 1 (the
    twin's value is the calibrated graph's times it)."""

    sha256: str
    rescaled: dict[str, np.ndarray]


def _with_rescaled_copies(model: onnx.ModelProto, rescaled: dict[str, np.ndarray]) -> tuple[onnx.ModelProto, dict[str, str]]:
    """``model`` with a copy of each ``rescaled`` tensor times its factor, made by an op the calibrator
    measures (a depthwise 1x1 Conv; a Gemm by the diagonal for a 2-D tensor); and copy → tensor."""
    augmented = onnx.ModelProto()
    augmented.CopyFrom(model)
    copies = {}
    for index, (tensor, factor) in enumerate(rescaled.items()):
        copy, weight = f"{tensor}/rvdeploy_twin_{index}", f"rvdeploy_twin_{index}/weight"
        channels = factor.size
        if factor.ndim == 2:
            values = np.diag(factor.reshape(-1)).astype(np.float32)
            node = onnx.helper.make_node("Gemm", [tensor, weight], [copy], name=copy)
        else:
            values = factor.reshape((channels, 1) + (1,) * (factor.ndim - 2)).astype(np.float32)
            node = onnx.helper.make_node("Conv", [tensor, weight], [copy], name=copy, group=channels,
                                         kernel_shape=[1] * (factor.ndim - 2))
        augmented.graph.node.append(node)
        augmented.graph.initializer.append(onnx.numpy_helper.from_array(values, weight))
        copies[copy] = tensor
    return augmented, copies


def calibrate_twins(model: onnx.ModelProto, model_path: str | os.PathLike, model_sha256: str, twin: Twin, images: ImageSet,
                    recipe: Preprocess, method: str, cache_path: str | os.PathLike | None = None,
                    show_progress: bool = True) -> tuple[Calibration, Calibration]:
    """The calibrations of ``model`` (read from ``model_path``) and of its ``twin``, from one pass over
    ``images``: the twin's rescaled tensors are measured as copies scaled in the calibrated graph, the
    same values up to float32 rounding (equalization is exact: :mod:`rvdeploy.precision.equalize`).
    Both are read from ``cache_path`` when it holds both, else measured and stored."""
    def measure() -> list[dict]:
        # what the calibrator measures in the graph itself (a rescaled tensor may be measured only as a copy's input)
        measured_here = {name for node in model.graph.node if node.op_type in CALIBRATED_OPS
                         for name in (*node.input, *node.output)}
        augmented, copies = _with_rescaled_copies(model, twin.rescaled)
        with tempfile.TemporaryDirectory(prefix="rvdeploy-twin-") as tmp:
            both = measure_ranges(save_onnx(augmented, Path(tmp) / "with_copies.onnx"), images, recipe, method,
                                  show_progress=show_progress)
        data = both["data"]
        own = {name: value for name, value in data.items()
               if name not in copies and (name not in twin.rescaled or name in measured_here)}
        twin_data = dict(own)
        twin_data.update({tensor: data[copy] for copy, tensor in copies.items() if tensor in own})
        return [{**both, "data": own}, {**both, "data": twin_data}]

    mine, its = _cached([model_sha256, twin.sha256], model_path, images, method, cache_path, measure)
    return mine, its
