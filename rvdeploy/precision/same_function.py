"""Proving that a rewritten graph computes its original's function: ONNX Runtime runs both on seeded
probes, and each output must be as close to the original's float64 value (ONNX's reference
runtime) as the original's own float32 run is, within :func:`rvdeploy.compare.compare_outputs`'s
budget. Cross-layer equalization proves itself with it.
"""

from __future__ import annotations


import numpy as np
import onnx
from onnx import numpy_helper

from rvdeploy.compare import Comparison, compare_outputs, worst
from rvdeploy.errors import QuantizeError, first_line
from rvdeploy.onnx_io import ort_session, run_session
from rvdeploy.probes import probe_feeds


def _as_float64(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same graph computing in float64 (for ONNX's reference runtime; ONNX Runtime has no
    float64 Conv)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    float32, float64 = onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE
    tensors = [*out.graph.initializer, *(a.t for n in out.graph.node if n.op_type == "Constant" for a in n.attribute)]
    for tensor in tensors:
        if tensor.data_type == float32:
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float64), tensor.name))
    for value in (*out.graph.input, *out.graph.output, *out.graph.value_info):
        if value.type.tensor_type.elem_type == float32:
            value.type.tensor_type.elem_type = float64
    for attr in (a for n in out.graph.node if n.op_type == "Cast" for a in n.attribute):
        attr.i = float64 if attr.name == "to" and attr.i == float32 else attr.i
    return out


def prove_same_function(original: onnx.ModelProto, changed: onnx.ModelProto, probe_size: int = 32,
                        what: str = "the equalized graph", original_name: str = "the original graph") -> Comparison:
    """``changed`` (called ``what`` in errors) against ``original`` (``original_name``) on seeded
    probes, each output within the budget of the original's own float32 noise (ONNX Runtime float32
    vs. ONNX's reference runtime in float64); the worst output's comparison, or
    :class:`QuantizeError` naming it."""
    from onnx.reference import ReferenceEvaluator

    feeds = probe_feeds(original, size=probe_size)
    names = [o.name for o in original.graph.output]
    # The original first: a graph ONNX Runtime cannot run is named as the user knows it.
    theirs, ours = (run_session(ort_session(graph.SerializeToString(), name=name, optimize=False), feeds, name, names)
                    for graph, name in ((original, original_name), (changed, what)))
    overflowing = next((name for name, out in zip(names, theirs) if not np.isfinite(out).all()), None)
    if overflowing:
        raise QuantizeError(f"on probe inputs {original_name}'s output {overflowing} and maybe more tensors take NaN or infinite "
                            "values (are its weights finite?); it cannot be quantized")
    try:
        exact = ReferenceEvaluator(_as_float64(original)).run(names, {k: v.astype(np.float64) for k, v in feeds.items()})
    except Exception as exc:  # the reference runtime's own errors: an op it does not implement in float64
        raise QuantizeError(f"cannot check {what}: ONNX's reference runtime cannot run the original in float64 "
                            f"({first_line(exc)})") from None
    checks = [compare_outputs(a, b, c) for a, b, c in zip(ours, exact, theirs)]
    closest = worst(checks)
    if not closest.passed:
        raise QuantizeError(f"{what} does not compute the original function: output {names[checks.index(closest)]} "
                            f"differs by {closest.max_rel_error:.3g} relative, over its float32 budget {closest.budget_rel:.3g}")
    return closest
