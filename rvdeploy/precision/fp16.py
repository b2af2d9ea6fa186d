"""Strongly typed FP16 graphs: FP16 weights and FP16 compute, FP32 only where FP16 does not serve.

TensorRT 11 has no FP16 builder flag: a layer runs in FP16 because its tensors are FP16. Each node
is FP16 unless FP16 cannot hold its values on the observed inputs: a weight, or a tensor it reads
or writes, beyond FP16's range (±65504), or a tensor largely below its normal range (6.1e-5, where
values keep fewer bits). Such nodes stay FP32, with Cast nodes where the precision changes. Then a
label-free floor: where the graph's outputs still miss it, a run of FP16 nodes in graph order stays
FP32 too, a short run that reaches it (rounding early is amplified by everything after it: with
random weights, RT-DETR-L's stem alone costs its outputs 15 dB).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from rvdeploy.compare import json_safe
from rvdeploy.graph_edit import export_like
from rvdeploy.precision.calib import FP16_MAX, ActivationStats

FP16_TINY = float(np.finfo(np.float16).smallest_subnormal)  # below this a weight becomes 0
# A tensor whose FP16 copy is under this many dB from it lies largely below FP16's normal range (normal
# values reach about 74 dB). MobileNetV4-hybrid-medium (random weights, 160 px): its 61 such tensors (layer
# scales at 1e-7) in FP16 cost its outputs 25 dB (15.1 dB; 40.5 dB with them FP32); under 50 dB are only 8.
UNDERFLOW_SQNR_DB = 60.0
# Where the floor needs nodes kept FP32, the search aims this far over it, so that other inputs of the kind
# meet it too (RT-DETR-L, random weights, 160 px: 35.1 dB on the 64 calibration images, 35.5 on 16 others).
FLOOR_MARGIN_DB = 1.0


@dataclass(frozen=True)
class KeptFp32:
    """A node left in FP32, why (``kind``: one of rvdeploy.precision.choices.KEPT_FP32_FOR), and the detail."""

    node: str
    op: str
    kind: str
    reason: str


@dataclass
class Fp16Floor:
    """What the label-free floor did: a run of FP16 nodes in graph order kept FP32 until it held."""

    min_sqnr_db: float
    planned_sqnr_db: float  # with only the range and underflow plan's nodes FP32
    fp16_nodes: int  # that plan's FP16 nodes fed by the input, in graph order
    kept_from: int = 0  # [kept_from, kept_to) of them stay FP32 (an empty run: met without)
    kept_to: int = 0
    steps: list[dict] = field(default_factory=list)  # each candidate measured: from, to, sqnr_db
    met: bool = True


@dataclass
class Fp16Plan:
    model: onnx.ModelProto  # the converted graph
    kept_fp32: list[KeptFp32]
    weights_flushed_to_zero: int  # non-zero FP32 weights of FP16 nodes too small for FP16
    output_sqnr_db: float
    floor: Fp16Floor | None  # None: no floor


@dataclass
class Fp16Report:
    nodes_fp16: int
    kept_fp32: list[KeptFp32]
    weights_flushed_to_zero: int
    observed_inputs: int  # images (or probes) whose activations were checked
    observed_on: str  # "calibration images" or "random probes" (standard-normal, and smooth in [0, 1])
    judged_inputs: int  # the first of them (of each kind of random probe), on which the output SQNR is measured
    # the written graph's outputs against FP32's on those inputs, by ONNX Runtime on this CPU (which computes
    # FP16 ops it has no kernel for in FP32: the weights' rounding, not every tensor's)
    output_sqnr_db: float
    floor: Fp16Floor | None = None

    def to_dict(self) -> dict:
        return json_safe(asdict(self))


def _float_constants(node: gs.Node) -> list[gs.Constant]:
    return [t for t in node.inputs if isinstance(t, gs.Constant) and t.values.dtype == np.float32]


def plan_fp32_nodes(graph: gs.Graph, stats: ActivationStats) -> list[KeptFp32]:
    """The nodes FP16 cannot serve: out-of-range weights, or tensors read or written out of range or
    largely below FP16's normal range (:data:`UNDERFLOW_SQNR_DB`)."""
    kept = []
    for node in graph.nodes:
        reasons, kind = [], "underflow"
        for const in _float_constants(node):
            peak = float(np.abs(const.values).max()) if const.values.size else 0.0
            if peak > FP16_MAX:
                reasons.append(f"weight {const.name} reaches {peak:.3g}")
        for tensor in (t for t in (*node.inputs, *node.outputs) if not isinstance(t, gs.Constant)):
            peak = stats.peaks.get(tensor.name, 0.0)
            if peak > FP16_MAX:
                reasons.append(f"tensor {tensor.name} reaches {peak:.3g}")
        if reasons:
            kind = "range"
        for tensor in (t for t in (*node.inputs, *node.outputs) if not isinstance(t, gs.Constant)):
            sqnr = stats.fp16_sqnr_db.get(tensor.name, np.inf)
            if sqnr < UNDERFLOW_SQNR_DB:
                reasons.append(f"tensor {tensor.name}'s FP16 copy is {sqnr:.1f} dB from it")
        if reasons:
            kept.append(KeptFp32(node.name, node.op, kind, "; ".join(reasons)))
    return kept


