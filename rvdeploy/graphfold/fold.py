"""Folding a whole graph: resolve constant aliases, evaluate what constants alone compute, then apply
every pattern until none applies."""

from __future__ import annotations

import math
import time
from collections import Counter

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from rvdeploy.graph_edit import export_like
from rvdeploy.graphfold.chains import fold_conv_chain
from rvdeploy.graphfold.constant_subgraphs import fold_constant_subgraphs
from rvdeploy.graphfold.constants import HeldValues, remove_constant_aliases, view_initializers
from rvdeploy.graphfold.parallel import fold_parallel
from rvdeploy.graphfold.patterns import fold_bn_gemm, fold_conv_bn
from rvdeploy.graphfold.pre_norm import fold_linear_norm, fold_pre_norm
from rvdeploy.graphfold.results import CONSTANT, FoldableGroup, GraphFoldReport, LeftAlone
from rvdeploy.graphfold.shapes import tensor_dims
from rvdeploy.graphfold.state import Folded, FoldState
from rvdeploy.onnx_io import LIGHT_COPY_ELEMENTS, read_metadata, write_metadata
from rvdeploy.onnx_weights import held_tensor

# Applied in this order each round: chains first, so that a branch is one node when groups are sought.
PATTERNS = (fold_conv_bn, fold_bn_gemm, fold_conv_chain, fold_linear_norm, fold_pre_norm, fold_parallel)


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    return dict(sorted(Counter(n.op_type for n in model.graph.node).items()))


def _fold_to_fixed_point(model: onnx.ModelProto, weights: dict | None = None) -> FoldState:
    """Every pattern applied to ``model``'s graph (imported, so ``model`` is not changed; ``weights``:
    its weights held apart) until none applies."""
    graph = gs.import_onnx(model)
    view_initializers(graph, model, weights)
    remove_constant_aliases(graph)
    evaluated = fold_constant_subgraphs(graph)
    graph.cleanup()
    state = FoldState(graph, lambda: tensor_dims(model))
    for output, nodes in evaluated:
        state.record(CONSTANT, output, nodes)
    while True:
        state.left_alone = {}  # only what the last round (the one that changed nothing) left holds
        changed = sum(pattern(state) for pattern in PATTERNS)
        graph.cleanup()
        if not changed:
            for folded in state.folded.values():
                folded.exact = None  # no fold follows; the float32 weights are in the graph
            return state


def _report(model: onnx.ModelProto, folded: onnx.ModelProto, state: FoldState, start: float) -> GraphFoldReport:
    return GraphFoldReport(
        folded=dict(sorted(state.counts.items())),
        ops_before=op_counts(model),
        ops_after=op_counts(folded),
        left_alone=list(state.left_alone.values()),
        seconds=time.perf_counter() - start,
        groups=list(state.groups),
    )


def _exported(state: FoldState, model: onnx.ModelProto) -> onnx.ModelProto:
    folded = export_like(state.graph, model)
    if read_metadata(folded).get("form") == "multi-branch":  # rvdeploy's --no-fuse export, folded here
        write_metadata(folded, {"form": "fused"})
    return folded


def fold_model(model: onnx.ModelProto) -> tuple[onnx.ModelProto, GraphFoldReport, dict[str, Folded]]:
    """The folded model, its report, and for each node a fold made in it (by output tensor) the
    original computation it replaces (what the proof checks). ``model`` itself is not changed;
    with nothing to fold the result is an unchanged copy."""
    start = time.perf_counter()
    state = _fold_to_fixed_point(model)
    if state.counts:
        folded = _exported(state, model)
    else:
        folded = onnx.ModelProto()
        folded.CopyFrom(model)
    return folded, _report(model, folded, state, start), state.folded


def fold_apart(model: onnx.ModelProto, weights: dict[str, np.ndarray]) \
        -> tuple[onnx.ModelProto, dict[str, np.ndarray], GraphFoldReport, dict[str, Folded]]:
    """:func:`fold_model` of a model whose weights are held apart (rvdeploy.onnx_weights): the
    folded model's weights are held apart too, returned beside it (the input's own arrays where a
    weight is unchanged, the fold's new ones where it made them): nothing is copied."""
    start = time.perf_counter()
    state = _fold_to_fixed_point(model, weights)
    if not state.counts:
        unchanged = onnx.ModelProto()
        unchanged.CopyFrom(model)
        return unchanged, dict(weights), _report(model, unchanged, state, start), state.folded
    folded_weights = {}
    for name, tensor in state.graph.tensors().items():
        if isinstance(tensor, gs.Constant) and tensor.dtype == np.float32 and math.prod(tensor.shape) > LIGHT_COPY_ELEMENTS:
            array = np.ascontiguousarray(tensor.values)  # a weight held apart is its array, not a copy
            folded_weights[name] = array
            tensor.values = HeldValues(held_tensor(name, array), array)
    folded = _exported(state, model)
    return folded, folded_weights, _report(model, folded, state, start), state.folded


def fold_graph(model: onnx.ModelProto) -> tuple[onnx.ModelProto, GraphFoldReport]:
    """Fold every foldable structure of ``model`` (pure: no proof, no I/O)."""
    folded, report, _ = fold_model(model)
    return folded, report


def find_foldable(model: onnx.ModelProto) -> tuple[list[FoldableGroup], list[LeftAlone]]:
    """What :func:`fold_graph` would fold (the first round and what the fixed point adds, nested
    folds included), and what looks foldable but would be left alone."""
    state = _fold_to_fixed_point(model)  # no export: a lint needs what would fold, not the folded graph
    return list(state.groups), list(state.left_alone.values())
