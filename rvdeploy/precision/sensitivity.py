"""Per-layer INT8 sensitivity without labels, at the cost of one pass per layer.

The whole graph is quantized once (one ``quantize_static`` call). Each layer's single-layer graph
is then the FP32 graph with only that layer's quantize/dequantize pairs grafted on, copied from the
quantized graph (its activation input and weights; for the onnxruntime layout also its output, which
that layout quantizes too). Its sensitivity is the SQNR of the model outputs against FP32 on the
calibration images: one ONNX Runtime pass over them per layer, no labels, no re-quantization.
"""

from __future__ import annotations

import copy
import functools
import math
import os
from dataclasses import dataclass

import numpy as np
import onnx

from rvdeploy.compare import sqnr_db
from rvdeploy.data import ImageSet
from rvdeploy.errors import QuantizeError
from rvdeploy.onnx_io import fixed_batch, ort_session, run_session
from rvdeploy.precision.calib import QUANTIZED_OPS, model_feeds
from rvdeploy.precision.selection import selection_free_tensors
from rvdeploy.preprocess import Preprocess
from rvdeploy.progress import progress_bar

FEED_BATCH = 32


def flat_outputs(outputs: list[np.ndarray]) -> np.ndarray:
    """Every output of one batch as one row per sample: several outputs (a backbone's feature maps) are
    concatenated, so one SQNR covers them all."""
    return np.concatenate([np.asarray(o, dtype=np.float32).reshape(len(o), -1) for o in outputs], axis=1)


@dataclass(frozen=True)
class _Reference:
    outputs: np.ndarray  # the FP32 graph's, a row per image
    compared: list[str] | None  # the tensors compared (None: the graph's outputs)
    suffix: bytes  # what makes them outputs, appended to a serialized graph


class OutputProbe:
    """The calibration images, preprocessed once, and the FP32 graph's outputs on them: what every
    candidate graph's outputs are compared with, run the first time one is (a probe whose images only
    feed a fit costs nothing more). Outputs that follow a TopK are compared by what the selection
    reads instead (:mod:`rvdeploy.precision.selection`; ``compared`` names them)."""

    def __init__(self, fp32: onnx.ModelProto, images: ImageSet | list[dict], recipe: Preprocess | None,
                 what: str | os.PathLike) -> None:
        # ``images``: calibration images (read with ``recipe``), or feeds as they are
        self.feeds = images if isinstance(images, list) else list(model_feeds(fp32, images, recipe, FEED_BATCH))
        self.fixed_batch = fixed_batch(fp32) is not None
        self.what = what
        self._fp32 = fp32

    @functools.cached_property
    def _measured(self) -> _Reference:
        candidates = selection_free_tensors(self._fp32)
        serialized = self._fp32.SerializeToString()
        if not candidates:
            return _Reference(self._outputs(serialized, None, b""), None, b"")
        found = self._run(serialized, candidates, _exposed(self._fp32, candidates))
        rows = [len(next(iter(feed.values()))) for feed in self.feeds]
        kept = [k for k in range(len(candidates))  # float, one row per image
                if all(v[k].dtype.kind == "f" and v[k].ndim and len(v[k]) == n for v, n in zip(found, rows))]
        compared = [candidates[k] for k in kept] or None
        suffix = _exposed(self._fp32, compared or [])
        outputs = (np.concatenate([flat_outputs([v[k] for k in kept]) for v in found]) if kept
                   else self._outputs(serialized, None, suffix))
        return _Reference(outputs, compared, suffix)

    @property
    def reference(self) -> np.ndarray:
        return self._measured.outputs

    @property
    def compared(self) -> list[str] | None:
        return self._measured.compared

    def _run(self, serialized: bytes, names: list[str] | None, suffix: bytes) -> list[list[np.ndarray]]:
        session = ort_session(serialized + suffix, name=f"a quantized graph of {self.what}")
        fp16 = {i.name for i in session.get_inputs() if i.type == "tensor(float16)"}  # a graph with FP16 I/O
        return [run_session(session, {k: v.astype(np.float16) if k in fp16 else v for k, v in feed.items()}, self.what, names)
                for feed in self.feeds]

    def _outputs(self, serialized: bytes, names: list[str] | None, suffix: bytes) -> np.ndarray:
        return np.concatenate([flat_outputs(values) for values in self._run(serialized, names, suffix)])

    def outputs(self, model: onnx.ModelProto | bytes) -> np.ndarray:
        """The outputs of ``model`` (or of its serialization) on the images, a row per image."""
        serialized = model if isinstance(model, bytes) else model.SerializeToString()
        measured = self._measured
        return self._outputs(serialized, measured.compared, measured.suffix)

    def first(self, images: int) -> OutputProbe:
        """This probe on its first ``images`` images, sharing their arrays (whole batches where the
        graph's batch size is fixed) and, once this probe has run the FP32 graph, its outputs."""
        feeds, rows = [], 0
        for feed in self.feeds:
            if rows >= images:
                break
            batch = len(next(iter(feed.values())))
            if not self.fixed_batch and rows + batch > images:
                feed, batch = {name: value[:images - rows] for name, value in feed.items()}, images - rows
            feeds.append(feed)
            rows += batch
        subset = copy.copy(self)
        subset.feeds = feeds
        if "_measured" in self.__dict__:  # run already (a cached property): its first rows; else the subset runs its own
            whole = self._measured
            subset._measured = _Reference(whole.outputs[:rows], whole.compared, whole.suffix)
        return subset

    def sqnr(self, model: onnx.ModelProto | bytes) -> float:
        """SQNR (dB) of ``model``'s outputs against FP32's; inf when they are identical."""
        return sqnr_db(self.outputs(model), self.reference)


