"""Cross-layer equalization (Nagel et al., ICCV 2019) of a plain ONNX graph, proven exact.

Folded RepVGG kernels have per-channel ranges that differ by orders of magnitude; per-tensor INT8
activation scales then crush the small channels. Between two layers with only per-channel,
positively homogeneous ops in between (Relu, pooling, Flatten of a 1x1 map), output channel c of
the first can be divided by s_c and input channel c of the second multiplied by s_c without
changing the function; s_c = sqrt(r1_c / r2_c) (r: per-channel absolute weight range) gives both
the same range. Sweeps over the chain repeat until the scales converge. It reads the graph alone
(no rvdeploy metadata needed); only initializer values change; every pair it cannot equalize
exactly is named with the reason; each equalized pair is proven alone against the original's
(:mod:`rvdeploy.precision.same_function`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from rvdeploy.compare import Comparison
from rvdeploy.graph_edit import node_label
from rvdeploy.precision.same_function import ScaledPair, prove_pairs

LAYER_OPS = ("Conv", "Gemm")
# Per-channel and positively homogeneous (f(x / s) = f(x) / s for s > 0): a scale passes through.
HOMOGENEOUS_OPS = ("Relu", "LeakyRelu", "GlobalAveragePool", "GlobalMaxPool", "AveragePool", "MaxPool", "Identity")
REDUCE_OPS = ("ReduceMean", "ReduceMax")  # homogeneous when they keep the batch and channel axes
RESHAPE_OPS = ("Flatten", "Reshape", "Squeeze", "Unsqueeze")  # keep channel c at axis 1 only for a 1x1 map
GATE_OPS = ("Sigmoid", "HardSigmoid")  # what makes a Mul a squeeze-excitation gate
MAX_WALK = 8  # ops followed from a layer to the next one
MAX_SWEEPS = 1000
TOLERANCE = 1e-3  # a sweep whose scales all lie within 1 +- this has converged


@dataclass(frozen=True)
class EqualizedPair:
    first: str  # node names (Conv, Conv|Gemm)
    second: str
    spread_before: float  # max_c r1_c / min_c r1_c of the first layer's per-output-channel weight range
    spread_after: float
    scale_min: float  # the first layer's output channel c ends up divided by scale_c
    scale_max: float


@dataclass(frozen=True)
class SkippedPair:
    first: str
    second: str | None
    reason: str


@dataclass
class EqualizeReport:
    pairs: list[EqualizedPair]
    skipped: list[SkippedPair]
    sweeps: int
    proof: Comparison | None  # the worst graph output, equalized vs. original; None when nothing changed
    # node → (weight spread before, after) for every Conv/Gemm the equalization touched
    node_spreads: dict[str, tuple[float, float]] = field(default_factory=dict)
    # Where the quantizer measured whether to keep it (the default): the output SQNR on the calibration
    # images, weights rounded to nearest, of the INT8 graph with and without equalization.
    sqnr_equalized_db: float | None = None
    sqnr_plain_db: float | None = None
    kept: bool = True
    # tensor → the factor per channel (shaped to broadcast along axis 1) that equalization multiplies it
    # by: each first layer's output and what lies between it and its second; None where a rank is unknown
    rescaled: dict[str, np.ndarray] | None = field(default=None, repr=False)

    @property
    def nothing_to_equalize(self) -> bool:
        return not self.pairs

    def to_dict(self) -> dict:
        return {"pairs": [asdict(p) for p in self.pairs], "skipped": [asdict(s) for s in self.skipped],
                "sweeps": self.sweeps, "proof": self.proof.to_dict() if self.proof else None,
                "layer_spreads": {name: list(spreads) for name, spreads in self.node_spreads.items()},
                "sqnr_equalized_db": self.sqnr_equalized_db, "sqnr_plain_db": self.sqnr_plain_db, "kept": self.kept}


def range_spread(ranges: np.ndarray) -> float:
    """max / min of per-channel ranges, dead (zero) channels excluded; 1.0 when none is alive."""
    alive = ranges[ranges > 0]
    return float(alive.max() / alive.min()) if alive.size else 1.0


def weight_spread(weights: np.ndarray) -> float:
    """The spread of the per-output-channel (axis 0) absolute maximum of a Conv/Gemm weight."""
    weights = np.asarray(weights, dtype=np.float64)
    return range_spread(np.abs(weights).reshape(len(weights), -1).max(axis=1))


# -- finding the pairs -----------------------------------------------------------------------
@dataclass(frozen=True)
class LayerPair:
    """Two layers with only per-channel, positively homogeneous ops between them."""

    first: gs.Node  # a Conv: its output channel c...
    second: gs.Node  # ...is input channel c of this Conv or Gemm


def analysed_graph(model: onnx.ModelProto) -> gs.Graph:
    """The graph with inferred shapes (to show that a Flatten or Reshape keeps the channel axis)."""
    try:
        model = onnx.shape_inference.infer_shapes(model)
    except (onnx.shape_inference.InferenceError, ValueError):
        pass  # without shapes, reshapes between layers are left alone, with that reason
    return gs.import_onnx(model)


def _weight_problem(node: gs.Node, index: int, fed: set[str]) -> str | None:
    """Why input ``index`` of ``node`` is not a float32 initializer this node alone reads, or None."""
    tensor = node.inputs[index]
    if not isinstance(tensor, gs.Constant) or tensor.name in fed:
        return f"{node_label(node)} reads weights computed at run time ({tensor.name})"
    if tensor.values.dtype != np.float32:
        return f"{node_label(node)}'s weight {tensor.name} is {tensor.values.dtype}, not float32"
    if len(tensor.outputs) > 1:
        return f"{node_label(node)}'s weight {tensor.name} is shared with {node_label(tensor.outputs[1])}"
    return None


def _keeps_channels(tensor: gs.Tensor, out: gs.Tensor) -> bool:
    """A reshape keeps channel c at axis 1 when it turns an N x C x 1 x 1 map into N x C (x 1...)."""
    shape_in, shape_out = tensor.shape or (), out.shape or ()  # None: unknown
    return (len(shape_in) >= 2 and len(shape_out) >= 2 and isinstance(shape_in[1], int) and shape_out[1] == shape_in[1]
            and all(d == 1 for d in (*shape_in[2:], *shape_out[2:])))


def _is_relu_clip(node: gs.Node) -> bool:
    """Clip(0, no max) is a Relu; bounds are inputs since opset 11, attributes before."""
    bounds = [t if t.name else None for t in node.inputs[1:3]] + [None] * (3 - len(node.inputs))
    low, high = bounds[:2]
    low_value = float(low.values) if isinstance(low, gs.Constant) else node.attrs.get("min", 0.0 if low is None else None)
    return high is None and "max" not in node.attrs and low_value == 0.0


def _between_problem(node: gs.Node, tensor: gs.Tensor) -> str | None:
    """Why a per-channel scale of ``tensor`` does not pass ``node`` unchanged, or None."""
    name, op = node_label(node), node.op
    if node.inputs[0] is not tensor:
        return f"{op} {name} between them does not take the scaled tensor as its data input"
    if op in HOMOGENEOUS_OPS:
        return None
    if op == "Clip":
        return None if _is_relu_clip(node) else f"Clip {name} between them clips at a fixed bound: not positively homogeneous"
    if op in REDUCE_OPS:  # the axes: an input since opset 18, an attribute before
        axes = node.inputs[1] if len(node.inputs) > 1 else None
        axes = [int(a) for a in axes.values.ravel()] if isinstance(axes, gs.Constant) else node.attrs.get("axes")
        rank = len(tensor.shape) if tensor.shape else None
        if axes and rank and all(a % rank >= 2 for a in axes):
            return None
        return f"{op} {name} between them reduces over the batch or channel axis (or its axes are unknown)"
    if op in RESHAPE_OPS:
        keeps = _keeps_channels(tensor, node.outputs[0])
        return None if keeps else f"{op} {name} between them does not keep the channel axis (or its shapes are unknown)"
    if op in ("Mul", "Div") and len(node.inputs) == 2 and isinstance(node.inputs[1], gs.Constant):
        return None  # elementwise by a constant: linear
    return f"{op} {name} between them is not positively homogeneous per channel"


def _second_problem(node: gs.Node, tensor: gs.Tensor, channels: int, fed: set[str]) -> str | None:
    """Why ``node`` cannot take the scale of ``tensor``'s channels, or None."""
    if node.inputs[0] is not tensor:
        return f"{node_label(node)} reads {tensor.name} as a weight, not as its data input"
    if problem := _weight_problem(node, 1, fed):
        return problem
    weight = node.inputs[1].values
    if node.op == "Conv":
        width = weight.shape[1] * int(node.attrs.get("group", 1))
    elif node.attrs.get("transA", 0):
        return f"Gemm {node_label(node)} transposes its data input"
    else:
        width = weight.shape[1] if node.attrs.get("transB", 0) else weight.shape[0]
    if width != channels:
        return f"{node_label(node)} takes {width} input channels, the first layer gives {channels}"
    return None


