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
import onnx_graphsurgeon as gs

from rvdeploy.data import image_folder, labelled_folder
from rvdeploy.errors import RvdeployError
from rvdeploy.export import fixed_batch, read_metadata, write_metadata
from rvdeploy.files import atomic_output, sha256_file
from rvdeploy.precision.calib import Calibration, activation_peaks, calibrate, model_feeds
from rvdeploy.precision.fp16 import FP16_TINY, Fp16Report, convert_fp16, plan_fp32_nodes
from rvdeploy.precision.int8 import quantize_int8
from rvdeploy.precision.sensitivity import GuardReport, guard
from rvdeploy.preprocess import Preprocess

DEFAULT_METHOD = "minmax"  # the best of the three measured on the shipped model: benchmarks/results/int8_methods.md
FP16_PROBES = 8


class QuantizeError(RvdeployError):
    """A graph or option the precision stage cannot work with."""


def load_fp32_graph(path: str | os.PathLike) -> onnx.ModelProto:
    from rvdeploy.verify import load_onnx

    model = load_onnx(path)
    precision = read_metadata(model).get("precision", "fp32")
    if precision != "fp32":
        raise QuantizeError(f"{path} is already a {precision} graph: quantize its FP32 export instead")
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
    return Preprocess.from_dict(meta["preprocess"])


def _write(model: onnx.ModelProto, source: onnx.ModelProto, path: str | os.PathLike, updates: dict) -> None:
    model.metadata_props.extend(p for p in source.metadata_props if p.key not in {q.key for q in model.metadata_props})
    write_metadata(model, updates)
    onnx.checker.check_model(model)
    with atomic_output(path) as tmp:
        tmp.write_bytes(model.SerializeToString(deterministic=True))


def _observation_feeds(model: onnx.ModelProto, recipe: Preprocess, calib_dir, num_images, allow_upscale):
    """Inputs on which FP16 ranges are checked: calibration images, else standard-normal probes."""
    if calib_dir is None:
        count = fixed_batch(model) or FP16_PROBES
        probes = np.random.default_rng(0).standard_normal((count, 3, *recipe.input_size), dtype=np.float32)
        return [{model.graph.input[0].name: probes}], count, "random probes"
    images = image_folder(calib_dir, recipe, num_images, allow_upscale)
    return list(model_feeds(model, images, recipe, batch_size=32)), len(images), "calibration images"


def quantize_fp16(model_path: str | os.PathLike, out_path: str | os.PathLike, io_fp16: bool = False,
                  calib_dir: str | os.PathLike | None = None, num_images: int | None = None,
                  recipe: Preprocess | None = None, allow_upscale: bool = False) -> Fp16Report:
    """Write the FP16 graph of ``model_path``; nodes whose values FP16 cannot hold stay FP32."""
    model = load_fp32_graph(model_path)
    recipe = model_recipe(model, model_path, recipe)
    feeds, observed, observed_on = _observation_feeds(model, recipe, calib_dir, num_images, allow_upscale)
    peaks = activation_peaks(model, feeds)
    graph = gs.import_onnx(model)
    kept = plan_fp32_nodes(graph, peaks)
    kept_names = {k.node for k in kept}
    flushed = sum(
        int(((np.abs(t.values) < FP16_TINY) & (t.values != 0)).sum())
        for node in graph.nodes if node.name not in kept_names
        for t in node.inputs if isinstance(t, gs.Constant) and t.values.dtype == np.float32
    )
    converted = convert_fp16(model, kept_names, io_fp16)
    report = Fp16Report(len(graph.nodes) - len(kept), kept, flushed, observed, observed_on)
    _write(converted, model, out_path, {
        "precision": "fp16",
        "io_precision": "fp16" if io_fp16 else "fp32",
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


def quantize_int8_file(
    model_path: str | os.PathLike,
    out_path: str | os.PathLike,
    calib_dir: str | os.PathLike,
    target: str = "tensorrt",
    method: str = DEFAULT_METHOD,
    num_images: int | None = None,
    cache_path: str | os.PathLike | None = None,
    recipe: Preprocess | None = None,
    allow_upscale: bool = False,
    val_dir: str | os.PathLike | None = None,
    max_top1_drop: float | None = None,
    show_progress: bool = True,
) -> Int8Report:
    """Calibrate on ``calib_dir`` (or reuse the cache), write the Q/DQ graph for ``target``.

    With ``val_dir`` and ``max_top1_drop`` the accuracy guard keeps the most sensitive layers in
    FP32 until the top-1 drop on ``val_dir`` is within ``max_top1_drop`` points.
    """
    if (val_dir is None) != (max_top1_drop is None):
        raise QuantizeError("the accuracy guard needs both --val and --max-top1-drop")
    model = load_fp32_graph(model_path)
    recipe = model_recipe(model, model_path, recipe)
    images = image_folder(calib_dir, recipe, num_images, allow_upscale)
    model_sha256 = sha256_file(model_path)
    calibration: Calibration = calibrate(model_path, model_sha256, images, recipe, method, cache_path, show_progress)
    excluded: tuple[str, ...] = ()
    guard_report = None
    if val_dir is not None:
        val = labelled_folder(val_dir, recipe, allow_upscale)
        excluded, guard_report = guard(Path(model_path), calibration, target, val, recipe, max_top1_drop, show_progress)
    quantized = quantize_int8(model_path, calibration, target, nodes_to_exclude=excluded)
    report = Int8Report(
        target=target,
        method=method,
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
        "int8_target": target,
        "calibration": {"method": method, "images": calibration.images},
        "fp32_nodes": list(excluded),
        "source_onnx_sha256": model_sha256,
    })
    return report
