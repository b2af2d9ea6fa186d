"""Linear layers on tokens, written as Gemm so that INT8 quantizes them.

Exporters write ``nn.Linear`` on a 3-D (or deeper) tensor as a MatMul by a constant weight, then an
Add of the bias: a transformer's qkv, projection and MLP layers. INT8 quantizes Conv and Gemm, so
each such MatMul becomes a Gemm on the rows flattened to 2-D, with the weight transposed to (out, in)
and the bias as its C, and the leading axes restored after it. The arithmetic is the same (one matrix
product per row, then the bias). Every later INT8 step (calibration, equalization, rounding, bias
correction, the guard) then treats a token Linear as it treats a classifier's Gemm. Attention's
MatMuls, whose inputs are both computed, stay as they are.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from rvdeploy.graph_edit import export_like, producer

MIN_OPSET = 11  # Gemm's C optional, Flatten's axis negative


def _bias(product: gs.Variable, width: int, graph_outputs: set[str]) -> tuple[gs.Node, gs.Constant] | None:
    """The Add of a constant (width,) bias that is ``product``'s only reader, and that bias; else None."""
    if product.name in graph_outputs or len(product.outputs) != 1 or product.outputs[0].op != "Add":
        return None
    add = product.outputs[0]
    other = [t for t in add.inputs if t is not product]
    if len(other) != 1 or not isinstance(other[0], gs.Constant):
        return None
    bias = other[0]
    if bias.values.dtype != np.float32 or bias.values.size != width or bias.values.shape[-1:] != (width,):
        return None
    if bias.values.ndim > 1 and (product.shape is None or bias.values.ndim > len(product.shape)):
        return None  # the Add would broadcast the product up a rank
    return add, gs.Constant(f"{bias.name}_row", np.ascontiguousarray(bias.values.reshape(width)))


def _constant(tensor: gs.Tensor) -> gs.Constant | None:
    """``tensor`` where it is a constant, or an Identity of one (TorchScript's copy of a weight read twice)."""
    identity = producer(tensor, "Identity")
    source = identity.inputs[0] if identity is not None else tensor
    return source if isinstance(source, gs.Constant) else None


def linear_matmuls_as_gemm(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """``model`` with each MatMul by a constant 2-D float weight (and the bias Add after it) written as a
    Gemm, and the names of those layers (each Gemm keeps its MatMul's name); ``model`` itself where none is."""
    if max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0) < MIN_OPSET or not any(
            node.op_type == "MatMul" for node in model.graph.node):
        return model, []  # a conv net is not imported into graphsurgeon at all
    graph = gs.import_onnx(model)
    graph_outputs = {t.name for t in graph.outputs}
    transposed: dict[str, gs.Constant] = {}  # by weight name: a weight shared by several layers is copied once
    bias_rows: dict[str, gs.Constant] = {}  # so is a shared bias (RT-DETR's box heads): one tensor per name
    rows_of: dict[str, tuple[gs.Variable, gs.Variable]] = {}  # by input name: its 2-D rows and its leading axes
    layers = []
    for node in list(graph.nodes):
        if node.op != "MatMul" or isinstance(node.inputs[0], gs.Constant):
            continue
        x, weight = node.inputs[0], _constant(node.inputs[1])
        if weight is None or weight.values.dtype != np.float32 or weight.values.ndim != 2:
            continue
        name = node.name or f"{node.outputs[0].name}/Gemm"  # INT8 picks its layers by node name
        width = weight.values.shape[1]
        if weight.name not in transposed:
            transposed[weight.name] = gs.Constant(f"{weight.name}_out_in", np.ascontiguousarray(weight.values.T))
        bias = _bias(node.outputs[0], width, graph_outputs)
        result = bias[0].outputs[0] if bias else node.outputs[0]  # the tensor the layer writes, kept by name
        flat = x.shape is not None and len(x.shape) == 2
        if not flat and x.name not in rows_of:
            rows = gs.Variable(f"{x.name}_rows", np.float32)
            leading = gs.Variable(f"{x.name}_leading_axes", np.int64)
            graph.nodes.append(gs.Node("Flatten", f"{x.name}/rows", {"axis": -1}, [x], [rows]))
            shape = gs.Variable(f"{x.name}_shape", np.int64)
            graph.nodes.append(gs.Node("Shape", f"{x.name}/shape", inputs=[x], outputs=[shape]))
            graph.nodes.append(gs.Node("Slice", f"{x.name}/leading_axes", inputs=[
                shape, *(gs.Constant(f"{x.name}_leading_{what}", np.array([v], np.int64))
                         for what, v in (("start", 0), ("end", -1), ("axis", 0)))], outputs=[leading]))
            rows_of[x.name] = rows, leading
        result.inputs.clear()  # the Gemm (or its Reshape) writes it now; cleanup drops the MatMul and Add
        gemm_inputs = [x if flat else rows_of[x.name][0], transposed[weight.name]]
        gemm_inputs += [bias_rows.setdefault(bias[1].name, bias[1])] if bias else []
        if flat:
            graph.nodes.append(gs.Node("Gemm", name, {"transB": 1}, gemm_inputs, [result]))
        else:
            product = gs.Variable(f"{result.name}_rows", np.float32)
            graph.nodes.append(gs.Node("Gemm", name, {"transB": 1}, gemm_inputs, [product]))
            shape = gs.Variable(f"{result.name}_shape", np.int64)
            graph.nodes.append(gs.Node("Concat", f"{name}/shape", {"axis": 0}, [
                rows_of[x.name][1], gs.Constant(f"{result.name}_width", np.array([width], np.int64))], [shape]))
            graph.nodes.append(gs.Node("Reshape", f"{name}/restore", inputs=[product, shape], outputs=[result]))
        layers.append(name)
    if not layers:
        return model, []
    graph.cleanup().toposort()
    return export_like(graph, model), layers
