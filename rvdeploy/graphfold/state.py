"""The graph being folded and what the folds have done to it so far.

Every fold replaces some nodes by one Conv or Gemm with constant weights and remembers, for the
node it made, the exact (float64) weights and the original computation it replaces, so a later
fold that takes the node in keeps float64 arithmetic and the proof checks against the input graph.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from rvdeploy.graphfold.constants import constant_value
from rvdeploy.graphfold.linear import GEMM, AffineMap
from rvdeploy.graph_edit import node_label
from rvdeploy.graphfold.nodes import ConvNode, read_conv, read_gemm
from rvdeploy.graphfold.reference import Expr, GemmRef, Input
from rvdeploy.graphfold.results import FoldableGroup, LeftAlone

# What a later fold can read a folded node through (a sum, a norm, a linear map, a reshape, a scale
# by a constant). A node read by nothing else (by a ReLU, or gated by an SE) is never folded again,
# and its float64 weights are not kept.
FOLDABLE_READERS = frozenset({"Add", "Sub", "Sum", "BatchNormalization", "Conv", "Gemm", "MatMul", "AveragePool",
                              "Reshape", "Flatten", "Transpose", "Identity"})


def _may_fold_through(reader: gs.Node) -> bool:
    if reader.op in ("Mul", "Div"):
        return any(constant_value(t) is not None for t in reader.inputs)
    return reader.op in FOLDABLE_READERS


@dataclass(frozen=True)
class Relation:
    """What the input graph's tensor ``tensor`` is as a function of the folded graph's tensor the
    fold reads (its channels on the axis :attr:`Folded.tokens`): ``function`` of it, in which
    averages of up to ``taps`` values were taken in another order; ``axis``: the channels' axis in
    ``tensor``. ``source`` (channels on axis 1, or last for a MatMul's input) is where the two graphs
    part: what they compute there may differ by float32 rounding upstream."""

    tensor: str
    axis: int
    source: str
    function: Expr
    taps: int = 1


@dataclass
class Folded:
    """A node a fold made: its kind and name, the tensor it reads, the original computation it
    replaces (a function of that tensor) and its float64 weights. ``tokens``: the node is a MatMul
    (+ bias) on that axis of its input, which the folded graph computes (a fold that moved a norm
    past it) and ``relation`` ties to the input graph."""

    kind: str
    name: str
    input: str
    reference: Expr
    exact: AffineMap | None  # while folds may follow
    tokens: int | None = None
    relation: Relation | None = None


class FoldState:
    def __init__(self, graph: gs.Graph, dims: Callable[[], dict[str, tuple]] = dict):
        self.graph = graph
        self._find_dims = dims
        self._dims: dict[str, tuple] | None = None
        self.outputs = {t.name for t in graph.outputs}
        self._names = set(graph.tensors())
        self.folded: dict[str, Folded] = {}  # output tensor of a node a fold made → what it replaces
        self.groups: list[FoldableGroup] = []
        self.counts: Counter[str] = Counter()
        self.left_alone: dict[str, LeftAlone] = {}  # this round's, by node

    def leave(self, node: gs.Node, reason: str) -> None:
        label = node_label(node)
        self.left_alone.setdefault(label, LeftAlone(label, reason))

    # -- the weights and the original computation of a node -------------------------------------
    def conv(self, node: gs.Node) -> tuple[ConvNode, np.ndarray, np.ndarray]:
        """The Conv ``node`` (NotFoldable when it cannot be folded) and its float64 weight and bias."""
        conv = read_conv(node)
        made = self.folded.get(node.outputs[0].name)
        if made is not None and made.exact is not None:  # else its float32 weights, as for any node
            return conv, made.exact.weight, made.exact.bias
        bias = np.zeros(conv.weight.shape[0]) if conv.bias is None else np.asarray(conv.bias, np.float64)
        return conv, np.array(conv.weight, np.float64), bias  # a copy of its own: a merge may scale it in place

    def gemm(self, node: gs.Node) -> tuple[np.ndarray, np.ndarray]:
        """The Gemm ``node``'s float64 weight [N, K] and bias [N]."""
        made = self.folded.get(node.outputs[0].name)
        if made is not None and made.exact is not None:
            return made.exact.weight, made.exact.bias
        weight, bias = read_gemm(node)
        return weight, np.zeros(weight.shape[0]) if bias is None else bias

    def reference(self, node: gs.Node) -> Expr:
        """What ``node`` computes in terms of the input graph's nodes, as a function of its input."""
        made = self.folded.get(node.outputs[0].name)
        if made is not None:
            return made.reference
        if node.op == "Conv":
            return read_conv(node).reference(Input())
        weight, bias = read_gemm(node)
        return GemmRef(Input(), weight, bias)

    def dims(self, tensor: gs.Tensor) -> tuple | None:
        """``tensor``'s shape where shape inference on the input graph found it (computed once, when first asked)."""
        if self._dims is None:
            self._dims = self._find_dims()
        return self._dims.get(tensor.name)

    # -- rewriting -------------------------------------------------------------------------------
    def constant(self, base: str, values: np.ndarray) -> gs.Constant:
        """A new constant named ``base`` (made unique)."""
        name, n = base, 0
        while name in self._names:
            n += 1
            name = f"{base}_{n}"
        self._names.add(name)
        return gs.Constant(name, np.ascontiguousarray(values))

    def replace(self, kind: str, anchor: gs.Node, removed: list[gs.Node], name: str, source: gs.Tensor,
                folded: AffineMap, dtype: np.dtype, reference: Expr, attrs: dict | None = None) -> gs.Node:
        """Put one Conv (or Gemm) computing ``folded`` on ``source`` where ``anchor`` was, writing
        ``anchor``'s output; ``removed`` (``anchor`` included) read nothing more and are cleaned up."""
        output = anchor.outputs[0]
        labels = tuple(node_label(n) for n in removed)
        for node in removed:
            if node.outputs:  # a node made by an earlier fold is now part of this one
                self.folded.pop(node.outputs[0].name, None)
            node.outputs.clear()
        weight = self.constant(f"{name}.weight", folded.weight.astype(dtype))
        bias = self.constant(f"{name}.bias", folded.bias.astype(dtype))
        if folded.kind == GEMM:
            op, attrs = "Gemm", {"transB": 1}
        else:
            op = "Conv"
            if attrs is None:
                kh, kw = folded.weight.shape[2:]
                (rh, rw) = folded.dilations
                attrs = {"dilations": [rh, rw], "group": folded.groups, "kernel_shape": [kh, kw],
                         "pads": [rh * (kh - 1) // 2, rw * (kw - 1) // 2] * 2, "strides": list(folded.strides)}
        node = gs.Node(op, name=name, attrs=attrs, inputs=[source, weight, bias], outputs=[output])
        nodes = self.graph.nodes
        nodes[next(i for i, n in enumerate(nodes) if n is anchor)] = node  # its place keeps the order topological
        foldable_again = any(_may_fold_through(r) for r in output.outputs)
        if foldable_again:
            folded.weight.flags.writeable = False  # kept for a later fold, which reads it
        self.folded[output.name] = Folded(kind, name, source.name, reference, folded if foldable_again else None)
        self.record(kind, output.name, labels)
        return node

    def insert_after(self, anchor: gs.Node, node: gs.Node) -> None:
        index = next(i for i, n in enumerate(self.graph.nodes) if n is anchor)
        self.graph.nodes.insert(index + 1, node)

    def bypass(self, node: gs.Node) -> None:
        """Its readers read its first input instead; it then reads nothing more and is cleaned up."""
        output, source = node.outputs[0], node.inputs[0]
        for reader in list(output.outputs):
            for index, tensor in enumerate(reader.inputs):
                if tensor is output:
                    reader.inputs[index] = source
        node.outputs.clear()

    def record(self, kind: str, output: str, nodes: tuple[str, ...]) -> None:
        self.groups.append(FoldableGroup(kind, output, nodes))
        self.counts[kind] += 1