def plan_fp16(model: onnx.ModelProto, stats: ActivationStats, sqnr: Callable[[onnx.ModelProto], float],
              min_sqnr_db: float | None, io_fp16: bool = False) -> Fp16Plan:
    """The FP16 graph of ``model``: FP32 where FP16 cannot hold the values ``stats`` saw
    (:func:`plan_fp32_nodes`), and where its output SQNR (``sqnr`` of a graph) misses ``min_sqnr_db``
    (None or 0: no floor), a short run of its FP16 nodes in graph order (:func:`_shortest_run`) that
    reaches it, aiming :data:`FLOOR_MARGIN_DB` over it. Every candidate is measured whole, and is in
    the floor's steps."""
    graph = gs.import_onnx(model)
    graph.toposort()
    kept = plan_fp32_nodes(graph, stats)
    names = {k.node for k in kept}
    converted = convert_fp16(model, names, io_fp16)
    planned = sqnr(converted)
    if not min_sqnr_db:
        return Fp16Plan(converted, kept, _flushed(graph, names), planned, None)
    fed = _input_fed(graph)  # nodes that only transform weights (TorchScript's Identity of a shared one) follow their readers
    order = [name for name in fp16_node_names(converted) if name in fed]  # a node is kept FP32 by its name
    floor = Fp16Floor(min_sqnr_db, planned, len(order))
    if planned >= min_sqnr_db:
        return Fp16Plan(converted, kept, _flushed(graph, names), planned, floor)

    def measure(start: int, stop: int) -> tuple[onnx.ModelProto, float]:
        candidate = convert_fp16(model, _with_weight_producers(graph, fed, names | set(order[start:stop])), io_fp16)
        value = sqnr(candidate)
        floor.steps.append({"from": start, "to": stop, "sqnr_db": value})
        return candidate, value

    start, stop, converted, final = _shortest_run(measure, len(order), min_sqnr_db + FLOOR_MARGIN_DB)
    floor.kept_from, floor.kept_to, floor.met = start, stop, final >= min_sqnr_db
    ops = {node.name: node.op for node in graph.nodes}
    reason = f"FP16 nodes {start + 1} to {stop} of {len(order)} in graph order, kept FP32 for the {min_sqnr_db:g} dB floor"
    chosen = _with_weight_producers(graph, fed, names | set(order[start:stop]))
    kept += [KeptFp32(name, ops.get(name, "?"), "floor", reason) for name in order[start:stop]]
    kept += [KeptFp32(name, ops.get(name, "?"), "floor", "transforms weights only, for nodes the floor keeps FP32")
             for name in sorted(chosen - names - set(order[start:stop]))]
    return Fp16Plan(converted, kept, _flushed(graph, chosen), final, floor)


