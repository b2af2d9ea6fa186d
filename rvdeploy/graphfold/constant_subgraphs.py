"""Values computed from constants alone (a gate ``sigmoid(alpha)`` gathered per channel, OREPA's
kernels generated from several initializers, a reshape target concatenated from constants) become
initializers before the patterns run, so that a fold sees a constant where the graph has a computation.

They are evaluated once by onnx's reference evaluator (``onnx.reference.ReferenceEvaluator``: numpy
implementations of the ONNX operators, written from the specification), in float64: every float32
value the subgraph starts from is widened first, and each result is rounded once to its own type.
Where the widened subgraph cannot be evaluated (an operator that insists on its input types), it is
evaluated in its own types instead.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx.reference import ReferenceEvaluator

from rvdeploy.graph_edit import node_label
from rvdeploy.graphfold.constants import constant_value

# Never evaluated: random, stateful or control-flow operators, and quantization, whose Q/DQ pairs
# are the precision of the graph and must stay nodes.
_KEPT_OPS = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli",
             "If", "Loop", "Scan", "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "Constant",
             "Identity"}
# A value is stored only when it is no larger than what it is computed from, or small: folding must
# not turn a cheap broadcast (Expand, Tile, ConstantOfShape) into a large initializer.
_SMALL = 1 << 16


def _evaluable(node: gs.Node, is_constant) -> bool:
    if node.op == "CastLike":  # reads its second input for the type alone (torch.export's zero biases)
        return len(node.inputs) == 2 and is_constant(node.inputs[0]) and node.inputs[1].dtype is not None
    return (node.op not in _KEPT_OPS and (node.domain or "ai.onnx") == "ai.onnx" and bool(node.inputs)
            and all(t.name == "" or is_constant(t) for t in node.inputs))


def _widened(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with every float32 initializer and Constant value in float64."""
    wide = onnx.ModelProto()
    wide.CopyFrom(model)
    tensors = list(wide.graph.initializer) + [a.t for n in wide.graph.node for a in n.attribute if a.name == "value"]
    for tensor in tensors:
        if tensor.data_type == onnx.TensorProto.FLOAT:
            tensor.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(tensor).astype(np.float64),
                                                         tensor.name))
    return wide


def _evaluate(graph: gs.Graph, nodes: list[gs.Node], wanted: list[gs.Tensor]) -> dict[str, np.ndarray]:
    """The values of ``wanted`` (outputs of ``nodes``), computed in float64 and rounded to their own
    types. ``nodes`` are evaluated as copies, their constant inputs given as initializers."""
    computed: dict[str, gs.Tensor] = {t.name: gs.Variable(t.name) for n in nodes for t in n.outputs}

    def mapped(tensor: gs.Tensor) -> gs.Tensor:
        if tensor.name == "":
            return tensor
        if tensor.name not in computed:  # one constant per name, however many nodes read it
            computed[tensor.name] = gs.Constant(tensor.name, constant_value(tensor))
        return computed[tensor.name]

    copies = [gs.Node("Cast", n.name, {"to": onnx.helper.np_dtype_to_tensor_dtype(np.dtype(n.inputs[1].dtype))},
                      [mapped(n.inputs[0])], [computed[t.name] for t in n.outputs])
              if n.op == "CastLike" else
              gs.Node(n.op, n.name, dict(n.attrs), [mapped(t) for t in n.inputs], [computed[t.name] for t in n.outputs],
                      domain=n.domain) for n in nodes]
    names = [t.name for t in wanted]
    exported = gs.export_onnx(gs.Graph(nodes=copies, outputs=[computed[name] for name in names], opset=graph.opset,
                                       import_domains=graph.import_domains), do_type_check=False)
    try:
        native = dict(zip(names, ReferenceEvaluator(exported).run(names, {})))
    except Exception:  # noqa: BLE001 - an operator the reference lacks: the values stay computed at run time
        return {}
    try:
        wide = dict(zip(names, ReferenceEvaluator(_widened(exported)).run(names, {})))
    except Exception:  # noqa: BLE001 - an operator that will not take float64: its own types are exact too
        return native
    return {name: np.asarray(wide[name]).astype(np.asarray(native[name]).dtype) for name in names}


def fold_constant_subgraphs(graph: gs.Graph) -> list[tuple[str, tuple[str, ...]]]:
    """Replace every value computed only from constants by an initializer (in place); returns, for
    each value stored, its tensor name and the nodes that computed it. The nodes are left without
    readers for :meth:`gs.Graph.cleanup`."""
    constant: dict[str, float] = {}  # computed-from-constants tensor → elements of the constants behind it

    def is_constant(tensor: gs.Tensor) -> bool:
        return tensor.name in constant or constant_value(tensor) is not None

    def source_size(tensor: gs.Tensor) -> float:
        if tensor.name in constant:
            return constant[tensor.name]
        value = constant_value(tensor) if tensor.name else None
        return 0 if value is None else value.size

    computing: list[gs.Node] = []
    for node in graph.nodes:  # in graph order, so a node's constant inputs are known before it
        if _evaluable(node, is_constant):
            size = sum(source_size(t) for t in node.inputs)
            computing.append(node)
            constant.update({t.name: size for t in node.outputs})
    if not computing:
        return []
    outputs = {t.name for t in graph.outputs}
    frontier = [t for n in computing for t in n.outputs
                if t.name and t.name not in outputs and any(not _evaluable(r, is_constant) for r in t.outputs)]
    if not frontier:
        return []
    values = _evaluate(graph, computing, frontier)
    stored = [t for t in frontier if t.name in values and values[t.name].size <= max(_SMALL, constant[t.name])]
    made_by = [tuple(node_label(n) for n in _behind(t, is_constant)) for t in stored]
    for tensor in stored:
        replacement = gs.Constant(tensor.name, np.ascontiguousarray(values[tensor.name]))
        for reader in list(tensor.outputs):
            for index, read in enumerate(reader.inputs):
                if read is tensor:
                    reader.inputs[index] = replacement
        tensor.inputs.clear()  # its name is the initializer's now
    return [(t.name, nodes) for t, nodes in zip(stored, made_by)]


def _behind(tensor: gs.Tensor, is_constant) -> list[gs.Node]:
    """The evaluated nodes that ``tensor``'s value was computed by."""
    found, pending, seen = [], [tensor], set()
    while pending:
        t = pending.pop()
        node = t.inputs[0] if len(t.inputs) == 1 else None
        if node is None or id(node) in seen or not _evaluable(node, is_constant):
            continue
        seen.add(id(node))
        found.append(node)
        pending += list(node.inputs)
    return found[::-1]
