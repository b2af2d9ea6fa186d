"""Proving that an equalized graph computes its original's function, pair by pair.

Equalization changes only the weights of the layers it pairs: the first layer's output channel c is
divided by its scale, the second's input channel c multiplied by it, and a layer in two pairs (a
chain) carries the scales of both. So each pair's chain (first layer, the ops between, second
layer) satisfies equalized(x / s_in) = original(x) * s_out, with s_in the scales on the first layer's
input channels and s_out those on the second layer's outputs. Each pair is checked alone on that
identity: the original graph runs once in ONNX Runtime on seeded probes, capturing every pair's
input; both chains run in float64 with ONNX's reference runtime on the corner of the captured input
that fixes them (:func:`rvdeploy.probes.window_size`), and must agree within the budget of the
original chain's own float32 noise (ONNX Runtime float32 against float64,
:func:`rvdeploy.compare.compare_outputs`). Nothing else of the graph has to run in float64: an op
anywhere else that the reference runtime lacks (GridSample...) does not matter.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from rvdeploy.compare import Comparison, compare_outputs, worst
from rvdeploy.errors import QuantizeError, first_line
from rvdeploy.graph_edit import upstream_nodes
from rvdeploy.onnx_io import ort_session, run_session, run_with_values
from rvdeploy.probes import corner, probe_feeds


def _as_float64(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same graph computing in float64 (for ONNX's reference runtime; ONNX Runtime has no
    float64 Conv)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    float32, float64 = onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE
    tensors = [*out.graph.initializer, *(a.t for n in out.graph.node if n.op_type == "Constant" for a in n.attribute)]
    for tensor in tensors:
        if tensor.data_type == float32:
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float64), tensor.name))
    for value in (*out.graph.input, *out.graph.output, *out.graph.value_info):
        if value.type.tensor_type.elem_type == float32:
            value.type.tensor_type.elem_type = float64
    for attr in (a for n in out.graph.node if n.op_type == "Cast" for a in n.attribute):
        attr.i = float64 if attr.name == "to" and attr.i == float32 else attr.i
    return out


def _chain(model: onnx.ModelProto, first: onnx.NodeProto, second: onnx.NodeProto) -> onnx.ModelProto:
    """The subgraph from ``first``'s input to ``second``'s output: the layers and the ops between."""
    nodes = upstream_nodes(model, [second], stop_at=first)
    used = {name for node in nodes for name in node.input}
    graph = onnx.helper.make_graph(
        nodes, "pair", [onnx.helper.make_tensor_value_info(first.input[0], onnx.TensorProto.FLOAT, None)],
        [onnx.helper.make_tensor_value_info(second.output[0], onnx.TensorProto.FLOAT, None)],
        [init for init in model.graph.initializer if init.name in used])
    return onnx.helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)


def _window(x: np.ndarray, first: onnx.NodeProto) -> np.ndarray:
    """The corner of the first layer's input that fixes the pair (two fields of the first layer's
    kernel, 3x3 where its kernel_shape is not given)."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in first.attribute}
    spatial = x.ndim - 2
    return corner(x, attrs.get("kernel_shape", [3] * spatial), attrs.get("strides", [1] * spatial), attrs.get("dilations"),
                  fields=2)


@dataclass(frozen=True)
class ScaledPair:
    first: str  # the output tensor of the pair's first layer...
    second: str  # ...and of its second
    input_scale: np.ndarray  # on the first layer's input channels (1 where no pair before it)
    output_scale: np.ndarray  # on the second layer's output channels (1 where no pair after it)


def _per_channel(scale: np.ndarray, ndim: int) -> np.ndarray:
    return scale.reshape((1, -1) + (1,) * (ndim - 2))


def prove_pairs(original: onnx.ModelProto, changed: onnx.ModelProto, pairs: Sequence[ScaledPair],
                probe_size: int = 32, what: str = "the equalized graph",
                original_name: str = "the original graph") -> Comparison:
    """Each pair of ``changed`` (called ``what`` in errors) against the same pair of ``original``
    (``original_name``), on its input captured from ``original``; the worst pair's comparison, or
    :class:`QuantizeError` naming it."""
    from onnx.reference import ReferenceEvaluator

    nodes = {name: {out: n for n in graph.graph.node for out in n.output}
             for name, graph in (("original", original), ("changed", changed))}
    firsts = [nodes["original"][pair.first] for pair in pairs]
    feeds = probe_feeds(original, size=probe_size)
    captured = run_with_values(original, feeds, sorted({node.input[0] for node in firsts}), original_name)
    overflowing = next((o.name for o in original.graph.output if not np.isfinite(captured[o.name]).all()), None)
    if overflowing:
        raise QuantizeError(f"on probe inputs {original_name}'s output {overflowing} and maybe more tensors take NaN or infinite "
                            "values (are its weights finite?); it cannot be quantized")
    checks = []
    for pair in pairs:
        first = nodes["original"][pair.first]
        label = f"{first.name or pair.first} → {nodes['original'][pair.second].name or pair.second}"
        chains = {name: _chain(graph, nodes[name][pair.first], nodes[name][pair.second])
                  for name, graph in (("original", original), ("changed", changed))}
        x = _window(captured[first.input[0]], first)
        name = first.input[0]
        theirs = run_session(ort_session(chains["original"].SerializeToString(), name=original_name, optimize=False),
                             {name: x}, original_name)[0]
        x64 = x.astype(np.float64)
        try:
            exact = ReferenceEvaluator(_as_float64(chains["original"])).run(None, {name: x64})[0]
            scaled = ReferenceEvaluator(_as_float64(chains["changed"])).run(None, {name: x64 / _per_channel(pair.input_scale, x.ndim)})[0]
            ours = scaled / _per_channel(pair.output_scale, scaled.ndim)
        except Exception as exc:  # the reference runtime's own errors: an op it does not implement in float64
            raise QuantizeError(f"cannot check {what}: ONNX's reference runtime cannot run {label} in float64 "
                                f"({first_line(exc)})") from None
        checks.append(compare_outputs(ours, exact, theirs))
        if not checks[-1].passed:
            raise QuantizeError(f"{what} does not compute the original function: {label} differs by "
                                f"{checks[-1].max_rel_error:.3g} relative, over its float32 budget {checks[-1].budget_rel:.3g}")
    return worst(checks)
