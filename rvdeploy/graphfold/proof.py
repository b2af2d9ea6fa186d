"""The fold proves itself: every folded node of the output graph, run in float32 on its input
(captured from ONNX Runtime running the folded graph on a seeded probe: a linear map is checked on
any input, and this one is realistic), must agree with the original nodes it replaces, run in
float64, within what float32 explains for that group alone.

The budget per output channel is the larger of (a) ``NOISE_MARGIN`` times how far the original
nodes themselves, in float32, are from float64 on that input, and (b) the worst-case rounding of
a float32 dot product as long as the folded node's fan-in (+ ``EXTRA_TERMS``), relative to the sum
of the absolute terms before they cancel (the idea of ``rvdeploy.reparam.check_fold``). The whole
graphs are compared end to end for the record only: a deep net can be chaotic on a probe.

A folded group is linear and shift-invariant (plus a bias), so its response on a window one
receptive field plus one stride less one wide fixes it (:func:`rvdeploy.probes.window_size`): the
window is the corner of the captured input (true borders on two sides, its own on the others). The
groups are checked on that window, in numpy, on one thread, at a cost set by the kernels rather than
by the activations' size; the input graph's run (for the end-to-end record) goes beside them.

A fold that moved a norm across reshapes (rvdeploy.graphfold.pre_norm) changes what a tensor of the
folded graph holds: its MatMul is checked on that tensor as the folded graph computes it, and the
tensor itself against the input graph's tensor of the same name under the norms (the relation), with
a budget that adds how far the two graphs' values already are apart where they part.
"""

from __future__ import annotations

import math
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from rvdeploy.compare import EXTRA_TERMS, NOISE_MARGIN, SAFETY, U32, compare_outputs, worst
from rvdeploy.graphfold.constants import constant_value, view_initializers
from rvdeploy.graphfold.fold import fold_model
from rvdeploy.graphfold.nodes import ConvNode, read_conv, read_gemm
from rvdeploy.graphfold.reference import Expr, GemmRef, Input
from rvdeploy.graphfold.results import GraphFoldOptions, GraphFoldProof, GroupCheck
from rvdeploy.graphfold.state import Folded
from rvdeploy.onnx_io import run_with_values
from rvdeploy.probes import corner, one_thread, probe_feeds


def _matmul(node: gs.Node) -> GemmRef:
    """A MatMul by a constant, or the Add of a constant bias to one, as a Gemm on 2-d rows."""
    bias = None
    if node.op == "Add":
        index = next(i for i, t in enumerate(node.inputs) if constant_value(t) is None)
        bias = np.asarray(constant_value(node.inputs[1 - index]), np.float64).reshape(-1)
        node = node.inputs[index].inputs[0]
    return GemmRef(Input(), np.asarray(constant_value(node.inputs[1]), np.float64).T, bias)


def _candidate(node: gs.Node) -> tuple[Expr, int, ConvNode | None]:
    """The folded node as it is in the output graph, its fan-in, and the Conv it is (None for a Gemm
    or MatMul)."""
    if node.op == "Conv":
        conv = read_conv(node)
        return conv.reference(Input()), int(np.prod(conv.weight.shape[1:])), conv
    if node.op in ("MatMul", "Add"):
        gemm = _matmul(node)
        return gemm, gemm.weight.shape[1], None
    weight, bias = read_gemm(node)
    return GemmRef(Input(), weight, bias), weight.shape[1], None


def rows(x: np.ndarray, axis: int | None) -> np.ndarray:
    """``x`` as 2-d rows of its channels on ``axis`` (what a MatMul on that axis computes on)."""
    return x if axis is None else np.moveaxis(x, axis, -1).reshape(-1, x.shape[axis])


def window(x: np.ndarray, conv: ConvNode | None) -> np.ndarray:
    """The corner of ``x`` (N, C, spatial...) that fixes ``conv``'s response; all of ``x`` for a Gemm."""
    if conv is None or x.ndim != conv.weight.ndim:
        return x
    return corner(x, conv.weight.shape[2:], conv.strides, conv.dilations)