def _exposed(model: onnx.ModelProto, names: list[str]) -> bytes:
    """The protobuf that appended to a serialized graph adds ``names`` to its outputs (protobuf merges
    repeated fields by concatenating them)."""
    present = {output.name for output in model.graph.output}
    added = [onnx.ValueInfoProto(name=name) for name in names if name not in present]
    return onnx.ModelProto(graph=onnx.GraphProto(output=added)).SerializeToString() if added else b""


class SingleLayerGraphs:
    """``fp32`` with one layer at a time in INT8: the Q/DQ pairs ``quantized`` puts on that layer's
    inputs (activation, weights, an int32 bias in the onnxruntime layout) and on its output (the
    onnxruntime layout quantizes outputs too), copied with their scales and zero points. Built as
    edits of one copy of ``fp32``'s protobuf, undone after each layer's graph is serialized: a graph
    per layer costs one serialization, not a graph import and export."""

    def __init__(self, fp32: onnx.ModelProto, quantized: onnx.ModelProto) -> None:
        self.work = onnx.ModelProto()
        self.work.CopyFrom(fp32)
        for name in ("opset_import", "ir_version"):  # the Q/DQ nodes' opset (Conv and Relu read the same in both)
            self.work.ClearField(name)
        self.work.opset_import.extend(quantized.opset_import)
        self.work.ir_version = quantized.ir_version
        self.producer = {out: node for node in quantized.graph.node for out in node.output}
        self.readers: dict[str, list[onnx.NodeProto]] = {}
        for node in quantized.graph.node:
            for name in node.input:
                self.readers.setdefault(name, []).append(node)
        self.constants = {init.name: init for init in quantized.graph.initializer}
        self.layers = {node.name: node for node in quantized.graph.node if node.op_type in QUANTIZED_OPS}
        self.index = {node.name: i for i, node in enumerate(self.work.graph.node)}
        self.present = {init.name for init in self.work.graph.initializer}

    def _copy(self, original: onnx.NodeProto, source: str, output: str) -> onnx.NodeProto:
        """A copy of ``quantized``'s Q or DQ node ``original`` (same attributes, scale and zero point) on ``source``."""
        node = onnx.NodeProto()
        node.CopyFrom(original)
        node.name, node.input[0], node.output[0] = f"{original.name}/single_layer", source, output
        return node

    def serialized(self, name: str) -> bytes:
        """The graph with only ``name`` in INT8, serialized."""
        if name not in self.index or name not in self.layers:
            raise QuantizeError(f"the FP32 and quantized graphs do not both have a node {name!r}")
        position = self.index[name]
        layer, qlayer = self.work.graph.node[position], self.layers[name]
        inputs, outputs = list(layer.input), list(layer.output)
        before, after = [], []
        for index, qtensor in enumerate(qlayer.input):
            dq = self.producer.get(qtensor)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            restored = f"{dq.output[0]}/single_layer"
            if dq.input[0] in self.constants:  # a weight or bias stored as integers
                before.append(self._copy(dq, dq.input[0], restored))
            else:
                q = self.producer.get(dq.input[0])
                if q is None or q.op_type != "QuantizeLinear":
                    raise QuantizeError(f"the quantized graph's {dq.name} does not dequantize a QuantizeLinear")
                quantized_name = f"{inputs[index]}/{q.name}/single_layer"
                before += [self._copy(q, inputs[index], quantized_name), self._copy(dq, quantized_name, restored)]
            layer.input[index] = restored
        q = next((c for c in self.readers.get(qlayer.output[0], []) if c.op_type == "QuantizeLinear"), None)
        if q is not None:  # onnxruntime's layout: the layer writes integers
            dq = next(c for c in self.readers[q.output[0]] if c.op_type == "DequantizeLinear")
            raw, quantized_name = f"{outputs[0]}/before_quantize", f"{outputs[0]}/{q.name}/single_layer"
            layer.output[0] = raw
            after = [self._copy(q, raw, quantized_name), self._copy(dq, quantized_name, outputs[0])]
        added = sorted({i for node in before + after for i in node.input if i in self.constants and i not in self.present})
        graph = self.work.graph
        try:
            for offset, node in enumerate(before):
                graph.node.insert(position + offset, node)
            for offset, node in enumerate(after):
                graph.node.insert(position + len(before) + 1 + offset, node)
            graph.initializer.extend(self.constants[i] for i in added)
            return self.work.SerializeToString()
        finally:  # the copy back to FP32
            del graph.node[position + len(before) + 1:position + len(before) + 1 + len(after)]
            del graph.node[position:position + len(before)]
            if added:
                del graph.initializer[-len(added):]
            layer = graph.node[position]  # found again: an insert may have moved the messages
            del layer.input[:], layer.output[:]
            layer.input.extend(inputs)
            layer.output.extend(outputs)


