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
    # the written graph's outputs against FP32's on those inputs, by ONNX Runtime on this CPU (which computes
    # FP16 ops it has no kernel for in FP32: the weights' rounding, not every tensor's)
    output_sqnr_db: float

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


# Ops whose output type an attribute sets, not their inputs: they stay FP32 and their FP16 readers
# cast (TensorRT folds casts of constants). Cast itself converts by its "to".
_TYPED_BY_ATTRIBUTE = {"Constant", "ConstantOfShape", "EyeLike", "RandomNormal", "RandomUniform", "RandomNormalLike",
                       "RandomUniformLike", "Multinomial"}


def fp16_nodes(model: onnx.ModelProto) -> int:
    """How many nodes of a converted graph compute in FP16 (write an FP16 tensor), its Casts aside."""
    types = {v.name: v.type.tensor_type.elem_type for v in (*model.graph.value_info, *model.graph.output)}
    return sum(n.op_type != "Cast" and any(types.get(o) == onnx.TensorProto.FLOAT16 for o in n.output) for n in model.graph.node)


def _opset(model: onnx.ModelProto, domain: str) -> int:
    return next((o.version for o in model.opset_import if o.domain in ((domain,) if domain else ("", "ai.onnx"))), 1)


def _param(params, index: int):
    """The formal parameter an input or output at ``index`` binds to (the last one is variadic)."""
    return params[min(index, len(params) - 1)] if params else None


def _fp16_type_vars(node: gs.Node, schema) -> set[str]:
    """The type variables of ``node``'s schema that bind to its float tensors (FP32, or FP16 already:
    GridSample's grid from an FP16 node) and admit FP16: what is FP16 when the node is. Parameters of
    a fixed type (Resize's scales), integer tensors (shape arithmetic) and their type variables are
    not among them."""
    fp16 = "tensor(float16)"
    allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
    bound = [(_param(schema.inputs, i), t) for i, t in enumerate(node.inputs)]
    bound += [(_param(schema.outputs, i), t) for i, t in enumerate(node.outputs)]
    return {param.type_str for param, tensor in bound
            if param is not None and fp16 in allowed.get(param.type_str, ()) and not tensor.is_empty()
            and tensor.dtype in (np.float32, np.float16)}


def convert_fp16(model: onnx.ModelProto, keep_fp32: set[str] = frozenset(), io_fp16: bool = False) -> onnx.ModelProto:
    """``model`` with every node outside ``keep_fp32`` computing in FP16; Casts where precision changes.

    Only FP32 tensors change: each node's schema says which of its inputs and outputs share the
    float type that turns FP16 (shape arithmetic stays int64, Resize's scales FP32). A node without
    a schema here (a custom domain) stays FP32."""
    try:
        typed = onnx.shape_inference.infer_shapes(model)  # every tensor's element type
    except (onnx.shape_inference.InferenceError, ValueError):  # over 2 GB, or a graph it cannot follow
        typed = model
    graph = gs.import_onnx(typed)
    graph.toposort()
    io_dtype = np.float16 if io_fp16 else np.float32
    dtypes = {t.name: t.dtype for t in graph.tensors().values()}  # as written; updated as nodes convert
    casts: dict[tuple[str, type], gs.Variable] = {}
    halves: dict[str, gs.Constant] = {}  # one FP16 copy per FP32 constant, however many nodes read it

    def cast(tensor: gs.Variable, dtype) -> gs.Variable:
        key = (tensor.name, dtype)
        if key not in casts:
            suffix = "fp16" if dtype == np.float16 else "fp32"
            out = gs.Variable(f"{tensor.name}_{suffix}", dtype=dtype)
            graph.nodes.append(gs.Node("Cast", name=f"{tensor.name}/Cast_{suffix}", attrs={"to": dtype}, inputs=[tensor], outputs=[out]))
            casts[key] = out
        return casts[key]

    for tensor in graph.inputs:
        if tensor.dtype == np.float32:
            tensor.dtype = dtypes[tensor.name] = io_dtype
    for node in list(graph.nodes):
        domain = node.domain or ""
        schema = onnx.defs.get_schema(node.op, _opset(model, domain), domain) if onnx.defs.has(node.op, domain) else None
        converts = schema is not None and node.name not in keep_fp32 and node.op not in _TYPED_BY_ATTRIBUTE
        fp16_vars = _fp16_type_vars(node, schema) if converts else set()
        for i, tensor in enumerate(node.inputs):
            if tensor.is_empty() or tensor.dtype not in (np.float32, np.float16):
                continue
            param = _param(schema.inputs, i) if schema is not None else None
            wanted = np.float16 if param is not None and param.type_str in fp16_vars else np.float32
            if isinstance(tensor, gs.Constant):
                if tensor.values.dtype == np.float32 and wanted == np.float16:
                    # An FP16 copy: a weight shared with an FP32 node keeps its FP32 original.
                    if tensor.name not in halves:
                        halves[tensor.name] = gs.Constant(f"{tensor.name}_fp16", tensor.values.astype(np.float16))
                    node.inputs[i] = halves[tensor.name]
            elif dtypes.get(tensor.name) != wanted:
                node.inputs[i] = cast(tensor, wanted)
        for i, tensor in enumerate(node.outputs):
            param = _param(schema.outputs, i) if schema is not None else None
            if tensor.dtype == np.float32 and param is not None and param.type_str in fp16_vars:
                tensor.dtype = dtypes[tensor.name] = np.float16
                if node.op == "Cast":
                    node.attrs["to"] = onnx.TensorProto.FLOAT16
    for tensor in graph.outputs:
        produced = dtypes.get(tensor.name)
        if produced in (np.float16, np.float32) and produced != io_dtype:  # a float output in the other precision
            inner = gs.Variable(f"{tensor.name}_{'fp16' if produced == np.float16 else 'fp32'}", dtype=produced)
            tensor.inputs[0].outputs[tensor.inputs[0].outputs.index(tensor)] = inner
            for reader in list(tensor.outputs):  # an output nodes read too (a backbone's feature map): read as it is made
                for k, read in enumerate(reader.inputs):
                    if read is tensor:
                        reader.inputs[k] = inner
            graph.nodes.append(gs.Node("Cast", name=f"{tensor.name}/Cast_out", attrs={"to": io_dtype}, inputs=[inner], outputs=[tensor]))
            tensor.dtype = io_dtype
    graph.cleanup().toposort()
    converted = export_like(graph, model)
    del converted.graph.value_info[:]  # stale FP32 shapes of intermediates would contradict the new types
    return onnx.shape_inference.infer_shapes(converted)
