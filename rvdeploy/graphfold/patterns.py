"""The chain patterns: a Conv followed by BatchNormalization, and a BatchNormalization followed
by a Gemm (timm's BN-then-Linear heads). Each pattern is a function of the fold state that folds
every match it finds and returns how many; the parallel-branch pattern lives in ``parallel``."""

from __future__ import annotations

from rvdeploy.graph_edit import node_label, producer
from rvdeploy.graphfold.constants import single_reader
from rvdeploy.graphfold.linear import CONV, GEMM, AffineMap
from rvdeploy.graphfold.nodes import NotFoldable, read_batch_norm
from rvdeploy.graphfold.reference import Input
from rvdeploy.graphfold.results import BN_GEMM, CONV_BN
from rvdeploy.graphfold.state import FoldState


def _chain(state: FoldState, second_op: str, first_op: str):
    """(first, second) pairs where ``second`` reads ``first``'s output and nothing else does."""
    for second in list(state.graph.nodes):
        if second.op != second_op or not second.inputs or not second.outputs:
            continue
        first = producer(second.inputs[0])
        if first is None or first.op != first_op or not first.outputs:
            continue
        reader = single_reader(first.outputs[0], state.outputs)
        if reader is not second:
            others = [node_label(n) for n in first.outputs[0].outputs if n is not second]
            also = f"also read by {others[0]}" if others else "a graph output"
            state.leave(second, f"{first_op} {node_label(first)} feeds it but its output is {also}")
            continue
        yield first, second


def fold_conv_bn(state: FoldState) -> int:
    """``BN(Conv(x))`` → ``Conv'(x)``: ``W' = W * s``, ``b' = b * s + t`` with ``s, t`` the BN's scale and shift."""
    count = 0
    for conv_node, bn_node in _chain(state, "BatchNormalization", "Conv"):
        try:
            conv, weight, bias = state.conv(conv_node)
            bn = read_batch_norm(bn_node)
            if bn.gamma.shape[0] != weight.shape[0]:
                raise NotFoldable(f"{bn.gamma.shape[0]} BN channels after {weight.shape[0]} conv channels")
            reference = bn.reference(state.reference(conv_node))
        except NotFoldable as exc:
            state.leave(bn_node, f"conv+bn not folded: {exc}")
            continue
        scale, shift = bn.scale_shift()
        folded = AffineMap(CONV, weight * scale.reshape((-1,) + (1,) * (weight.ndim - 1)), bias * scale + shift,
                           conv.group, conv.strides)
        attrs = dict(conv_node.attrs)
        state.replace(CONV_BN, bn_node, [conv_node, bn_node], conv_node.name or bn_node.name, conv_node.inputs[0],
                      folded, conv.weight.dtype, reference, attrs=attrs)
        count += 1
    return count


def fold_bn_gemm(state: FoldState) -> int:
    """``Gemm(BN(x))`` → ``Gemm'(x)`` on 2-d inputs: ``W' = W * s`` (per input column), ``b' = b + W t``."""
    count = 0
    for bn_node, gemm_node in _chain(state, "Gemm", "BatchNormalization"):
        try:
            weight, bias = state.gemm(gemm_node)
            bn = read_batch_norm(bn_node)
            if bn.gamma.shape[0] != weight.shape[1]:
                raise NotFoldable(f"{bn.gamma.shape[0]} BN channels before a Gemm over {weight.shape[1]} inputs")
            reference = state.reference(gemm_node).on(bn.reference(Input()))
        except NotFoldable as exc:
            state.leave(gemm_node, f"bn+gemm not folded: {exc}")
            continue
        scale, shift = bn.scale_shift()
        folded = AffineMap(GEMM, weight * scale[None, :], bias + weight @ shift)
        state.replace(BN_GEMM, gemm_node, [bn_node, gemm_node], gemm_node.name or bn_node.name, bn_node.inputs[0],
                      folded, bn.gamma.dtype, reference)
        count += 1
    return count
