"""Empirical bias correction of an INT8 graph (Nagel et al., ICCV 2019, section 4.2, the empirical variant).

Rounding weights and activations shifts each layer's output mean: E[INT8 output] - E[FP32 output]
is not zero per channel, and equalization, which moves weight ranges around, makes the shift larger.
The shift measured on the calibration images is subtracted from the layer's bias, layer by layer in
graph order, each shift measured with the corrections before it applied: the graph runs stepwise
(:mod:`rvdeploy.precision.stepwise`), one pass over the images for all its layers, each corrected
layer's values shifted before the layers after it read them. Measuring every layer in the
uncorrected graph instead double-counts: a layer's shift then includes what its upstream layers'
corrections remove. On the equalized digits model (tensorrt layout, 256 calibration images), held-out
logit SQNR 26.9 dB went to 24.1 dB with every layer measured in the uncorrected graph, to 28.3 dB
layer by layer (benchmarks/results/int8_robust.md has the latter).

The guard's candidate graphs are each corrected before they are measured (so the guard judges what
would be written): one pass each.

Both layouts are corrected: the tensorrt layout's bias is a float initializer; the onnxruntime
layout's is int32 at scale (input scale x weight scale), so its correction is rounded to that grid.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from rvdeploy.compare import json_safe
from rvdeploy.errors import QuantizeError
from rvdeploy.graph_edit import prefix_model
from rvdeploy.onnx_io import ort_session, run_session
from rvdeploy.precision.int8 import quantizable_nodes
from rvdeploy.precision.stepwise import StepwiseRun

INT32 = np.iinfo(np.int32)


@dataclass(frozen=True)
class LayerBiasCorrection:
    node: str
    max_abs_correction: float  # the largest |correction| over the layer's output channels
    max_abs_bias: float  # the largest |bias| before it (0 for a layer that had no bias)


@dataclass
class BiasCorrection:
    """What correction did to a graph: the layers corrected, and the output SQNR against FP32 on the
    calibration images before and after; ``kept`` is False when the corrected graph measured no better,
    and the uncorrected one was used."""

    sqnr_before_db: float
    sqnr_after_db: float
    kept: bool
    layers: list[LayerBiasCorrection] = field(default_factory=list)

    def to_dict(self) -> dict:
        return json_safe(asdict(self))


def output_ranks(model: onnx.ModelProto, layers: list[str]) -> dict[str, int]:
    """The rank of each of ``layers``' output (Conv: N, C and its spatial axes; Gemm: 2), by ONNX shape inference."""
    inferred = {t.name: len(t.type.tensor_type.shape.dim) for t in onnx.shape_inference.infer_shapes(model).graph.value_info}
    inferred.update({t.name: len(t.type.tensor_type.shape.dim) for t in model.graph.output})
    ranks = {node.name: inferred.get(node.output[0]) for node in model.graph.node if node.name in layers}
    unknown = [name for name in layers if not ranks.get(name)]
    if unknown:
        raise QuantizeError(f"bias correction: ONNX shape inference does not know the rank of {unknown[0]}'s output")
    return ranks


def _channel_mean_graph(model: onnx.ModelProto, ranks: dict[str, int]) -> tuple[onnx.ModelProto, list[str]]:
    """``model`` up to the layers of ``ranks``, whose outputs are the per-output-channel means (over
    the batch and every spatial position) of those layers' outputs: a few numbers per layer leave the
    session, not its feature maps, and nothing after the layers runs."""
    layers = {node.name: node for node in model.graph.node if node.name in ranks}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    reduces, axes_inits, means = [], [], []
    for name, rank in ranks.items():
        output = layers[name].output[0]
        axes, mean = [0, *range(2, rank)], f"{output}/channel_mean"
        if opset >= 18:  # ReduceMean's axes became an input in opset 18
            axes_inits.append(numpy_helper.from_array(np.array(axes, np.int64), f"{mean}/axes"))
            reduces.append(onnx.helper.make_node("ReduceMean", [output, axes_inits[-1].name], [mean], keepdims=0))
        else:
            reduces.append(onnx.helper.make_node("ReduceMean", [output], [mean], axes=axes, keepdims=0))
        means.append(mean)
    outputs = [layers[name].output[0] for name in ranks]
    return prefix_model(model, outputs, reduces, axes_inits, means), means


