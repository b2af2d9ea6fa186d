"""The ``quantize`` stage: an FP32 ONNX graph in, a Q/DQ (INT8) graph out, and what its FP16 path
(:mod:`rvdeploy.precision.fp16_file`) shares with it.

The model's own preprocessing recipe comes from its rvdeploy metadata; a graph without metadata
needs one given explicitly. Outputs keep the input's metadata and add what precision they are.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper

from rvdeploy.compare import json_safe
from rvdeploy.data import image_folder, labelled_folder
from rvdeploy.errors import QuantizeError, RvdeployError
from rvdeploy.files import atomic_output, check_output_path, sha256_file
from rvdeploy.onnx_io import load_onnx, read_metadata, save_onnx, write_metadata
from rvdeploy.precision.bias_correction import BiasCorrection, BiasCorrector
from rvdeploy.machine import CPU_CLASSES
from rvdeploy.precision.choices import (DEFAULT_FP16_MIN_SQNR_DB, DEFAULT_METHOD, DEFAULT_MIN_SQNR_DB, DEFAULT_ROUNDING,
                                        METHODS, ROUNDINGS, SENSITIVITY_IMAGES, TARGETS)
from rvdeploy.precision.calib import QUANTIZED_OPS, activation_stats
from rvdeploy.precision.cpu_format import CpuFormat, plan_cpu_format
from rvdeploy.precision.equalize import EqualizeReport
from rvdeploy.precision.graph_choice import QuantizeSettings, graph_to_quantize
from rvdeploy.precision.fp16 import plan_fp16
from rvdeploy.precision.guard import GuardReport, Top1Scorer, check_min_sqnr, fall_back_until_met, held_out_split
from rvdeploy.precision.int8 import encode_weights, quantizable_nodes, quantize_int8
from rvdeploy.precision.linear_layers import linear_matmuls_as_gemm
from rvdeploy.precision.layer_report import LayerRow, layer_rows, plot_layers
from rvdeploy.precision.mixed import PRECISIONS, MixedGraph, fallback_graph
from rvdeploy.precision.rounding import Rounding, adaptive_rounding
from rvdeploy.precision.sensitivity import OutputProbe, layer_sqnr, most_sensitive_first
from rvdeploy.preprocess import Preprocess
from rvdeploy.probes import one_thread

@dataclass(frozen=True)
class ImageOptions:
    """Which images to observe, and how to read them."""

    calib_dir: str | os.PathLike | None = None
    num_images: int | None = None  # the first N images only
    recipe: Preprocess | None = None  # None: the graph's own (from its metadata)
    allow_upscale: bool = False


@dataclass(frozen=True)
class Int8Options(ImageOptions):
    target: str = "tensorrt"  # or "onnxruntime"
    cpu: str = "auto"  # onnxruntime target: the CPU class the graph is for (rvdeploy.machine.CPU_CLASSES); auto: this CPU's
    method: str = DEFAULT_METHOD
    cache_path: str | os.PathLike | None = None
    equalize: bool | None = None  # cross-layer equalization of the FP32 graph; None: where it measures better
    bias_correction: bool = True  # empirical bias correction of the INT8 layers of every candidate graph
    rounding: str = DEFAULT_ROUNDING  # INT8 weights rounded to nearest, or chosen by optimization (ROUNDINGS)
    min_sqnr: float | None = DEFAULT_MIN_SQNR_DB  # label-free floor: output SQNR (dB) against FP32 on the calibration images; 0 or None: off
    val_dir: str | os.PathLike | None = None  # labelled guard: validation images...
    max_top1_drop: float | None = None  # ...and the top-1 drop (points) allowed on them
    report_path: str | os.PathLike | None = None  # the per-layer report as JSON
    plot_path: str | os.PathLike | None = None  # ... and as a PNG figure
    show_progress: bool = True

    def __post_init__(self) -> None:
        if self.calib_dir is None:
            raise QuantizeError("--int8 needs calibration images: --calib DIR")
        if self.target not in TARGETS:
            raise QuantizeError(f"unknown INT8 target {self.target!r}; choose {', '.join(TARGETS)}")
        if self.cpu not in ("auto", *CPU_CLASSES):
            raise QuantizeError(f"unknown CPU class {self.cpu!r}; choose auto, {', '.join(CPU_CLASSES)}")
        if self.cpu != "auto" and self.target != "onnxruntime":
            raise QuantizeError("--cpu is for --target onnxruntime: the tensorrt layout runs on GPUs")
        if self.rounding not in ROUNDINGS:
            raise QuantizeError(f"unknown rounding {self.rounding!r}; choose {', '.join(ROUNDINGS)}")
        if self.method not in METHODS:
            raise QuantizeError(f"unknown calibration method {self.method!r}; choose {', '.join(METHODS)}")
        if (self.val_dir is None) != (self.max_top1_drop is None):
            raise QuantizeError("the accuracy guard needs both --val and --max-top1-drop")
        check_min_sqnr(self.min_sqnr)


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


def write_typed(model: onnx.ModelProto, source: onnx.ModelProto, path: str | os.PathLike, updates: dict) -> None:
    """Write a graph of ``source`` in another precision: ``source``'s metadata, with ``updates``."""
    present = {p.key for p in model.metadata_props}
    model.metadata_props.extend(p for p in source.metadata_props if p.key not in present)
    write_metadata(model, updates)
    save_onnx(model, path)


