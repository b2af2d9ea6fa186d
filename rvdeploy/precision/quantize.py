"""The ``quantize`` stage: an FP32 ONNX graph in, a typed (FP16) or Q/DQ (INT8) graph out.

The model's own preprocessing recipe comes from its rvdeploy metadata; a graph without metadata
needs one given explicitly. Outputs keep the input's metadata and add what precision they are.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import onnx_graphsurgeon as gs

from rvdeploy.data import image_folder, labelled_folder
from rvdeploy.errors import QuantizeError, RvdeployError
from rvdeploy.files import sha256_file
from rvdeploy.onnx_io import fixed_batch, load_onnx, read_metadata, save_onnx, write_metadata
from rvdeploy.precision.calib import METHODS, QUANTIZED_OPS, Calibration, activation_peaks, calibrate, model_feeds
from rvdeploy.precision.fp16 import FP16_TINY, Fp16Report, convert_fp16, plan_fp32_nodes
from rvdeploy.precision.int8 import TARGETS, quantize_int8
from rvdeploy.precision.sensitivity import GuardReport, guard
from rvdeploy.preprocess import Preprocess

DEFAULT_METHOD = "minmax"  # the best of the three measured on the shipped model: benchmarks/results/int8_methods.md
FP16_PROBES = 8


@dataclass(frozen=True)
class ImageOptions:
    """Which images to observe, and how to read them."""

    calib_dir: str | os.PathLike | None = None
    num_images: int | None = None  # the first N images only
    recipe: Preprocess | None = None  # None: the graph's own (from its metadata)
    allow_upscale: bool = False


@dataclass(frozen=True)
class Fp16Options(ImageOptions):
    io_fp16: bool = False  # FP16 graph input and output too


@dataclass(frozen=True)
class Int8Options(ImageOptions):
    target: str = "tensorrt"  # or "onnxruntime"
    method: str = DEFAULT_METHOD
    cache_path: str | os.PathLike | None = None
    val_dir: str | os.PathLike | None = None  # accuracy guard: labelled validation images...
    max_top1_drop: float | None = None  # ...and the top-1 drop (points) allowed on them
    show_progress: bool = True

    def __post_init__(self) -> None:
        if self.calib_dir is None:
            raise QuantizeError("--int8 needs calibration images: --calib DIR")
        if self.target not in TARGETS:
            raise QuantizeError(f"unknown INT8 target {self.target!r}; choose {', '.join(TARGETS)}")
        if self.method not in METHODS:
            raise QuantizeError(f"unknown calibration method {self.method!r}; choose {', '.join(METHODS)}")
        if (self.val_dir is None) != (self.max_top1_drop is None):
            raise QuantizeError("the accuracy guard needs both --val and --max-top1-drop")


def load_fp32_graph(path: str | os.PathLike) -> onnx.ModelProto:
    model = load_onnx(path)
    precision = read_metadata(model).get("precision", "fp32")
    if precision != "fp32":
        raise QuantizeError(f"{path} is already a {precision} graph: quantize its FP32 export instead")
    # A NaN or Inf Conv/Gemm weight has no scale (onnxruntime's quantizer asserts on it) and no FP16 value worth writing.
    weights = {name for node in model.graph.node if node.op_type in QUANTIZED_OPS for name in node.input[1:]}
    for init in model.graph.initializer:
        if init.name not in weights:
            continue
        values = onnx.numpy_helper.to_array(init)
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            raise QuantizeError(f"{path}: weight {init.name} has {int((~np.isfinite(values)).sum())} NaN or infinite "
                                "values; it cannot be quantized")
    return model


def model_recipe(model: onnx.ModelProto, path: str | os.PathLike, override: Preprocess | None) -> Preprocess:
    """The recipe the caller gave, else the graph's own; a graph with neither cannot be calibrated."""
    if override is not None:
        return override
    meta = read_metadata(model)
    if "preprocess" not in meta:
        raise QuantizeError(
            f"{path} is not an rvdeploy export (no preprocessing metadata): give --mean, --std and --input-size"
        )
    try:
        return Preprocess.from_dict(meta["preprocess"])
    except RvdeployError as exc:
        raise QuantizeError(f"{path}: {exc}") from None


def _write(model: onnx.ModelProto, source: onnx.ModelProto, path: str | os.PathLike, updates: dict) -> None:
    model.metadata_props.extend(p for p in source.metadata_props if p.key not in {q.key for q in model.metadata_props})
    write_metadata(model, updates)
    save_onnx(model, path)