def channel_means(model: onnx.ModelProto, ranks: dict[str, int], feeds: list[dict], what: str) -> dict[str, np.ndarray]:
    """The output mean per channel of each layer of ``ranks`` over every image of ``feeds`` (float64), in one pass."""
    measured, names = _channel_mean_graph(model, ranks)
    session = ort_session(measured.SerializeToString(), name=f"the bias-correction probe of {what}")
    sums, rows = [0.0] * len(names), 0
    for feed in feeds:
        batch = len(next(iter(feed.values())))
        outputs = run_session(session, feed, what, names)
        sums = [s + batch * np.asarray(o, np.float64) for s, o in zip(sums, outputs)]
        rows += batch
    return {layer: total / rows for layer, total in zip(ranks, sums)}


def _own(node: gs.Node, index: int) -> gs.Constant:
    """``node``'s constant input ``index``, copied when another node shares it (so that only ``node`` changes)."""
    constant = node.inputs[index]
    if len(constant.outputs) > 1:
        constant = gs.Constant(f"{node.name}/corrected_{constant.name}", np.array(constant.values))
        node.inputs[index] = constant
    return constant


def _correct_layer(node: gs.Node, shift: np.ndarray, target: str) -> tuple[LayerBiasCorrection, np.ndarray] | None:
    """Lower ``node``'s bias by ``shift`` (one value per output channel): what changed, and the change
    per channel as written (the onnxruntime layout's rounded to its bias grid); None when its bias is
    not one the layout lets us change (not a constant of one value per channel, or a missing int32 bias)."""
    bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
    if bias is None:
        if target != "tensorrt":  # an int32 bias would need its own Q/DQ scales: left uncorrected
            return None
        added = gs.Constant(f"{node.name}/corrected_bias", (-shift).astype(np.float32))
        if len(node.inputs) > 2:  # an empty name: the optional input given as absent
            node.inputs[2] = added
        else:
            node.inputs.append(added)
        return LayerBiasCorrection(node.name, float(np.abs(shift).max()), 0.0), added.values.astype(np.float64)
    dequantize = bias.inputs[0] if bias.inputs and bias.inputs[0].op == "DequantizeLinear" else None
    if dequantize is not None:  # the onnxruntime layout: int32 at scale (input scale x weight scale), zero point 0
        integers, scale = dequantize.inputs[0], dequantize.inputs[1]
        if not (isinstance(integers, gs.Constant) and isinstance(scale, gs.Constant) and integers.values.size == shift.size
                and integers.values.dtype == np.int32 and len(dequantize.outputs[0].outputs) == 1):
            return None
        before = integers.values.astype(np.int64)
        steps = np.round(shift.reshape(before.shape) / scale.values.astype(np.float64).reshape(-1)).astype(np.int64)
        after = np.clip(before - steps, INT32.min, INT32.max).astype(np.int32)
        _own(dequantize, 0).values = after
        step = scale.values.astype(np.float64).reshape(-1)
        return (LayerBiasCorrection(node.name, float(np.abs(shift).max()), float(np.abs(before.reshape(-1) * step).max())),
                (after.astype(np.int64) - before).reshape(-1) * step)
    if not isinstance(bias, gs.Constant) or bias.values.dtype != np.float32 or bias.values.size != shift.size:
        return None
    before = bias.values.astype(np.float64)
    after = (before - shift.reshape(before.shape)).astype(np.float32)
    _own(node, 2).values = after
    return LayerBiasCorrection(node.name, float(np.abs(shift).max()), float(np.abs(before).max())), (after - before).reshape(-1)