def _shortest_run(measure: Callable[[int, int], tuple[onnx.ModelProto, float]], length: int, aim: float):
    """(start, stop, graph, SQNR) of a short run ``[start, stop)`` of the ``length`` nodes kept FP32 whose
    graph (``measure``) reaches ``aim``, or of all of them where none does. First the end: doubling from
    1/256 of the nodes until a run from the first reaches it, then bisecting to within an eighth; then the
    start, bisected so too: rounding early is amplified most (RT-DETR-L's stem), but one layer further on
    can matter alone (MobileNetV4-hybrid-medium: its first 176 FP16 nodes FP32 26.3 dB, 192 60.0 dB).
    Keeping more nodes FP32 nearly always raises the SQNR: about a dozen candidates."""
    missed, stop = 0, max(1, length // 256)  # the longest run from the first known to miss; the next to try
    while True:
        stop = min(stop, length)
        best = (0, stop, *measure(0, stop))
        if best[3] >= aim or stop == length:
            break
        missed, stop = stop, 2 * stop
    if best[3] < aim:
        return best
    while best[1] - missed > max(1, best[1] // 8):
        middle = (missed + best[1]) // 2
        tried = (0, middle, *measure(0, middle))
        if tried[3] >= aim:
            best = tried
        else:
            missed = middle
    met_from, missed_from = 0, best[1]  # an empty run misses: the floor search started because it did
    while missed_from - met_from > max(1, (best[1] - met_from) // 8):
        middle = (met_from + missed_from) // 2
        tried = (middle, best[1], *measure(middle, best[1]))
        if tried[3] >= aim:
            best, met_from = tried, middle
        else:
            missed_from = middle
    return best


def _input_fed(graph: gs.Graph) -> set[str]:
    """The nodes whose values depend on a graph input."""
    fed_tensors, fed = {t.name for t in graph.inputs}, set()
    for node in graph.nodes:  # in graph order (toposorted by import)
        if any(t.name in fed_tensors for t in node.inputs):
            fed.add(node.name)
            fed_tensors.update(t.name for t in node.outputs)
    return fed


def _with_weight_producers(graph: gs.Graph, fed: set[str], fp32: set[str]) -> set[str]:
    """``fp32`` and the nodes not ``fed`` by an input whose values an ``fp32`` node reads, however many
    steps upstream: an FP32 layer reads its weights unrounded."""
    chosen = set(fp32)
    for node in reversed(graph.nodes):
        if node.name not in fed and any(reader.name in chosen for out in node.outputs for reader in out.outputs):
            chosen.add(node.name)
    return chosen


def _flushed(graph: gs.Graph, fp32_nodes: set[str]) -> int:
    """How many non-zero FP32 weights of the FP16 nodes FP16 rounds to 0."""
    return sum(int(((np.abs(t.values) < FP16_TINY) & (t.values != 0)).sum())
               for node in graph.nodes if node.name not in fp32_nodes for t in _float_constants(node))


# Ops whose output type an attribute sets, not their inputs: they stay FP32 and their FP16 readers
# cast (TensorRT folds casts of constants). Cast itself converts by its "to".
_TYPED_BY_ATTRIBUTE = {"Constant", "ConstantOfShape", "EyeLike", "RandomNormal", "RandomUniform", "RandomNormalLike",
                       "RandomUniformLike", "Multinomial"}


def fp16_node_names(model: onnx.ModelProto) -> list[str]:
    """The nodes of a converted graph that compute in FP16 (write an FP16 tensor), its Casts aside, in graph order."""
    types = {v.name: v.type.tensor_type.elem_type for v in (*model.graph.value_info, *model.graph.output)}
    return [n.name for n in model.graph.node
            if n.op_type != "Cast" and any(types.get(o) == onnx.TensorProto.FLOAT16 for o in n.output)]


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
