"""What a graph's outputs are compared by when they follow a selection: a detector's TopK over its
query or box scores (RT-DETR, DETR-like heads, end-to-end YOLOs).

Low-precision noise reorders near-tied scores, so the selected rows come out in another order or
other rows come out at all: an element-wise SQNR of the selection measures that, not the noise
(RT-DETR-L in FP16: 1.7 dB element-wise, 23.3 dB with its rows matched one to one, because other
queries get selected). What the selection reads is in a fixed order: each TopK's input (the scores)
and every tensor the selection takes rows from (the boxes, the queries' features). Those tensors are
compared instead of the outputs that follow a TopK; the graph's other outputs stay as they are.
"""

from __future__ import annotations

import onnx


def selection_free_tensors(model: onnx.ModelProto) -> list[str] | None:
    """The tensors to compare ``model``'s outputs by: its outputs that follow no TopK, then what the
    TopKs and the nodes after them read from before any selection (constants and graph inputs left
    out; the caller keeps the float ones with a batch axis). None: no output follows a TopK."""
    topks = [node for node in model.graph.node if node.op_type == "TopK"]
    if not topks:
        return None
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    selected, pending = set(), [out for node in topks for out in node.output if out]
    while pending:  # everything computed from a selection
        name = pending.pop()
        if name not in selected:
            selected.add(name)
            pending += [out for reader in readers.get(name, []) for out in reader.output if out]
    outputs = [output.name for output in model.graph.output]
    if not selected & set(outputs):
        return None
    fixed = ({init.name for init in model.graph.initializer} | {value.name for value in model.graph.input}
             | {out for node in model.graph.node if node.op_type == "Constant" for out in node.output})
    found = [name for name in outputs if name not in selected]
    for node in model.graph.node:
        if node.op_type == "TopK" or selected & set(node.input):
            found += [name for name in node.input if name and name not in selected and name not in fixed and name not in found]
    return found