def _channel_mean(values: list[np.ndarray]) -> np.ndarray:
    """The mean per channel (axis 1) over every batch and position, in float64."""
    axes = (0, *range(2, values[0].ndim))
    return sum(v.sum(axis=axes, dtype=np.float64) for v in values) / sum(v.size // v.shape[1] for v in values)


class BiasCorrector:
    """Corrects the INT8 layers of graphs quantized from one FP32 graph (the guard's candidates): the
    FP32 layer means are measured once, each candidate's shifts in one stepwise pass of its own."""

    def __init__(self, fp32: onnx.ModelProto, feeds: list[dict], target: str, what: str = "the INT8 graph",
                 fitted: frozenset[str] = frozenset()) -> None:
        # ``fitted``: layers whose bias adaptive rounding fitted to FP32 (rvdeploy.precision.rounding): left alone
        # while every layer before them is INT8
        self.layers, self.fitted = quantizable_nodes(fp32), fitted  # graph order
        self.ranks = output_ranks(fp32, self.layers)
        self.fp32, self.feeds, self.target, self.what = fp32, feeds, target, what

    @functools.cached_property
    def reference(self) -> dict[str, np.ndarray]:
        """The FP32 layer means: one pass, made when a candidate first has a layer to correct."""
        return channel_means(self.fp32, self.ranks, self.feeds, self.what)

    def correct(self, quantized: onnx.ModelProto, precisions: dict[str, str]) -> tuple[onnx.ModelProto, list[LayerBiasCorrection]]:
        """``quantized`` (the target's layout; ``precisions``: each Conv/Gemm's) with the bias of each
        INT8 layer lowered by its mean output error against FP32 on the feeds, layer by layer in graph
        order, and what changed. A layer whose bias cannot be changed (:func:`_correct_layer`) is left alone."""
        graph = gs.import_onnx(quantized)
        nodes = {node.name: node for node in graph.nodes}
        measured, upstream = [], []
        for name in self.layers:
            upstream.append(precisions.get(name))
            # a fitted bias is in effect where no layer up to it left INT8 (rvdeploy.precision.rounding.Rounding.apply)
            if upstream[-1] == "int8" and not (name in self.fitted and all(p == "int8" for p in upstream)):
                measured.append(name)
        if not measured:
            return quantized, []
        corrected = _BiasWriter(quantized)  # the protobuf, kept in step with the graph's corrected biases
        outputs = {name: nodes[name].outputs[0].name for name in measured}
        run = StepwiseRun(corrected.model, list(outputs.values()), self.feeds, f"the bias-correction pass of {self.what}")
        corrections = []
        for name in measured:
            values = run.values(corrected.model, outputs[name])
            done = _correct_layer(nodes[name], _channel_mean(values) - self.reference[name], self.target)
            if done is not None:
                corrections.append(done[0])
                corrected.write(nodes[name])
                change = done[1].astype(np.float32).reshape(1, -1, *[1] * (values[0].ndim - 2))
                run.replace(outputs[name], [v + change for v in values])
        return (corrected.model if corrections else quantized), corrections


class _BiasWriter:
    """A copy of a graph's protobuf into which corrected biases are written one layer at a time: the
    next layer is measured on it without exporting the whole graph again."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = onnx.ModelProto()
        self.model.CopyFrom(model)
        self.by_output = {node.output[0]: node for node in self.model.graph.node if node.output}
        self.initializers = {init.name: init for init in self.model.graph.initializer}

    def write(self, layer: gs.Node) -> None:
        """``layer``'s bias as :func:`_correct_layer` left it: its float bias (input 2), or the int32
        constant its bias's DequantizeLinear reads."""
        bias = layer.inputs[2]
        dequantize = bias.inputs[0] if bias.inputs and bias.inputs[0].op == "DequantizeLinear" else None
        node, index = (dequantize, 0) if dequantize is not None else (layer, 2)
        constant = node.inputs[index]
        target = self.by_output[node.outputs[0].name]
        while len(target.input) <= index:
            target.input.append("")
        target.input[index] = constant.name
        tensor = numpy_helper.from_array(np.asarray(constant.values), constant.name)
        if constant.name in self.initializers:
            self.initializers[constant.name].CopyFrom(tensor)
        else:
            self.model.graph.initializer.append(tensor)
            self.initializers[constant.name] = self.model.graph.initializer[-1]
