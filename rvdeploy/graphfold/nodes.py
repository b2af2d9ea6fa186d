"""Reading Conv, Gemm and BatchNormalization nodes: their constant inputs, their attributes, and
the reasons one cannot be folded."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from rvdeploy.graph_edit import node_label
from rvdeploy.graphfold.constants import constant_value
from rvdeploy.graphfold.linear import bn_scale_shift
from rvdeploy.graphfold.reference import BatchNormRef, ConvRef, Expr


class NotFoldable(Exception):
    """A node that cannot take part in a fold; the message says why."""


def _input(node: gs.Node, index: int) -> gs.Tensor | None:
    if index >= len(node.inputs) or node.inputs[index].name == "":  # "" is an omitted optional input
        return None
    return node.inputs[index]


def _constant(node: gs.Node, index: int, what: str) -> np.ndarray | None:
    tensor = _input(node, index)
    if tensor is None:
        return None
    value = constant_value(tensor)
    if value is None:
        raise NotFoldable(f"{node_label(node)}: its {what} ({tensor.name}) is computed at run time")
    if value.dtype.kind != "f":
        raise NotFoldable(f"{node_label(node)}: its {what} is {value.dtype}, not floating point")
    return value


@dataclass(frozen=True)
class ConvNode:
    """A Conv with constant weights: weight, optional bias and its geometry (ONNX defaults filled in)."""

    weight: np.ndarray
    bias: np.ndarray | None
    strides: tuple[int, ...]
    pads: tuple[int, ...]
    dilations: tuple[int, ...]
    group: int
    auto_pad: str

    def reference(self, inner: Expr) -> ConvRef:
        return ConvRef(inner, self.weight, self.bias, self.strides, self.pads, self.dilations, self.group, self.auto_pad)


def read_conv(node: gs.Node) -> ConvNode:
    weight = _constant(node, 1, "weight")
    if weight is None or weight.ndim < 3:
        raise NotFoldable(f"{node_label(node)}: no usable weight")
    spatial = weight.ndim - 2
    attrs = node.attrs
    return ConvNode(
        weight=weight,
        bias=_constant(node, 2, "bias"),
        strides=tuple(attrs.get("strides", [1] * spatial)),
        pads=tuple(attrs.get("pads", [0] * 2 * spatial)),
        dilations=tuple(attrs.get("dilations", [1] * spatial)),
        group=int(attrs.get("group", 1)),
        auto_pad=attrs.get("auto_pad", "NOTSET") or "NOTSET",
    )


def read_gemm(node: gs.Node) -> tuple[np.ndarray, np.ndarray | None]:
    """A Gemm with a constant B as (weight [N, K] float64 with alpha applied, bias [N] with beta, or None)."""
    if node.attrs.get("transA", 0):
        raise NotFoldable(f"{node_label(node)}: transA=1")
    weight = _constant(node, 1, "weight")
    if weight is None or weight.ndim != 2:
        raise NotFoldable(f"{node_label(node)}: no usable weight")
    weight = np.asarray(weight, np.float64) * float(node.attrs.get("alpha", 1.0))
    if not node.attrs.get("transB", 0):
        weight = weight.T
    bias = _constant(node, 2, "bias")
    if bias is not None:
        if bias.size not in (1, weight.shape[0]) or bias.ndim > 2 or (bias.ndim == 2 and bias.shape[0] != 1):
            raise NotFoldable(f"{node_label(node)}: its bias {list(bias.shape)} is not one value per output")
        bias = np.broadcast_to(np.asarray(bias, np.float64).reshape(-1), weight.shape[:1]) * float(node.attrs.get("beta", 1.0))
    return weight, bias


@dataclass(frozen=True)
class BatchNormNode:
    gamma: np.ndarray
    beta: np.ndarray
    mean: np.ndarray
    var: np.ndarray
    eps: float

    def scale_shift(self) -> tuple[np.ndarray, np.ndarray]:
        return bn_scale_shift(self.gamma, self.beta, self.mean, self.var, self.eps)

    def reference(self, inner: Expr) -> BatchNormRef:
        return BatchNormRef(inner, self.gamma, self.beta, self.mean, self.var, self.eps)


def read_batch_norm(node: gs.Node) -> BatchNormNode:
    """An inference-mode BatchNormalization with constant parameters."""
    if node.attrs.get("training_mode", 0) or len([t for t in node.outputs if t.name]) > 1:
        raise NotFoldable(f"{node_label(node)}: training mode")
    values = [_constant(node, i, what) for i, what in enumerate(("input", "scale", "bias", "mean", "var")) if i]
    if any(v is None for v in values) or len({v.shape for v in values}) != 1 or values[0].ndim != 1:
        raise NotFoldable(f"{node_label(node)}: its parameters are not four constant vectors of one length")
    if not all(np.isfinite(v).all() for v in values):
        raise NotFoldable(f"{node_label(node)}: its parameters hold NaN or infinite values")
    bn = BatchNormNode(*values, eps=float(node.attrs.get("epsilon", 1e-5)))
    try:
        bn.scale_shift()
    except ValueError as exc:
        raise NotFoldable(f"{node_label(node)}: {exc}") from None
    return bn

