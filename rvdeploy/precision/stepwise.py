"""A graph run a part at a time over every calibration batch, for methods that go layer by layer.

Bias correction and adaptive rounding change layer k, then need what reaches layer k + 1 through the
changed graph. Running the graph's prefix again for every layer costs about n²/2 layer evaluations
and one session over the whole prefix per layer. Run stepwise, it costs one pass: each call runs only
the nodes that the tensor asked for needs and that have not run yet, as a small ONNX Runtime session
built from the graph as it is at that moment (so a layer changed before its part runs is computed
changed), and keeps, for every batch, the tensors later parts read until their last reader has run.

ONNX Runtime fuses nothing across a cut (DQ → Conv → Q into QLinearConv, Conv + ReLU), so values
equal the whole graph's up to the rounding order of float sums and of those fused kernels.

The price is memory: what is kept is the graph's live tensors for every image at once, where a
prefix run held one batch (RepVGG-A0's stem output at 224 px is 2.4 MB an image in float32: 0.6 GB
for 256 calibration images).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx

from rvdeploy.onnx_io import ort_session, run_session


def _reads(node: onnx.NodeProto) -> set[str]:
    """The tensors ``node`` reads: its inputs and whatever its subgraphs read from outside them."""
    names = set(node.input)
    for attribute in node.attribute:
        graphs = [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else list(attribute.graphs)
        for graph in graphs:
            for inner in graph.node:
                names |= _reads(inner)
    names.discard("")
    return names


def _value_info(name: str, arrays: list[np.ndarray]) -> onnx.ValueInfoProto:
    """``name`` typed as ``arrays`` hold it; a dimension that differs between batches is left symbolic."""
    first = arrays[0]
    dims = [size if all(a.shape[axis] == size for a in arrays) else f"{name}/dim{axis}"
            for axis, size in enumerate(first.shape)]
    return onnx.helper.make_tensor_value_info(name, onnx.helper.np_dtype_to_tensor_dtype(first.dtype), dims)


class StepwiseRun:
    """``model`` run over ``feeds`` (a list of batches: input name → array) a part at a time.
    ``targets``: every tensor that will be asked for, in the order asked; nodes none of them needs never
    run. The graph passed to :meth:`values` may differ from ``model`` in its initializers and node
    inputs (corrected biases, rounded weights), not in its nodes."""

    def __init__(self, model: onnx.ModelProto, targets: list[str], feeds: list[dict], what: str) -> None:
        self.feeds, self.what, self.node_count = feeds, what, len(model.graph.node)
        self.producer = {out: index for index, node in enumerate(model.graph.node) for out in node.output if out}
        self.ran: set[int] = set()
        needed = self._upstream(model, targets)
        self.readers = Counter(name for index in needed for name in _reads(model.graph.node[index]))  # reads yet to run
        self.pending = Counter(targets)  # asks yet to come
        self.kept: dict[str, list[np.ndarray]] = {}  # tensor → its value in every batch

    def _upstream(self, model: onnx.ModelProto, tensors: list[str]) -> set[int]:
        """The nodes that ``tensors`` need and that have not run, walking back from their producers."""
        found, pending = set(), [self.producer[t] for t in tensors if t in self.producer]
        while pending:
            index = pending.pop()
            if index in found or index in self.ran:
                continue
            found.add(index)
            pending += [self.producer[name] for name in _reads(model.graph.node[index]) if name in self.producer]
        return found

    def values(self, model: onnx.ModelProto, tensor: str) -> list[np.ndarray]:
        """``tensor`` in every batch, as ``model`` (this run's graph, as it is now) computes it from the
        values kept so far."""
        if len(model.graph.node) != self.node_count or self.pending[tensor] <= 0:
            raise ValueError(f"a stepwise run was asked for {tensor!r} out of turn, or its graph's nodes changed")
        if tensor not in self.kept and tensor not in self.feeds[0]:
            self._run(model, sorted(self._upstream(model, [tensor])))
        found = self.kept[tensor] if tensor in self.kept else [feed[tensor] for feed in self.feeds]
        self.pending[tensor] -= 1
        self._forget([tensor])
        return found

    def replace(self, tensor: str, arrays: list[np.ndarray]) -> None:
        """Later parts read ``arrays`` (one per batch) as ``tensor``: a change to the layer that wrote it,
        applied to its values rather than computed again."""
        if tensor in self.kept:
            self.kept[tensor] = arrays

    def _forget(self, names) -> None:
        for name in names:
            if self.readers[name] <= 0 and self.pending[name] <= 0:
                self.kept.pop(name, None)

    def _run(self, model: onnx.ModelProto, part: list[int]) -> None:
        nodes = [model.graph.node[index] for index in part]
        produced = {out for node in nodes for out in node.output if out}
        reads = set().union(*(_reads(node) for node in nodes))
        initializers = [init for init in model.graph.initializer if init.name in reads]
        # what a subgraph defines for itself is read from neither
        inputs = sorted(name for name in reads - produced - {init.name for init in initializers}
                        if name in self.kept or name in self.feeds[0])
        graph_inputs = {value.name: value for value in model.graph.input}
        infos = [graph_inputs[name] if name in self.feeds[0] else _value_info(name, self.kept[name]) for name in inputs]
        for node in nodes:
            self.readers.subtract(_reads(node))
        self.ran.update(part)
        outputs = sorted(name for name in produced if self.readers[name] > 0 or self.pending[name] > 0)
        graph = onnx.helper.make_graph(nodes, model.graph.name, infos, [onnx.ValueInfoProto(name=n) for n in outputs],
                                       initializers)
        part_model = onnx.helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
        part_model.functions.extend(model.functions)
        # not spinning: between parts, numpy's fits run, and idle spinning workers took their core
        session = ort_session(part_model.SerializeToString(), name=f"a part of {self.what}", spinning=False)
        results: dict[str, list[np.ndarray]] = {name: [] for name in outputs}
        for index, feed in enumerate(self.feeds):
            given = {name: feed[name] if name in feed else self.kept[name][index] for name in inputs}
            for name, value in zip(outputs, run_session(session, given, self.what, outputs)):
                results[name].append(value)
        self.kept.update(results)
        self._forget(inputs)