def _gate(readers: list[gs.Node]) -> gs.Node | None:
    """The Mul among the readers of a tensor that multiplies it by a Sigmoid-like gate computed from
    it (a squeeze-excitation block, or a SiLU / Hardswish), or None."""
    return next((n for n in readers if n.op == "Mul" and any(t.inputs and t.inputs[0].op in GATE_OPS for t in n.inputs)), None)


def _gated_by(gate: gs.Node, tensor: gs.Tensor) -> str:
    """What multiplies ``tensor`` by a gate: an activation when the gate reads the tensor itself
    (x * sigmoid(x) is SiLU, x * hardsigmoid(x) Hardswish), else a squeeze-excitation block."""
    sigmoid = next(t.inputs[0] for t in gate.inputs if t.inputs and t.inputs[0].op in GATE_OPS)
    if sigmoid.inputs[0] is tensor:
        return "a SiLU" if sigmoid.op == "Sigmoid" else "a Hardswish"
    return "a squeeze-excitation block"


def _follow(first: gs.Node, graph_outputs: set[str], fed: set[str]) -> LayerPair | SkippedPair:
    """The layer that takes ``first``'s output channels, or why none can take a scale from it."""
    label = node_label(first)
    problem = _weight_problem(first, 1, fed) or (_weight_problem(first, 2, fed) if len(first.inputs) > 2 else None)
    tensor = first.outputs[0]
    for _ in range(MAX_WALK):
        if tensor.name in graph_outputs:
            return SkippedPair(label, None, problem or f"{tensor.name} is a graph output, which a scale would change")
        readers = list(tensor.outputs)
        if not readers:
            return SkippedPair(label, None, problem or f"nothing reads {tensor.name}")
        if len(readers) > 1:
            gate = _gate(readers)
            if gate is None:
                names = ", ".join(node_label(n) for n in readers)
                return SkippedPair(label, None, problem or f"{tensor.name} is read by {len(readers)} nodes ({names})")
            problem = problem or (f"{_gated_by(gate, tensor)} between them ({node_label(gate)} multiplies by a gate "
                                  "computed from the input: not positively homogeneous)")
            tensor = gate.outputs[0]
            continue
        node = readers[0]
        if node.op in LAYER_OPS:
            problem = problem or _second_problem(node, tensor, first.inputs[1].values.shape[0], fed)
            return SkippedPair(label, node_label(node), problem) if problem else LayerPair(first, node)
        problem = problem or _between_problem(node, tensor)
        if len(node.outputs) != 1:
            break
        tensor = node.outputs[0]
    return SkippedPair(label, None, problem or f"no Conv or Gemm within {MAX_WALK} ops of {label}")


