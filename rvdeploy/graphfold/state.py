"""The graph being folded and what the folds have done to it so far.

Every fold replaces some nodes by one Conv or Gemm with constant weights and remembers, for the
node it made, the exact (float64) weights and the original computation it replaces, so a later
fold that takes the node in keeps float64 arithmetic and the proof checks against the input graph.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from rvdeploy.graphfold.linear import GEMM, AffineMap
from rvdeploy.graph_edit import node_label
from rvdeploy.graphfold.nodes import ConvNode, read_conv, read_gemm
from rvdeploy.graphfold.reference import Expr, GemmRef, Input
from rvdeploy.graphfold.results import FoldableGroup, LeftAlone


@dataclass
class Folded:
    """A node a fold made: its kind and name, the tensor it reads, the original computation it
    replaces (a function of that tensor) and its float64 weights."""

    kind: str
    name: str
    input: str
    reference: Expr
    exact: AffineMap


class FoldState:
    def __init__(self, graph: gs.Graph):
        self.graph = graph
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
        if made is not None:
            return conv, made.exact.weight, made.exact.bias
        bias = np.zeros(conv.weight.shape[0]) if conv.bias is None else np.asarray(conv.bias, np.float64)
        return conv, np.asarray(conv.weight, np.float64), bias

    def gemm(self, node: gs.Node) -> tuple[np.ndarray, np.ndarray]:
        """The Gemm ``node``'s float64 weight [N, K] and bias [N]."""
        made = self.folded.get(node.outputs[0].name)
        if made is not None:
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

    # -- rewriting -------------------------------------------------------------------------------
    def _constant(self, base: str, values: np.ndarray) -> gs.Constant:
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
        weight = self._constant(f"{name}.weight", folded.weight.astype(dtype))
        bias = self._constant(f"{name}.bias", folded.bias.astype(dtype))
        if folded.kind == GEMM:
            op, attrs = "Gemm", {"transB": 1}
        else:
            op = "Conv"
            if attrs is None:
                kh, kw = folded.weight.shape[2:]
                attrs = {"dilations": [1, 1], "group": folded.groups, "kernel_shape": [kh, kw],
                         "pads": [(kh - 1) // 2, (kw - 1) // 2] * 2, "strides": list(folded.strides)}
        node = gs.Node(op, name=name, attrs=attrs, inputs=[source, weight, bias], outputs=[output])
        nodes = self.graph.nodes
        nodes[next(i for i, n in enumerate(nodes) if n is anchor)] = node  # its place keeps the order topological
        self.folded[output.name] = Folded(kind, name, source.name, reference, folded)
        self.groups.append(FoldableGroup(kind, output.name, labels))
        self.counts[kind] += 1
        return node