@dataclass
class Int8Report:
    target: str
    method: str
    calibration_images: int
    skipped_images: int
    calibration_seconds: float
    from_cache: bool
    quantized_nodes: int
    output_sqnr_db: float  # the written graph's outputs against FP32's, on the held-out images (else the calibration ones)
    held_out_images: int  # calibration images held out to judge every output SQNR on (0: judged on the fitted ones)
    compared_tensors: list[str]  # what the SQNRs compare where outputs follow a TopK (empty: the graph's outputs)
    fp16_nodes: list[str] = field(default_factory=list)  # layers taken out of INT8, by the precision they run in
    fp32_nodes: list[str] = field(default_factory=list)
    equalization: EqualizeReport | None = None  # None: --no-equalize
    guard: GuardReport | None = None
    bias_correction: BiasCorrection | None = None  # None: --no-bias-correction
    rounding: Rounding | None = None  # None: rounded to nearest
    cpu_format: CpuFormat | None = None  # the onnxruntime target's kernels per layer
    layers: list[LayerRow] = field(default_factory=list)
    float_by_design: dict[str, int] = field(default_factory=dict)  # compute nodes never quantized, by op
    linear_as_gemm: list[str] = field(default_factory=list)  # token Linear layers (MatMul by a weight) quantized as Gemm

    def to_dict(self) -> dict:
        data = asdict(self)
        data["equalization"] = self.equalization.to_dict() if self.equalization else None
        data["bias_correction"] = self.bias_correction.to_dict() if self.bias_correction else None
        data["rounding"] = self.rounding.to_dict() if self.rounding else None
        data["guard"] = self.guard.to_dict() if self.guard else None
        data["cpu_format"] = self.cpu_format.to_dict() if self.cpu_format else None
        data["layers"] = [row.to_dict() for row in self.layers]
        return json_safe(data)


# What INT8 leaves in float from the start: attention's MatMuls (token Linear layers are Gemms by now), Softmax and the norms
# (ModelOpt's and TensorRT's guidance keep them in higher precision); rvdeploy quantizes Conv and Gemm.
FLOAT_BY_DESIGN = ("MatMul", "Einsum", "Softmax", "LayerNormalization", "GroupNormalization", "InstanceNormalization",
                   "GridSample")


class _Corrected:
    """Candidate graphs with their INT8 layers' bias corrected on ``probe``'s images, each kept only
    where correction raises its output SQNR on ``judge``'s; what correction did to each, by its layers
    out of INT8."""

    def __init__(self, graph: onnx.ModelProto, probe: OutputProbe, judge: OutputProbe, target: str, what,
                 fitted: frozenset[str]) -> None:
        self.corrector = BiasCorrector(graph, probe.feeds, target, what, fitted)
        self.judge = judge
        self.reports: dict[tuple[str, ...], BiasCorrection] = {}  # by layers out of INT8

    def __call__(self, candidate: MixedGraph) -> MixedGraph:
        model, layers = self.corrector.correct(candidate.model, candidate.precisions)
        before = candidate.output_sqnr(self.judge)
        corrected = MixedGraph(model, candidate.precisions, before if not layers else None)
        after = corrected.output_sqnr(self.judge)
        self.reports[_out_of_int8(candidate)] = BiasCorrection(before, after, after > before, layers)
        return corrected if after > before else candidate


