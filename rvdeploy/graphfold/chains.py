"""Linear nodes in sequence: a chain of Conv, BatchNormalization and AveragePool nodes, each read
only by the next, is one convolution where the composition is exact.

Two convolutions compose into one when one of them is a 1x1 conv of stride 1 without padding; the
result has the other's geometry. A shift (a bias, a BatchNormalization's) before a zero-padded
conv does not compose: at the borders the padded conv sees zeros, where the one conv would see the
shift. An AveragePool that counts its padding is a depthwise conv with weights 1/(kh*kw).

Alone, a chain folds (:func:`fold_conv_chain`) only where the one conv does no more multiply-adds
than the two did (a depthwise k x k followed by a pointwise 1x1 stays two convs); as a branch of a
sum (rvdeploy.graphfold.parallel) it always folds, since the sum's conv is as large anyway.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from rvdeploy.graph_edit import node_label, producer
from rvdeploy.graphfold.constants import single_reader
from rvdeploy.graphfold.linear import CONV, AffineMap, compose, composed_multiply_adds, diagonal_map, multiply_adds
from rvdeploy.graphfold.nodes import ConvNode, NotFoldable, read_batch_norm, read_conv
from rvdeploy.graphfold.reference import AvgPoolRef, Expr, Input
from rvdeploy.graphfold.results import CONV_CHAIN, PRE_BN
from rvdeploy.graphfold.state import FoldState

CHAIN_OPS = ("Conv", "BatchNormalization", "AveragePool")


@dataclass(frozen=True)
class Step:
    """Linear nodes as one conv: the map, its ONNX pads (begins, then ends), and the original
    computation (a function of the chain's input)."""

    map: AffineMap
    pads: tuple[int, int, int, int]
    reference: Expr
    label: str

    @property
    def is_pointwise(self) -> bool:
        return self.map.weight.shape[2:] == (1, 1) and self.map.strides == (1, 1) and not any(self.pads)

    def centred_problem(self) -> str | None:
        """Why this conv does not pad like a "same" conv with a centred odd kernel (what merging
        into a larger kernel needs), or None."""
        kernel = self.map.weight.shape[2:]
        if any(k % 2 == 0 for k in kernel):
            return f"{self.label}: an even kernel {kernel[0]}x{kernel[1]} has no centre"
        centred = tuple(r * (k - 1) // 2 for r, k in zip(self.map.dilations, kernel)) * 2
        return None if self.pads == centred else \
            f"{self.label}: pads {list(self.pads)} are not centred ({list(centred)} for its kernel and dilation)"


def _spatial_2d(values, what: str, label: str) -> tuple[int, int]:
    if len(values) != 2:
        raise NotFoldable(f"{label}: a {len(values)}-d {what} (only 2-d ones are folded)")
    return tuple(int(v) for v in values)


def conv_pads(conv: ConvNode, label: str) -> tuple[int, int, int, int]:
    """The pads ``conv`` applies, whatever the input size; NotFoldable where they depend on it."""
    kernel = _spatial_2d(conv.weight.shape[2:], "convolution", label)
    if conv.auto_pad == "VALID":
        return (0, 0, 0, 0)
    if conv.auto_pad.startswith("SAME"):
        if any(s != 1 for s in conv.strides):
            raise NotFoldable(f"{label}: auto_pad {conv.auto_pad} with stride {list(conv.strides)} pads by input size")
        totals = [d * (k - 1) for d, k in zip(conv.dilations, kernel)]
        small = [t // 2 for t in totals]
        big = [t - s for t, s in zip(totals, small)]
        return tuple(small + big) if conv.auto_pad == "SAME_UPPER" else tuple(big + small)
    return tuple(int(p) for p in conv.pads)


def input_channels(node: gs.Node) -> int | None:
    """The channels a Conv or BatchNormalization reads (None for an AveragePool: any), without
    converting its weights."""
    if node.op == "Conv":
        conv = read_conv(node)
        return conv.weight.shape[1] * conv.group
    return read_batch_norm(node).gamma.shape[0] if node.op == "BatchNormalization" else None


def read_step(state: FoldState, node: gs.Node, channels: int | None) -> Step:
    """``node`` (a Conv, BatchNormalization or AveragePool) as a step; ``channels``: its input's
    channels where known (an AveragePool needs them)."""
    label = node_label(node)
    if node.op == "Conv":
        conv, weight, bias = state.conv(node)
        pads = conv_pads(conv, label)
        conv_map = AffineMap(CONV, weight, bias, conv.group, _spatial_2d(conv.strides, "stride", label),
                             _spatial_2d(conv.dilations, "dilation", label))
        return Step(conv_map, pads, state.reference(node), label)
    if node.op == "BatchNormalization":
        bn = read_batch_norm(node)
        return Step(diagonal_map(CONV, *bn.scale_shift()), (0, 0, 0, 0), bn.reference(Input()), label)
    attrs = node.attrs
    if not attrs.get("count_include_pad", 0) and any(attrs.get("pads", [])):
        raise NotFoldable(f"{label}: count_include_pad=0 divides border pixels by fewer taps (not a convolution)")
    if attrs.get("ceil_mode", 0) or attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise NotFoldable(f"{label}: ceil_mode or auto_pad makes its output size depend on the input's")
    if any(d != 1 for d in attrs.get("dilations", [])):
        raise NotFoldable(f"{label}: a dilated AveragePool")
    if channels is None:
        raise NotFoldable(f"{label}: its channel count is not known from a conv beside it")
    kernel = _spatial_2d(attrs["kernel_shape"], "pool", label)
    strides = _spatial_2d(attrs.get("strides", [1, 1]), "stride", label)
    pads = tuple(int(p) for p in attrs.get("pads", [0, 0, 0, 0]))
    if attrs.get("auto_pad") == "VALID":
        pads = (0, 0, 0, 0)
    weight = np.full((channels, 1) + kernel, 1.0 / (kernel[0] * kernel[1]))
    pool = AffineMap(CONV, weight, np.zeros(channels), channels, strides)
    return Step(pool, pads, AvgPoolRef(Input(), kernel, strides, pads), label)


def then(inner: Step, outer: Step) -> Step:
    """``outer(inner(x))`` as one step; NotFoldable where that is not exact."""
    if inner.map.out_channels != outer.map.in_channels:
        raise NotFoldable(f"{outer.label} reads {outer.map.in_channels} channels, {inner.label} writes "
                          f"{inner.map.out_channels}")
    reference = outer.reference.on(inner.reference)
    label = f"{inner.label} → {outer.label}"
    if inner.is_pointwise:
        if any(outer.pads) and np.any(inner.map.bias != 0):
            raise NotFoldable(f"the shift of {inner.label} would reach the zero-padded border of {outer.label}, "
                              f"which sees zeros there (pads {list(outer.pads)})")
        return Step(compose(outer.map, inner.map, inner_is_pointwise=True), outer.pads, reference, label)
    if outer.is_pointwise:
        return Step(compose(outer.map, inner.map, inner_is_pointwise=False), inner.pads, reference, label)
    raise NotFoldable(f"{outer.label} ({'x'.join(map(str, outer.map.weight.shape[2:]))}, pads {list(outer.pads)}) "
                      f"after {inner.label} (neither is a 1x1 of stride 1 without padding): at the borders it is "
                      "not one convolution")


def conv_attrs(step: Step) -> dict:
    kh, kw = step.map.weight.shape[2:]
    return {"dilations": list(step.map.dilations), "group": step.map.groups, "kernel_shape": [kh, kw],
            "pads": list(step.pads), "strides": list(step.map.strides)}


def fold_conv_chain(state: FoldState) -> int:
    """``Conv(Conv(x))`` and ``Conv(BN(x))`` → ``Conv'(x)`` where exact and no costlier."""
    count = 0
    for outer_node in list(state.graph.nodes):
        if outer_node.op != "Conv" or not outer_node.inputs or not outer_node.outputs:
            continue
        inner_node = producer(outer_node.inputs[0])
        if inner_node is None or inner_node.op not in ("Conv", "BatchNormalization") or not inner_node.inputs:
            continue
        if single_reader(inner_node.outputs[0], state.outputs) is not outer_node:
            continue  # the inner node's output is needed elsewhere: nothing to save
        try:
            inner = read_step(state, inner_node, None)
            outer = read_step(state, outer_node, inner.map.out_channels)
            if inner_node.op == "Conv" and (inner.is_pointwise or outer.is_pointwise):
                one = composed_multiply_adds(outer.map, inner.map, inner.is_pointwise)
                two = multiply_adds(outer.map) + multiply_adds(inner.map) * (
                    int(np.prod(outer.map.strides)) if inner.is_pointwise else 1)
                if one > two:
                    continue  # a depthwise conv and a pointwise one are cheaper than the dense conv they make
            step = then(inner, outer)
        except NotFoldable as exc:
            state.leave(outer_node, f"{inner_node.op}+conv not folded: {exc}")
            continue
        kind = PRE_BN if inner_node.op == "BatchNormalization" else CONV_CHAIN
        dtype = state.conv(outer_node)[0].weight.dtype
        state.replace(kind, outer_node, [inner_node, outer_node], outer_node.name or inner_node.name,
                      inner_node.inputs[0], step.map, dtype, step.reference, attrs=conv_attrs(step))
        count += 1
    return count
