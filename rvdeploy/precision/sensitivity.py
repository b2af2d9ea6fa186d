"""Per-layer INT8 sensitivity without labels, at the cost of one pass per layer.

The whole graph is quantized once (one ``quantize_static`` call). Each layer's single-layer graph
is then the FP32 graph with only that layer's quantize/dequantize pairs grafted on, copied from the
quantized graph (its activation input and weights; for the onnxruntime layout also its output, which
that layout quantizes too). Its sensitivity is the SQNR of the model outputs against FP32 on the
calibration images: one ONNX Runtime pass over them per layer, no labels, no re-quantization.
"""

from __future__ import annotations

import copy
import math
import os

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from rvdeploy.compare import sqnr_db
from rvdeploy.data import ImageSet
from rvdeploy.errors import QuantizeError
from rvdeploy.graph_edit import export_like, producer
from rvdeploy.onnx_io import ort_session, run_session
from rvdeploy.precision.calib import QUANTIZED_OPS, model_feeds
from rvdeploy.preprocess import Preprocess
from rvdeploy.progress import progress_bar

FEED_BATCH = 32


def flat_outputs(outputs: list[np.ndarray]) -> np.ndarray:
    """Every output of one batch as one row per sample: several outputs (a backbone's feature maps) are
    concatenated, so one SQNR covers them all."""
    return np.concatenate([np.asarray(o, dtype=np.float32).reshape(len(o), -1) for o in outputs], axis=1)


class OutputProbe:
    """The calibration images, preprocessed once, and the FP32 graph's outputs on them: what every
    candidate graph's outputs are compared with."""

    def __init__(self, fp32: onnx.ModelProto, images: ImageSet, recipe: Preprocess, what: str | os.PathLike) -> None:
        self.feeds = list(model_feeds(fp32, images, recipe, FEED_BATCH))
        self.what = what
        self.reference = self.outputs(fp32)

    def outputs(self, model: onnx.ModelProto) -> np.ndarray:
        session = ort_session(model.SerializeToString(), name=f"a quantized graph of {self.what}")
        return np.concatenate([flat_outputs(run_session(session, feed, self.what)) for feed in self.feeds])

    def first(self, images: int) -> OutputProbe:
        """This probe on its first ``images`` images (whole batches), sharing their arrays."""
        feeds, rows = [], 0
        for feed in self.feeds:
            if rows >= images:
                break
            feeds.append(feed)
            rows += len(next(iter(feed.values())))
        subset = copy.copy(self)
        subset.feeds, subset.reference = feeds, self.reference[:rows]
        return subset

    def sqnr(self, model: onnx.ModelProto) -> float:
        """SQNR (dB) of ``model``'s outputs against FP32's; inf when they are identical."""
        return sqnr_db(self.outputs(model), self.reference)


def _find(graph: gs.Graph, name: str, what: str) -> gs.Node:
    node = next((n for n in graph.nodes if n.name == name), None)
    if node is None:
        raise QuantizeError(f"{what} has no node {name!r}")
    return node


def _copy_node(graph: gs.Graph, original: gs.Node, inputs: list, outputs: list) -> None:
    """A copy of the quantized graph's Q or DQ node ``original`` (same attributes, scale and zero point)."""
    graph.nodes.append(gs.Node(original.op, name=f"{original.name}/single_layer", attrs=dict(original.attrs),
                               inputs=[inputs[0], *original.inputs[1:]], outputs=outputs))


def _fake_quantized(graph: gs.Graph, tensor: gs.Variable, q: gs.Node, dq: gs.Node) -> gs.Variable:
    """``tensor`` through a copy of the pair ``q`` → ``dq``."""
    quantized = gs.Variable(f"{tensor.name}/{q.name}/single_layer", dtype=q.outputs[0].dtype)
    restored = gs.Variable(f"{tensor.name}/{dq.name}/single_layer", dtype=np.float32)
    _copy_node(graph, q, [tensor], [quantized])
    _copy_node(graph, dq, [quantized], [restored])
    return restored


def single_layer_graph(fp32: onnx.ModelProto, quantized: onnx.ModelProto, node: str) -> onnx.ModelProto:
    """``fp32`` with only ``node`` in INT8: the Q/DQ pairs ``quantized`` puts on that node's inputs
    (activation, weights, an int32 bias in the onnxruntime layout) and on its output (the onnxruntime
    layout quantizes outputs too), copied with their scales and zero points. Built by graph edits alone."""
    graph, qgraph = gs.import_onnx(fp32), gs.import_onnx(quantized)
    layer, qlayer = _find(graph, node, "the FP32 graph"), _find(qgraph, node, "the quantized graph")
    for index, qtensor in enumerate(qlayer.inputs):
        dq = producer(qtensor, "DequantizeLinear")
        if dq is None:
            continue
        if isinstance(dq.inputs[0], gs.Constant):  # a weight or bias stored as integers
            restored = gs.Variable(f"{dq.outputs[0].name}/single_layer", dtype=np.float32)
            _copy_node(graph, dq, [dq.inputs[0]], [restored])
            layer.inputs[index] = restored
            continue
        q = producer(dq.inputs[0], "QuantizeLinear")
        if q is None:
            raise QuantizeError(f"the quantized graph's {dq.name} does not dequantize a QuantizeLinear")
        layer.inputs[index] = _fake_quantized(graph, layer.inputs[index], q, dq)
    q = next((c for c in qlayer.outputs[0].outputs if c.op == "QuantizeLinear"), None)
    if q is not None:  # onnxruntime's layout: the layer writes integers
        dq = next(c for c in q.outputs[0].outputs if c.op == "DequantizeLinear")
        output = layer.outputs[0]
        raw = gs.Variable(f"{output.name}/before_quantize", dtype=np.float32)
        layer.outputs[0] = raw
        quantized_output = gs.Variable(f"{output.name}/{q.name}/single_layer", dtype=q.outputs[0].dtype)
        _copy_node(graph, q, [raw], [quantized_output])
        _copy_node(graph, dq, [quantized_output], [output])
    graph.cleanup().toposort()
    return export_like(graph, quantized)  # the Q/DQ nodes' opset (Conv and Relu read the same in both)


def layer_sqnr(fp32: onnx.ModelProto, quantized: onnx.ModelProto, probe: OutputProbe,
               show_progress: bool = True, description: str = "layer sensitivity") -> dict[str, float]:
    """Output SQNR (dB) against FP32 with each Conv/Gemm alone in INT8, in graph order: one pass each."""
    nodes = [n.name for n in fp32.graph.node if n.op_type in QUANTIZED_OPS]
    sqnr = {}
    with progress_bar(show_progress) as progress:
        task = progress.add_task(description, total=len(nodes))
        for node in nodes:
            sqnr[node] = probe.sqnr(single_layer_graph(fp32, quantized, node))
            progress.advance(task)
    return sqnr


def most_sensitive_first(sqnr: dict[str, float]) -> list[str]:
    """Layers by SQNR alone, lowest (most harmful in INT8) first; NaN counts as the worst."""
    return sorted(sqnr, key=lambda node: -math.inf if math.isnan(sqnr[node]) else sqnr[node])