def _rounded(graph: onnx.ModelProto, first: MixedGraph, probe: OutputProbe, judge: OutputProbe, options: Int8Options,
             what: str | os.PathLike) -> tuple[MixedGraph, Rounding]:
    """``first`` (the all-INT8 graph) with adaptive rounding fitted on ``probe``'s images, where its
    outputs beat nearest rounding's on ``judge``'s (else ``first`` itself); and what rounding measured."""
    model, rounding = adaptive_rounding(graph, first.model, probe.feeds, options.target, str(what), options.show_progress)
    rounded = MixedGraph(model, first.precisions)
    rounding.sqnr_before_db, rounding.sqnr_after_db = first.output_sqnr(judge), rounded.output_sqnr(judge)
    rounding.kept = bool(rounding.weights) and rounding.sqnr_after_db > rounding.sqnr_before_db
    return (rounded if rounding.kept else first), rounding


def _out_of_int8(candidate: MixedGraph) -> tuple[str, ...]:
    return tuple(node for node, precision in candidate.precisions.items() if precision != "int8")


def quantize_int8_file(model_path: str | os.PathLike, out_path: str | os.PathLike, options: Int8Options) -> Int8Report:
    """Equalize (unless ``options.equalize`` is off), calibrate (or reuse the cache), write the Q/DQ graph
    for ``options.target``; with a guard (``min_sqnr``, or ``val_dir`` and ``max_top1_drop``) the most
    sensitive layers leave INT8, for FP16 on TensorRT and FP32 on ONNX Runtime, until the guard holds. Unless
    ``options.bias_correction`` is off, every candidate's INT8 layers are bias-corrected before it is measured."""
    outputs = [(out_path, "output"), (options.report_path, "--report"), (options.plot_path, "--plot")]
    for path, what in outputs:
        if path is not None:
            check_output_path(path, what)
    source = load_fp32_graph(model_path)
    recipe = model_recipe(source, model_path, options.recipe)
    images = image_folder(options.calib_dir, recipe, options.num_images, options.allow_upscale)
    scorer = None
    if options.val_dir is not None:
        scorer = Top1Scorer(source, labelled_folder(options.val_dir, recipe, options.allow_upscale), recipe, model_path)
    floor = options.min_sqnr or None  # 0: no floor
    guarded = floor is not None or scorer is not None
    # with a floor, some calibration images are held out: every output SQNR (the floor's, and each
    # measured choice's) is judged on them, and nothing is fitted to them
    fitted_images, judged_images = held_out_split(images) if floor is not None else (images, None)
    source_sha256 = sha256_file(model_path)
    # numpy's and scipy's BLAS (two OpenBLAS pools) on one thread: between ONNX Runtime's runs, two pools of
    # two threads each on two cores waited on each other (a 577-column Cholesky took 6 ms to 170 ms)
    with tempfile.TemporaryDirectory(prefix="rvdeploy-int8-") as tmp, one_thread():
        model, linear_layers = linear_matmuls_as_gemm(source)  # the FP32 graph every candidate is compared with
        graph_file, graph_sha256 = model_path, source_sha256
        if linear_layers:
            graph_file = save_onnx(model, Path(tmp) / "linear_as_gemm.onnx")
            graph_sha256 = sha256_file(graph_file)
        probe = OutputProbe(model, fitted_images, recipe, model_path)
        judge = OutputProbe(model, judged_images, recipe, model_path) if judged_images else probe
        chosen = graph_to_quantize(model, graph_file, graph_sha256, options.equalize, QuantizeSettings(
            options.target, options.method, options.cache_path, options.show_progress), fitted_images, recipe, judge,
            Path(tmp))
        graph, graph_path, calibration, equalization = chosen.model, chosen.path, chosen.calibration, chosen.equalization
        first = chosen.quantized or quantize_int8(graph_path, calibration, options.target)
        cpu_format = None
        if options.target == "onnxruntime":
            cpu_format = plan_cpu_format(options.cpu, graph, first, probe, options.show_progress)
        measured_unsigned = cpu_format.measured_unsigned if cpu_format else frozenset()
        measured = chosen.quantized_sqnr_db if first is chosen.quantized and not measured_unsigned else None
        first = MixedGraph(encode_weights(first, measured_unsigned) if measured_unsigned else first,
                           {node: "int8" for node in quantizable_nodes(graph)}, measured)
        # Each layer's sensitivity is measured with its weights rounded to nearest: adaptive rounding fits a
        # layer to the errors upstream of it, which a layer alone in INT8 does not have.
        uncorrected, sqnr = first.model, {}
        rounding = None
        if options.rounding == "adaptive":
            first, rounding = _rounded(graph, first, probe, judge, options, model_path)

        def sensitivity() -> dict[str, float]:  # one pass per layer: only for a report, or a guard with work to do
            if not sqnr:
                sqnr.update(layer_sqnr(graph, uncorrected, probe.first(SENSITIVITY_IMAGES), options.show_progress))
            return sqnr

        if options.report_path or options.plot_path:
            sensitivity()
        # what FP16 cannot serve (tensorrt: the layers out of INT8 run FP16 elsewhere); planned when one falls back
        fp16_fp32 = functools.cache(lambda: {kept.node for kept in plan_fp16(
            graph, activation_stats(graph, probe.feeds, model_path), judge.sqnr, DEFAULT_FP16_MIN_SQNR_DB).kept_fp32})

        fitted = frozenset(rounding.bias_chosen) if rounding and rounding.kept else frozenset()
        corrected = _Corrected(graph, probe, judge, options.target, model_path, fitted) if options.bias_correction else None
        if corrected:
            first = corrected(first)  # the sensitivity grafts the uncorrected, nearest-rounded layers, one at a time

        def build(fallback: tuple[str, ...]) -> MixedGraph:
            candidate = fallback_graph(graph_path, calibration, options.target, fallback, fp16_fp32, measured_unsigned,
                                       rounding if rounding and rounding.kept else None)
            return corrected(candidate) if corrected else candidate

        guard_report = None
        if guarded:
            final, guard_report = fall_back_until_met(model, first, lambda: most_sensitive_first(sensitivity()), build, judge,
                                                      floor, options.max_top1_drop, scorer)
            output_sqnr = guard_report.final_sqnr_db
        else:
            final, output_sqnr = first, first.output_sqnr(judge)
        bias_correction = corrected.reports[_out_of_int8(final)] if corrected else None
    by_precision = {p: [n for n, q in final.precisions.items() if q == p] for p in PRECISIONS}
    report = Int8Report(
        target=options.target,
        method=options.method,
        calibration_images=calibration.images,
        skipped_images=len(images.skipped),
        calibration_seconds=calibration.seconds,
        from_cache=calibration.from_cache,
        quantized_nodes=len(by_precision["int8"]),
        output_sqnr_db=output_sqnr,
        held_out_images=len(judged_images) if judged_images else 0,
        compared_tensors=judge.compared or [],
        fp16_nodes=by_precision["fp16"],
        fp32_nodes=by_precision["fp32"],
        equalization=equalization,
        guard=guard_report,
        bias_correction=bias_correction,
        rounding=rounding,
        cpu_format=cpu_format,
        layers=layer_rows(graph, calibration.ranges, equalization if graph is not model or equalization is None
                          or equalization.nothing_to_equalize else None, sqnr, final.precisions, rounding),
        linear_as_gemm=linear_layers,
        float_by_design=dict(sorted(Counter(n.op_type for n in graph.graph.node if n.op_type in FLOAT_BY_DESIGN).items())),
    )
    metadata = {
        "precision": "int8",
        "int8_target": options.target,
        "calibration": {"method": options.method, "images": calibration.images},
        "rounding": "adaptive" if rounding and rounding.kept else "nearest",
        "equalized": graph is not model,
        "fp16_nodes": by_precision["fp16"],
        "fp32_nodes": by_precision["fp32"],
        "source_onnx_sha256": source_sha256,
    }
    if bias_correction and bias_correction.kept:  # absent otherwise: --no-bias-correction writes what it always wrote
        metadata["bias_corrected"] = True
    written = final.model
    if cpu_format:
        metadata["int8_cpu"] = cpu_format.cpu
        metadata["u8u8_layers"] = sorted(cpu_format.unsigned & set(by_precision["int8"]))
        if cpu_format.unsigned != cpu_format.measured_unsigned:
            written = encode_weights(written, cpu_format.unsigned)
    write_typed(written, source, out_path, metadata)
    if options.report_path:
        with atomic_output(options.report_path) as tmp_report:
            tmp_report.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    if options.plot_path:
        plot_layers(report.layers, options.plot_path, f"INT8 per layer: {Path(model_path).name} ({options.target} layout)")
    return report
