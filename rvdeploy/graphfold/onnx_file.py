"""Folding an ONNX file: load (external data included), fold, prove, and write atomically."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import onnx

from rvdeploy.errors import OutputError, first_line
from rvdeploy.graphfold.fold import fold_apart
from rvdeploy.graphfold.proof import input_graph_values, prove
from rvdeploy.graphfold.results import GraphFoldError, GraphFoldOptions, GraphFoldProof, GraphFoldReport
from rvdeploy.onnx_weights import read_apart, write_apart


def _full_check(check):
    """``check()``, with onnx's full-check failure as GraphFoldError (nothing is written)."""
    try:
        return check()
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise GraphFoldError(f"the folded graph fails onnx's full check, nothing written: {first_line(exc)}") from None


def _proven(model: onnx.ModelProto, folded: onnx.ModelProto, folds: dict, options: GraphFoldOptions, source: Path,
            input_values, weights: dict, folded_weights: dict) -> GraphFoldProof:
    """The proof; GraphFoldError naming the worst group when it fails (nothing is written then)."""
    proof = prove(model, folded, folds, options, input_values, weights, folded_weights)
    if not proof.passed:
        failing = [g for g in proof.groups if not g.passed]
        worst = max(failing, key=lambda g: g.ratio)
        raise GraphFoldError(
            f"graph fold self-check failed for {source.name}: group {worst.name} ({worst.kind}) differs from "
            f"the nodes it replaces by {worst.max_error:.3g}, {worst.ratio:.3g}x its float32 budget "
            f"{worst.budget:.3g} ({len(failing)} of {len(proof.groups)} groups fail); nothing written")
    return proof


def fold_onnx_file(input_path: str | os.PathLike, output_path: str | os.PathLike,
                   options: GraphFoldOptions = GraphFoldOptions()) -> GraphFoldReport:
    """Fold the graph at ``input_path`` and write it to ``output_path``.

    The input is read with its external data, its weights held apart
    (:func:`rvdeploy.onnx_weights.read_apart`: a file that is not a valid ONNX graph raises
    OnnxError, exit 1). With ``options.prove`` every folded node is
    proved against the nodes it replaces before anything is written; a failed proof raises
    :class:`GraphFoldError` (exit 3) naming the worst group. The output passes onnx's full check
    and is byte-deterministic; over 2 GB it is written with external data (``OUT.data``).

    Nothing to fold: the output is still written, an unchanged copy of the input graph, so that a
    pipeline running ``fuse`` on every model keeps working; ``report.nothing_to_fold`` says so.
    The output may not be the input file itself (OutputError): a failure would lose the input.
    """
    start = time.perf_counter()
    source, target = Path(input_path), Path(output_path)
    if target.resolve() == source.resolve():
        raise OutputError(f"{target} is the input file: write the folded graph to another path")
    # The weights are held apart from the graph's protobuf (rvdeploy.onnx_weights): the input's and
    # the fold's new ones are each in memory once, however many runs and checks read them.
    model, weights = read_apart(source)
    with ThreadPoolExecutor(1) as pool:
        # The input graph's run for the proof needs no fold: it runs beside it.
        input_values = pool.submit(input_graph_values, model, options, weights) if options.prove else None
        folded, folded_weights, report, folds = fold_apart(model, weights)
        if options.prove and folds:
            report.proof = _proven(model, folded, folds, options, source, input_values, weights, folded_weights)
    _full_check(lambda: write_apart(folded, folded_weights, target, full_check=True))
    report.total_seconds = time.perf_counter() - start
    return report