def _observation_feeds(model: onnx.ModelProto, recipe: Preprocess, options: ImageOptions):
    """Inputs on which FP16 ranges are checked: calibration images, else standard-normal probes."""
    if options.calib_dir is None:
        count = fixed_batch(model) or FP16_PROBES
        probes = np.random.default_rng(0).standard_normal((count, 3, *recipe.input_size), dtype=np.float32)
        return [{model.graph.input[0].name: probes}], count, "random probes"
    images = image_folder(options.calib_dir, recipe, options.num_images, options.allow_upscale)
    return list(model_feeds(model, images, recipe, batch_size=32)), len(images), "calibration images"


def quantize_fp16(model_path: str | os.PathLike, out_path: str | os.PathLike,
                  options: Fp16Options = Fp16Options()) -> Fp16Report:
    """Write the FP16 graph of ``model_path``; nodes whose values FP16 cannot hold stay FP32."""
    model = load_fp32_graph(model_path)
    recipe = model_recipe(model, model_path, options.recipe)
    feeds, observed, observed_on = _observation_feeds(model, recipe, options)
    peaks = activation_peaks(model, feeds, model_path)
    graph = gs.import_onnx(model)
    kept = plan_fp32_nodes(graph, peaks)
    kept_names = {k.node for k in kept}
    flushed = sum(
        int(((np.abs(t.values) < FP16_TINY) & (t.values != 0)).sum())
        for node in graph.nodes if node.name not in kept_names
        for t in node.inputs if isinstance(t, gs.Constant) and t.values.dtype == np.float32
    )
    converted = convert_fp16(model, kept_names, options.io_fp16)
    report = Fp16Report(len(graph.nodes) - len(kept), kept, flushed, observed, observed_on)
    _write(converted, model, out_path, {
        "precision": "fp16",
        "io_precision": "fp16" if options.io_fp16 else "fp32",
        "fp32_nodes": sorted(kept_names),
        "source_onnx_sha256": sha256_file(model_path),
    })
    return report


@dataclass
class Int8Report:
    target: str
    method: str
    calibration_images: int
    skipped_images: int
    calibration_seconds: float
    from_cache: bool
    quantized_nodes: int
    fp32_nodes: list[str] = field(default_factory=list)
    guard: GuardReport | None = None

    def to_dict(self) -> dict:
        data = asdict(self)
        data["guard"] = self.guard.to_dict() if self.guard else None
        return data


def quantize_int8_file(model_path: str | os.PathLike, out_path: str | os.PathLike, options: Int8Options) -> Int8Report:
    """Calibrate (or reuse the cache), write the Q/DQ graph for ``options.target``.

    With ``val_dir`` and ``max_top1_drop`` the accuracy guard keeps the most sensitive layers in
    FP32 until the top-1 drop on ``val_dir`` is within ``max_top1_drop`` points.
    """
    model = load_fp32_graph(model_path)
    recipe = model_recipe(model, model_path, options.recipe)
    images = image_folder(options.calib_dir, recipe, options.num_images, options.allow_upscale)
    model_sha256 = sha256_file(model_path)
    calibration: Calibration = calibrate(model_path, model_sha256, images, recipe, options.method,
                                         options.cache_path, options.show_progress)
    excluded: tuple[str, ...] = ()
    guard_report = None
    if options.val_dir is not None:
        val = labelled_folder(options.val_dir, recipe, options.allow_upscale)
        excluded, guard_report = guard(Path(model_path), calibration, options.target, val, recipe,
                                       options.max_top1_drop, options.show_progress)
    quantized = quantize_int8(model_path, calibration, options.target, nodes_to_exclude=excluded)
    report = Int8Report(
        target=options.target,
        method=options.method,
        calibration_images=calibration.images,
        skipped_images=len(images.skipped),
        calibration_seconds=calibration.seconds,
        from_cache=calibration.from_cache,
        quantized_nodes=sum(1 for n in quantized.graph.node if n.op_type in ("Conv", "Gemm")) - len(excluded),
        fp32_nodes=list(excluded),
        guard=guard_report,
    )
    _write(quantized, model, out_path, {
        "precision": "int8",
        "int8_target": options.target,
        "calibration": {"method": options.method, "images": calibration.images},
        "fp32_nodes": list(excluded),
        "source_onnx_sha256": model_sha256,
    })
    return report
