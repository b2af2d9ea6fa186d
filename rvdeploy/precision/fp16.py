"""Strongly typed FP16 graphs: FP16 weights and FP16 compute, FP32 only where FP16 cannot hold the values.

TensorRT 11 has no FP16 builder flag: a layer runs in FP16 because its tensors are FP16. Each node
is FP16 unless one of its weights, or a tensor it reads or writes on the observed inputs, lies
beyond FP16's range (±65504); such nodes stay FP32, with Cast nodes where the precision changes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from rvdeploy.graph_edit import export_like

FP16_MAX = float(np.finfo(np.float16).max)  # 65504
FP16_TINY = float(np.finfo(np.float16).smallest_subnormal)  # below this a weight becomes 0


@dataclass(frozen=True)
class KeptFp32:
    """A node left in FP32, and why."""

    node: str
    op: str
    reason: str


@dataclass
class Fp16Report:
    nodes_fp16: int
    kept_fp32: list[KeptFp32]
    weights_flushed_to_zero: int  # non-zero FP32 weights too small for FP16
    observed_inputs: int  # images (or probes) whose activations were checked
    observed_on: str  # "calibration images" or "random probes"

    def to_dict(self) -> dict:
        data = asdict(self)
        data["kept_fp32"] = [asdict(k) for k in self.kept_fp32]
        return data


def _float_constants(node: gs.Node) -> list[gs.Constant]:
    return [t for t in node.inputs if isinstance(t, gs.Constant) and t.values.dtype == np.float32]


def plan_fp32_nodes(graph: gs.Graph, activation_max: dict[str, float]) -> list[KeptFp32]:
    """The nodes that must stay FP32: out-of-range weights, or out-of-range tensors read or written."""
    kept = []
    for node in graph.nodes:
        reasons = []
        for const in _float_constants(node):
            peak = float(np.abs(const.values).max()) if const.values.size else 0.0
            if peak > FP16_MAX:
                reasons.append(f"weight {const.name} reaches {peak:.3g}")
        for tensor in (*node.inputs, *node.outputs):
            peak = activation_max.get(tensor.name, 0.0)
            if not isinstance(tensor, gs.Constant) and peak > FP16_MAX:
                reasons.append(f"tensor {tensor.name} reaches {peak:.3g}")
        if reasons:
            kept.append(KeptFp32(node.name, node.op, "; ".join(reasons)))
    return kept


def convert_fp16(model: onnx.ModelProto, keep_fp32: set[str] = frozenset(), io_fp16: bool = False) -> onnx.ModelProto:
    """``model`` with every node outside ``keep_fp32`` computing in FP16; Casts where precision changes."""
    graph = gs.import_onnx(model)
    fp16_nodes = {id(n) for n in graph.nodes if n.name not in keep_fp32}
    io_dtype = np.float16 if io_fp16 else np.float32

    def dtype_of_producer(tensor: gs.Tensor):
        if not tensor.inputs:  # a graph input
            return io_dtype
        return np.float16 if id(tensor.inputs[0]) in fp16_nodes else np.float32

    casts: dict[tuple[str, type], gs.Variable] = {}

    def cast(tensor: gs.Variable, dtype) -> gs.Variable:
        key = (tensor.name, dtype)
        if key not in casts:
            suffix = "fp16" if dtype == np.float16 else "fp32"
            out = gs.Variable(f"{tensor.name}_{suffix}", dtype=dtype)
            graph.nodes.append(gs.Node("Cast", name=f"{tensor.name}/Cast_{suffix}", attrs={"to": dtype}, inputs=[tensor], outputs=[out]))
            casts[key] = out
        return casts[key]

    for node in list(graph.nodes):
        dtype = np.float16 if id(node) in fp16_nodes else np.float32
        for i, tensor in enumerate(node.inputs):
            if isinstance(tensor, gs.Constant):
                if tensor.values.dtype == np.float32 and dtype == np.float16:
                    # A private FP16 copy: a weight shared with an FP32 node keeps its FP32 original.
                    node.inputs[i] = gs.Constant(f"{tensor.name}_fp16", tensor.values.astype(np.float16))
            elif dtype_of_producer(tensor) != dtype:
                node.inputs[i] = cast(tensor, dtype)
        for tensor in node.outputs:
            tensor.dtype = dtype
    for tensor in graph.inputs:
        tensor.dtype = io_dtype
    for index, tensor in enumerate(graph.outputs):
        produced = dtype_of_producer(tensor)
        if produced != io_dtype:
            inner = gs.Variable(f"{tensor.name}_{'fp16' if produced == np.float16 else 'fp32'}", dtype=produced)
            tensor.inputs[0].outputs[tensor.inputs[0].outputs.index(tensor)] = inner
            graph.nodes.append(gs.Node("Cast", name=f"{tensor.name}/Cast_out", attrs={"to": io_dtype}, inputs=[inner], outputs=[tensor]))
        tensor.dtype = io_dtype
    graph.cleanup().toposort()
    converted = export_like(graph, model)
    del converted.graph.value_info[:]  # stale FP32 shapes of intermediates would contradict the new types
    return onnx.shape_inference.infer_shapes(converted)