def single_layer_graph(fp32: onnx.ModelProto, quantized: onnx.ModelProto, node: str) -> onnx.ModelProto:
    """``fp32`` with only ``node`` in INT8 (:class:`SingleLayerGraphs`)."""
    return onnx.load_from_string(SingleLayerGraphs(fp32, quantized).serialized(node))


def layer_sqnr(fp32: onnx.ModelProto, quantized: onnx.ModelProto, probe: OutputProbe,
               show_progress: bool = True, description: str = "layer sensitivity") -> dict[str, float]:
    """Output SQNR (dB) against FP32 with each Conv/Gemm alone in INT8, in graph order: one pass each."""
    nodes = [n.name for n in fp32.graph.node if n.op_type in QUANTIZED_OPS]
    graphs, sqnr = SingleLayerGraphs(fp32, quantized), {}
    with progress_bar(show_progress) as progress:
        task = progress.add_task(description, total=len(nodes))
        for node in nodes:
            sqnr[node] = probe.sqnr(graphs.serialized(node))
            progress.advance(task)
    return sqnr


def most_sensitive_first(sqnr: dict[str, float]) -> list[str]:
    """Layers by SQNR alone, lowest (most harmful in INT8) first; NaN counts as the worst."""
    return sorted(sqnr, key=lambda node: -math.inf if math.isnan(sqnr[node]) else sqnr[node])
