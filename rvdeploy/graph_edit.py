"""Helpers every stage that edits a graph shares: naming a node for a message, finding a tensor's
producer, exporting an edited graph with its model's own fields (onnx-graphsurgeon), and the nodes a
part of a graph needs (on the protobuf, for probes built many times)."""

from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs


def node_label(node: gs.Node) -> str:
    """A name a user can find in Netron: the node's name, else its op and output."""
    if node.name:
        return node.name
    return f"{node.op} writing {node.outputs[0].name}" if node.outputs else node.op


def upstream_nodes(model: onnx.ModelProto, ends: list[onnx.NodeProto],
                   stop_at: onnx.NodeProto | None = None) -> list[onnx.NodeProto]:
    """``ends`` and every node they read from, in graph order: one walk back through the producers,
    not past ``stop_at`` (kept itself)."""
    producers = {out: node for node in model.graph.node for out in node.output}
    needed, pending = set(), list(ends)
    while pending:
        node = pending.pop()
        if id(node) in needed:
            continue
        needed.add(id(node))
        if node is not stop_at:
            pending += [producers[name] for name in node.input if name in producers]
    return [node for node in model.graph.node if id(node) in needed]


def producer(tensor: gs.Tensor, op: str | None = None) -> gs.Node | None:
    """The node that writes ``tensor`` (when it is an ``op`` node, if ``op`` is given), else None."""
    node = tensor.inputs[0] if len(tensor.inputs) == 1 else None
    return node if node is not None and (op is None or node.op == op) else None


def export_like(graph: gs.Graph, model: onnx.ModelProto) -> onnx.ModelProto:
    """``graph`` exported, with every field but the graph taken from ``model``: IR version, opset
    imports, metadata, producer and local functions stay ``model``'s (graphsurgeon writes its own or
    drops them)."""
    exported = gs.export_onnx(graph)
    for fd in onnx.ModelProto.DESCRIPTOR.fields:
        if fd.name != "graph":
            exported.ClearField(fd.name)
    for fd, value in model.ListFields():
        if fd.name == "graph":
            continue
        repeated = fd.is_repeated if hasattr(fd, "is_repeated") else fd.label == fd.LABEL_REPEATED
        if repeated:
            getattr(exported, fd.name).extend(value)
        elif fd.type == fd.TYPE_MESSAGE:
            getattr(exported, fd.name).CopyFrom(value)
        else:
            setattr(exported, fd.name, value)
    return exported


def prefix_model(model: onnx.ModelProto, tensors: list[str], extra_nodes: list[onnx.NodeProto] = (),
                 extra_initializers: list[onnx.TensorProto] = (), outputs: list[str] | None = None) -> onnx.ModelProto:
    """``model`` cut to the nodes that ``tensors`` need (every node when a subgraph may read an outer
    tensor), with ``extra_nodes`` after them; its outputs are ``outputs`` (default ``tensors``): a probe
    that runs only the part of the graph it measures. Built on the protobuf directly, since probes are
    built once per layer."""
    producers = {out: node for node in model.graph.node for out in node.output}
    nested = any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in model.graph.node for a in n.attribute)
    kept = list(model.graph.node) if nested else upstream_nodes(model, [producers[t] for t in tensors if t in producers])
    used = {name for node in [*kept, *extra_nodes] for name in node.input} | {value.name for value in model.graph.input}  # old IRs list weights as inputs
    graph = onnx.helper.make_graph(
        [*kept, *extra_nodes], model.graph.name, model.graph.input,
        [onnx.ValueInfoProto(name=name) for name in (tensors if outputs is None else outputs)],
        [init for init in model.graph.initializer if init.name in used] + list(extra_initializers))
    cut = onnx.helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
    cut.functions.extend(model.functions)
    return cut