def find_pairs(graph: gs.Graph) -> tuple[list[LayerPair], list[SkippedPair]]:
    """Every Conv's pair with the layer after it, in graph order, or the reason it has none."""
    fed = {t.name for t in graph.inputs}  # an initializer listed as a graph input can be fed at run time
    outputs = {t.name for t in graph.outputs}
    pairs, skipped = [], []
    for node in graph.nodes:
        if node.op == "Conv":
            found = _follow(node, outputs, fed)
            (pairs if isinstance(found, LayerPair) else skipped).append(found)
    return pairs, skipped


# -- the weights ------------------------------------------------------------------------------
class _Layer:
    """One Conv/Gemm of the chain: its weights (untouched until written) and the scales accumulated
    on its output and input channels. Sweeps need only each (output, input channel)'s maximum over
    the kernel, which scales like the weight: max_k |a_o b_i W[o, i, k]| = a_o b_i max_k |W[o, i, k]|."""

    def __init__(self, node: gs.Node) -> None:
        # A Gemm is only ever a second layer: its output channels, and so its bias, keep their scale.
        self.weight, self.bias = node.inputs[1], (node.inputs[2] if node.op == "Conv" and len(node.inputs) > 2 else None)
        self.groups = int(node.attrs.get("group", 1)) if node.op == "Conv" else 1
        self.transposed = node.op == "Gemm" and not node.attrs.get("transB", 0)  # weight as (inputs, outputs)
        rows = self._rows()
        self.out_scale, self.in_scale = np.ones(rows.shape[0]), np.ones(rows.shape[1] * self.groups)
        self.kernel_max = np.abs(self._grouped(rows)).max(axis=3)

    def _rows(self) -> np.ndarray:  # the weight in float64, output channels on axis 0
        return self.weight.values.astype(np.float64).T if self.transposed else self.weight.values.astype(np.float64)

    def _grouped(self, rows: np.ndarray) -> np.ndarray:
        """(groups, outputs per group, inputs per group, kernel): input channel c of the whole tensor
        is in-group channel c % (inputs per group) of group c // (inputs per group)."""
        return rows.reshape(self.groups, len(rows) // self.groups, rows.shape[1], -1)

    def _scales(self) -> tuple[np.ndarray, np.ndarray]:
        return self.out_scale.reshape(self.groups, -1, 1), self.in_scale.reshape(self.groups, 1, -1)

    def output_ranges(self) -> np.ndarray:  # max |W[o]| per output channel o, with the scales so far
        out, inp = self._scales()
        return ((self.kernel_max * inp).max(axis=2, keepdims=True) * out).reshape(-1)

    def input_ranges(self) -> np.ndarray:  # max |W[:, c]| per input channel c of the whole tensor
        out, inp = self._scales()
        return ((self.kernel_max * out).max(axis=1, keepdims=True) * inp).reshape(-1)

    def scaled_values(self) -> dict[str, np.ndarray]:
        """Weight (and bias) with the accumulated scales, in float64."""
        out, inp = self._scales()
        rows = self._rows()
        scaled = (self._grouped(rows) * out[..., None] * inp[..., None]).reshape(rows.shape)
        values = {self.weight.name: scaled.T if self.transposed else scaled}
        if self.bias is not None:
            values[self.bias.name] = self.bias.values.astype(np.float64) * self.out_scale
        return values


class ChainWeights:
    """The layers of the pairs and the per-channel scales between them; written as float32 once."""

    def __init__(self, pairs: list[LayerPair]) -> None:
        self.layers: dict[str, _Layer] = {}  # by weight name: unique, unlike node names
        for pair in pairs:
            for node in (pair.first, pair.second):
                self.layers.setdefault(node.inputs[1].name, _Layer(node))

    def layer(self, node: gs.Node) -> _Layer:
        return self.layers[node.inputs[1].name]

    def spread(self, node: gs.Node) -> float:  # of the output channels' weight ranges, as weight_spread
        return range_spread(self.layer(node).output_ranges())

    def rescale(self, pair: LayerPair, scale: np.ndarray) -> None:
        """Divide the first layer's output channel c by scale[c], multiply the second's input c by it."""
        self.layer(pair.first).out_scale /= scale
        self.layer(pair.second).in_scale *= scale

    def scaled_pair(self, pair: LayerPair) -> ScaledPair:
        """What the proof checks of ``pair``: the scales on the first layer's inputs and the second's outputs."""
        return ScaledPair(pair.first.outputs[0].name, pair.second.outputs[0].name,
                          self.layer(pair.first).in_scale, self.layer(pair.second).out_scale)

    def write(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """A copy of ``model`` with the scaled weights (cast to float32 once); nothing else changes."""
        values = {name: array for layer in self.layers.values() for name, array in layer.scaled_values().items()}
        out = onnx.ModelProto()
        out.CopyFrom(model)
        for init in out.graph.initializer:
            if init.name in values:
                init.CopyFrom(numpy_helper.from_array(values[init.name].astype(np.float32), init.name))
        return out


def balancing_scales(first_ranges: np.ndarray, second_ranges: np.ndarray) -> np.ndarray:
    """s_c = sqrt(r1_c / r2_c); 1 for a dead channel (a zero range on either side)."""
    alive = (first_ranges > 0) & (second_ranges > 0)
    return np.where(alive, np.sqrt(first_ranges / np.where(alive, second_ranges, 1.0)), 1.0)


def equalize_graph(model: onnx.ModelProto, prove: bool = True, probe_size: int = 32,
                   name: str = "the graph") -> tuple[onnx.ModelProto, EqualizeReport]:
    """Cross-layer equalization of every pair of consecutive layers it can equalize exactly, proven
    (``prove``) against ``model`` (called ``name`` in errors) with ONNX Runtime."""
    pairs, skipped = find_pairs(analysed_graph(model))
    weights = ChainWeights(pairs)
    touched = list({id(node): node for pair in pairs for node in (pair.first, pair.second)}.values())
    before = {node_label(node): weights.spread(node) for node in touched}
    sweeps = 0
    while pairs and sweeps < MAX_SWEEPS:
        sweeps += 1
        largest_step = 0.0
        for pair in pairs:
            scale = balancing_scales(weights.layer(pair.first).output_ranges(), weights.layer(pair.second).input_ranges())
            weights.rescale(pair, scale)
            largest_step = max(largest_step, float(np.abs(np.log(scale)).max()))
        if largest_step < math.log1p(TOLERANCE):
            break
    equalized = weights.write(model)
    scales = [1.0 / weights.layer(p.first).out_scale for p in pairs]  # the first's output channel c was divided by scale[c]
    report = EqualizeReport(
        [EqualizedPair(node_label(p.first), node_label(p.second), before[node_label(p.first)], weights.spread(p.first),
                       float(scale.min()), float(scale.max())) for p, scale in zip(pairs, scales)],
        skipped, sweeps,
        prove_pairs(model, equalized, [weights.scaled_pair(p) for p in pairs], probe_size, f"the equalized {name}", name)
        if prove and pairs else None,
        {node_label(node): (before[node_label(node)], weights.spread(node)) for node in touched})
    report.rescaled = _rescaled_tensors(pairs, weights)
    return equalized, report


def _rescaled_tensors(pairs: list[LayerPair], weights: ChainWeights) -> dict[str, np.ndarray] | None:
    """Every tensor from each pair's first layer to its second, with the factor equalization scales its
    channels by; None where shape inference left a rank unknown. The walk is :func:`_follow`'s: one
    reader each, up to the second layer."""
    rescaled = {}
    for pair in pairs:
        factor, tensor = weights.layer(pair.first).out_scale, pair.first.outputs[0]
        while True:
            if tensor.shape is None:
                return None
            rescaled[tensor.name] = factor.reshape((1, -1) + (1,) * (len(tensor.shape) - 2))
            reader = tensor.outputs[0]
            if reader is pair.second:
                break
            tensor = reader.outputs[0]
    return rescaled
