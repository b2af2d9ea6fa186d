"""Seeing through the ways exporters hand weights to a node: initializers, Constant nodes, and
Identity aliases (the TorchScript exporter aliases equal parameters through Identity nodes)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

# Constant's value attributes other than ``value`` (a tensor), and the dtype each stands for.
_CONSTANT_LISTS = {"value_float": np.float32, "value_floats": np.float32, "value_int": np.int64,
                   "value_ints": np.int64}


def _constant_node_value(node: gs.Node) -> np.ndarray | None:
    for key, value in node.attrs.items():
        if key == "value" and isinstance(value, gs.Constant):
            return value.values
        if key in _CONSTANT_LISTS:
            return np.asarray(value, dtype=_CONSTANT_LISTS[key])
    return None


def constant_source(tensor: gs.Tensor) -> gs.Tensor | None:
    """The tensor that holds ``tensor``'s value when it is a constant (itself, or the initializer or
    Constant output behind a chain of Identity nodes); None when it is computed at run time."""
    seen = 0
    while seen < 1000:  # a chain of aliases, never a cycle in a valid graph
        if isinstance(tensor, gs.Constant):
            return tensor
        producer = tensor.inputs[0] if len(tensor.inputs) == 1 else None
        if producer is None:
            return None
        if producer.op == "Constant":
            return tensor if _constant_node_value(producer) is not None else None
        if producer.op != "Identity" or not producer.inputs:
            return None
        tensor, seen = producer.inputs[0], seen + 1
    return None


def constant_value(tensor: gs.Tensor | None) -> np.ndarray | None:
    """``tensor``'s value when it is a constant (see :func:`constant_source`), else None."""
    source = constant_source(tensor) if tensor is not None else None
    if source is None:
        return None
    if isinstance(source, gs.Constant):
        return source.values
    return _constant_node_value(source.inputs[0])


def remove_constant_aliases(graph: gs.Graph) -> int:
    """Point every reader of an Identity that only aliases a constant at the constant itself; the
    Identity then reads nothing and :meth:`gs.Graph.cleanup` drops it (one that writes a graph
    output stays). Returns how many Identity nodes were bypassed."""
    outputs = {t.name for t in graph.outputs}
    bypassed = 0
    for node in graph.nodes:
        if node.op != "Identity" or not node.outputs or node.outputs[0].name in outputs:
            continue
        source = constant_source(node.inputs[0]) if node.inputs else None
        if source is None:
            continue
        alias = node.outputs[0]
        for reader in list(alias.outputs):
            for index, tensor in enumerate(reader.inputs):
                if tensor is alias:
                    reader.inputs[index] = source
        node.outputs.clear()
        bypassed += 1
    return bypassed


def single_reader(tensor: gs.Tensor, graph_outputs: set[str]) -> gs.Node | None:
    """The only node that reads ``tensor``, when exactly one does and it is no graph output."""
    if tensor.name in graph_outputs or len(tensor.outputs) != 1:
        return None
    return tensor.outputs[0]


_VIEWABLE = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.INT8,
                       onnx.TensorProto.UINT8, onnx.TensorProto.INT32, onnx.TensorProto.INT64, onnx.TensorProto.BOOL})


class _ViewedValues(LazyValues):
    """An initializer's values as a read-only view of the one copy of its raw data that protobuf
    hands out (graphsurgeon's own load copies it again): a graph's weights cost their size once. No
    fold writes into a weight; it makes new arrays."""

    def load(self):
        if self.tensor.HasField("raw_data") and self.tensor.data_type in _VIEWABLE:
            return onnx.numpy_helper.to_array(self.tensor)
        return super().load()


class HeldValues(LazyValues):
    """The values of an initializer held apart (rvdeploy.onnx_weights): its array. Exported, it is
    its initializer as it stands, without data."""

    def __init__(self, tensor: onnx.TensorProto, array: np.ndarray):
        super().__init__(tensor)
        self.array = array

    def load(self):
        return self.array


def view_initializers(graph: gs.Graph, model: onnx.ModelProto, weights: dict | None = None) -> None:
    """Make ``graph``'s initializers (imported from ``model``) load as :class:`_ViewedValues`, or
    as :class:`HeldValues` where ``weights`` holds them apart."""
    initializers = {t.name: t for t in model.graph.initializer}
    for name, tensor in graph.tensors().items():
        if isinstance(tensor, gs.Constant) and name in initializers:
            held = weights.get(name) if weights else None
            tensor.values = _ViewedValues(initializers[name]) if held is None else HeldValues(initializers[name], held)