def _channel_max(values: np.ndarray) -> np.ndarray:
    """The largest value per channel (axis 1)."""
    return np.swapaxes(values, 0, 1).reshape(values.shape[1], -1).max(1)


def _ratio(error: np.ndarray, budget: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(budget > 0, error / np.maximum(budget, 1e-300), np.where(error == 0, 0.0, math.inf))
    return np.nan_to_num(ratio, nan=math.inf, posinf=math.inf)


def _drift(folded: Folded, after: dict, captured: dict) -> np.ndarray:
    """How far the folded graph's values are from the input graph's where the fold's relation
    starts, per channel (on axis 1, or on the fold's token axis where it starts at its own input)."""
    name = folded.relation.source
    apart = np.abs(np.asarray(after[name], np.float64) - captured[name])
    if name == folded.input:
        apart = rows(apart, folded.tokens)
    return _channel_max(apart)


def check_relation(folded: Folded, x: np.ndarray, y: np.ndarray, drift: np.ndarray) -> GroupCheck:
    """The input graph's tensor ``y`` against ``folded.relation`` of the folded graph's ``x`` (both
    as rows of channels): a fold that tracked a channel wrongly through a reshape fails here. The
    budget adds what ``drift`` (per channel: how far the two graphs' values are apart where they
    part) becomes through the relation."""
    relation = folded.relation
    real = np.asarray(x, np.float64)
    reference = relation.function.run(real, np.float64)
    computed32 = relation.function.run(real, np.float32).astype(np.float64)
    terms = relation.function.bound(_channel_max(np.abs(real))[None])[0]
    apart = drift[None]
    carried = relation.function.bound(apart)[0] - relation.function.bound(np.zeros_like(apart))[0]
    error = _channel_max(np.abs(np.asarray(y, np.float64) - reference))
    rounding = SAFETY * (relation.taps + EXTRA_TERMS) * U32 * terms + carried
    budget = np.maximum(NOISE_MARGIN * _channel_max(np.abs(computed32 - reference)), rounding)
    ratios = _ratio(error, budget)
    channel = int(ratios.argmax())
    return GroupCheck(f"{folded.name} (its input as the input graph's {relation.tensor})", folded.kind,
                      max_error=float(error[channel]), budget=float(budget[channel]), ratio=float(ratios[channel]))


def check_group(folded: Folded, candidate: Expr, fan_in: int, x: np.ndarray, seed: int) -> GroupCheck:
    """``candidate`` (float32) against ``folded.reference`` (float64) on ``x`` and on one Gaussian
    image of ``x``'s scale (so a group whose real input is dead is tested all the same); the two
    probes run as one batch and are judged apart."""
    real = np.asarray(x, np.float64)
    finite = bool(np.isfinite(real.sum()))
    scale = float(real.std()) if finite and real.size > 1 else 1.0
    gaussian = np.random.default_rng(seed).standard_normal((1,) + real.shape[1:])
    gaussian *= scale if 0 < scale < math.inf else 1.0
    probes = [real, gaussian] if finite else [gaussian]
    batch = np.concatenate(probes)
    reference = folded.reference.run(batch, np.float64)
    original32 = folded.reference.run(batch, np.float32).astype(np.float64)
    result = candidate.run(batch, np.float32).astype(np.float64)
    terms = folded.reference.bound(np.stack([_channel_max(np.abs(p)) for p in probes]))
    highest = (-1.0, 0.0, 0.0)  # ratio, error, budget
    start = 0
    for probe, probe_terms in zip(probes, terms):
        part = slice(start, start + probe.shape[0])
        start += probe.shape[0]
        error = _channel_max(np.abs(result[part] - reference[part]))
        rounding = SAFETY * (fan_in + EXTRA_TERMS) * U32 * probe_terms
        budget = np.maximum(NOISE_MARGIN * _channel_max(np.abs(original32[part] - reference[part])), rounding)
        ratios = _ratio(error, budget)
        channel = int(ratios.argmax())
        if ratios[channel] > highest[0]:
            highest = (float(ratios[channel]), float(error[channel]), float(budget[channel]))
    return GroupCheck(folded.name, folded.kind, max_error=highest[1], budget=highest[2], ratio=highest[0])


def input_graph_values(original: onnx.ModelProto, options: GraphFoldOptions = GraphFoldOptions(),
                       weights: dict | None = None) -> dict:
    """ONNX Runtime's values of ``original``'s outputs (``weights``: its weights held apart) on the
    proof's probe, on one thread: what a fold is compared with end to end. It needs no fold, so a
    caller may start it beside the fold."""
    feeds = probe_feeds(original, options.probe_batch, options.probe_size, options.seed)
    return run_with_values(original, feeds, [], "the input graph", 1, weights)


def prove(original: onnx.ModelProto, folded_model: onnx.ModelProto, folds: dict[str, Folded],
          options: GraphFoldOptions = GraphFoldOptions(), input_values: Future | None = None,
          weights: dict | None = None, folded_weights: dict | None = None) -> GraphFoldProof:
    """Check each node of ``folded_model`` that a fold made (``folds``, by output tensor) against
    the original nodes it replaces, on its input as ``folded_model`` computes it (a linear map is
    checked on any input; this one is realistic), and a fold that moved a norm across reshapes also
    by its relation to ``original``'s tensor (:func:`check_relation`); compare the graphs end to end
    for the record. ``input_values``: :func:`input_graph_values` already started (run again where a
    relation needs more of the input graph's tensors); ``weights``, ``folded_weights``: the two
    graphs' weights where they are held apart (rvdeploy.onnx_weights)."""
    feeds = probe_feeds(original, options.probe_batch, options.probe_size, options.seed)
    moved = [f for f in folds.values() if f.relation is not None]  # read a tensor the fold changed
    parted = {f.relation.source for f in moved}
    extra = sorted({f.relation.tensor for f in moved} | parted)
    # The input graph runs beside the rest (ONNX Runtime leaves the GIL), each run on one thread: no
    # run waits on a thread a busy core has descheduled.
    with ThreadPoolExecutor(1) as pool:
        if input_values is None or extra:
            input_values = pool.submit(run_with_values, original, feeds, extra, "the input graph", 1, weights)
        after = run_with_values(folded_model, feeds, sorted({f.input for f in folds.values()} | parted),
                                "the folded graph", 1, folded_weights)
        graph = gs.import_onnx(folded_model)
        view_initializers(graph, folded_model, folded_weights)
        tensors = graph.tensors()
        checks = []
        with one_thread():
            for index, (output, folded) in enumerate(folds.items()):
                candidate, fan_in, conv = _candidate(tensors[output].inputs[0])
                x = rows(after[folded.input], folded.tokens)
                checks.append(check_group(folded, candidate, fan_in, window(x, conv), options.seed + 1 + index))
                if folded.relation is not None:
                    captured = input_values.result()
                    checks.append(check_relation(folded, x, rows(captured[folded.relation.tensor], folded.relation.axis),
                                                 _drift(folded, after, captured)))
        captured = input_values.result()
    end_to_end = worst(compare_outputs(after[o.name], captured[o.name]) for o in original.graph.output)
    worst_group = max(checks, key=lambda c: c.ratio, default=None)
    return GraphFoldProof(groups=checks, worst_group=worst_group.name if worst_group else None,
                          worst_ratio=worst_group.ratio if worst_group else 0.0, end_to_end=end_to_end,
                          passed=all(c.passed for c in checks))


def prove_graph_fold(original: onnx.ModelProto, folded_model: onnx.ModelProto,
                     options: GraphFoldOptions = GraphFoldOptions()) -> GraphFoldProof:
    """Prove that ``folded_model`` (e.g. a file written earlier, or one edited since) computes what
    ``original`` computes: the groups are found again by folding ``original``."""
    _, _, folds = fold_model(original)
    return prove(original, folded_model, folds, options)

