"""Folding an ONNX file: load (external data included), fold, prove, and write atomically."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import onnx

from rvdeploy.errors import OutputError, first_line
from rvdeploy.files import atomic_output
from rvdeploy.graphfold.fold import fold_model
from rvdeploy.graphfold.proof import input_graph_values, prove
from rvdeploy.graphfold.results import GraphFoldError, GraphFoldOptions, GraphFoldProof, GraphFoldReport
from rvdeploy.onnx_io import checked_bytes, load_onnx, save_onnx


def _full_check(check):
    """``check()``, with onnx's full-check failure as GraphFoldError (nothing is written)."""
    try:
        return check()
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise GraphFoldError(f"the folded graph fails onnx's full check, nothing written: {first_line(exc)}") from None


def _proven(model: onnx.ModelProto, folded: onnx.ModelProto, folds: dict, options: GraphFoldOptions, source: Path,
            staged: Path | None, input_values) -> GraphFoldProof:
    """The proof; GraphFoldError naming the worst group when it fails (nothing is written then)."""
    proof = prove(model, folded, folds, options, original_stored=source, folded_stored=staged, input_values=input_values)
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

    The input is loaded with its external data (:func:`rvdeploy.onnx_io.load_onnx`: a file that is
    not a valid ONNX graph raises OnnxError, exit 1). With ``options.prove`` every folded node is
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
    model = load_onnx(source)
    with ThreadPoolExecutor(1) as pool:
        # The input graph's run for the proof needs no fold: it runs beside it.
        input_values = pool.submit(input_graph_values, model, options, source) if options.prove else None
        folded, report, folds = fold_model(model)
        # Serialized once (over 2 GB: saved with its weights beside it, checked as it is saved), after
        # onnx's full check of its structure (its weights are the fold's own arrays). The staged file
        # is what ONNX Runtime runs for the proof, and what replaces the output once it passed.
        data = _full_check(lambda: checked_bytes(folded, full_check=True, weights_from_arrays=True))
        if data is None:
            if options.prove and folds:
                report.proof = _proven(model, folded, folds, options, source, None, input_values)
            _full_check(lambda: save_onnx(folded, target, full_check=True))
        else:
            with atomic_output(target) as staged:
                staged.write_bytes(data)
                del data
                if options.prove and folds:
                    report.proof = _proven(model, folded, folds, options, source, staged, input_values)
    report.total_seconds = time.perf_counter() - start
    return report
