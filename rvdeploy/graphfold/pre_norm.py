"""BatchNormalizations folded into the linear layers beside them, across reshapes.

Forward (NextViT's and RepLKNet's pre-norm, :func:`fold_pre_norm`): through reshapes, transposes
and flattens that keep each value's channel, average pools without padding (an average of
``s x + t`` is ``s avg(x) + t``) and further BatchNormalizations, to every MatMul (on its last
axis) or Gemm at the ends. Every reader of the normalized values must be one of those: then the
norms go, and each layer at an end takes the channel scale into its weight and the shift into its
bias (a MatMul's bias Add's constant, or a new Add). A BatchNormalization that a Conv or Gemm reads
directly is the chain and gemm patterns' case.

Backward (LeViT's LinearNorm, :func:`fold_linear_norm`): ``BN(flatten(x @ W + b))`` takes the BN
into W's columns and the bias.

A channel is tracked through a reshape by the shapes ONNX's shape inference finds
(rvdeploy.graphfold.shapes; a flatten of a channel with the axes after it repeats its scale
there), and the proof checks it: the folded graph's tensor there, under the
norms, must be the input graph's tensor of the same name (forward), or the folded layer's output
the input graph's normalized one (backward).

A BatchNormalization before a zero-padded conv stays: the padded border would see zeros where the
normalized input has the shift (rvdeploy.graphfold.chains says so where it meets one).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from rvdeploy.graph_edit import node_label, producer
from rvdeploy.graphfold.constants import constant_value
from rvdeploy.graphfold.linear import GEMM, AffineMap
from rvdeploy.graphfold.nodes import BatchNormNode, NotFoldable, read_batch_norm
from rvdeploy.graphfold.reference import Expr, GemmRef, Input
from rvdeploy.graphfold.results import LINEAR_NORM, NORM_INTO_LINEAR
from rvdeploy.graphfold.shapes import kept_axis, merged_repeats
from rvdeploy.graphfold.state import Folded, FoldState, Relation

CARRIERS = ("Reshape", "Flatten", "Transpose", "AveragePool")
SHAPE_READERS = ("Shape", "Size")  # read a tensor's shape, which a fold keeps, not its values


def _only_value_reader(tensor: gs.Tensor, outputs: set[str]) -> gs.Node | None:
    """The one node that reads ``tensor``'s values (shape readers aside), when it is no graph output."""
    readers = [r for r in tensor.outputs if r.op not in SHAPE_READERS]
    return readers[0] if len(readers) == 1 and tensor.name not in outputs else None


@dataclass
class End:
    """A linear layer that reads the normalized values, and the norms between (first first)."""

    node: gs.Node
    tensor: gs.Tensor  # what it reads
    axis: int  # the channel axis there
    norms: list[BatchNormNode]
    taps: int  # the most values an average pool on the way sums


def _carried_axis(state: FoldState, node: gs.Node, axis: int) -> tuple[int, int]:
    """The channel axis in ``node``'s output, and how many side-by-side values each channel became there."""
    label = node_label(node)
    if node.op == "Transpose":
        rank = len(state.dims(node.inputs[0]) or ())
        perm = node.attrs.get("perm") or list(reversed(range(rank)))
        if not perm:
            raise NotFoldable(f"{label}: the rank of its input is not known")
        return list(perm).index(axis), 1
    if node.op == "AveragePool":
        if axis != 1:
            raise NotFoldable(f"{label} pools over the channel axis")
        if node.attrs.get("count_include_pad", 0) and any(node.attrs.get("pads", [])):
            raise NotFoldable(f"{label} counts zero padding into its averages: the shift would not pass through")
        return 1, 1
    before, after = state.dims(node.inputs[0]), state.dims(node.outputs[0])
    known = before and after and axis < len(before)
    moved = kept_axis(before, after, axis) if known else None
    if moved is not None:
        return moved, 1
    repeats = merged_repeats(before, after, axis) if known else None
    if repeats is None:
        raise NotFoldable(f"{label}: the shapes known ({before} → {after}) do not show that it keeps each channel")
    return axis, repeats


def _repeated(bn: BatchNormNode, repeats: int) -> BatchNormNode:
    """The norm of a channel axis merged with ``repeats`` values per channel."""
    if repeats == 1:
        return bn
    return BatchNormNode(*(np.repeat(v, repeats) for v in (bn.gamma, bn.beta, bn.mean, bn.var)), eps=bn.eps)


def _ends(state: FoldState, tensor: gs.Tensor, axis: int, norms: list[BatchNormNode], passed: list[gs.Node],
          taps: int = 1) -> list[End]:
    """The linear layers that read ``tensor`` (channel axis ``axis``), through carriers and norms;
    ``passed`` collects the nodes walked through."""
    if tensor.name in state.outputs:
        raise NotFoldable(f"{tensor.name!r} is a graph output")
    ends = []
    for reader in tensor.outputs:
        if reader.op in SHAPE_READERS:
            continue
        label = node_label(reader)
        reads_first = reader.inputs[0] is tensor and all(t is not tensor for t in reader.inputs[1:])
        rank = len(state.dims(tensor) or ())
        if reader.op == "BatchNormalization" and reads_first and axis == 1:
            passed.append(reader)
            ends += _ends(state, reader.outputs[0], 1, norms + [read_batch_norm(reader)], passed, taps)
        elif reader.op in CARRIERS and reads_first:
            passed.append(reader)
            pooled = int(np.prod(reader.attrs.get("kernel_shape", [1]))) if reader.op == "AveragePool" else 1
            moved, repeats = _carried_axis(state, reader, axis)
            ends += _ends(state, reader.outputs[0], moved, [_repeated(bn, repeats) for bn in norms], passed, taps * pooled)
        elif reader.op == "MatMul" and reads_first and rank and axis == rank - 1:
            ends.append(End(reader, tensor, axis, norms, taps))
        elif reader.op == "Gemm" and reads_first and rank == 2 and axis == 1:
            ends.append(End(reader, tensor, axis, norms, taps))
        else:
            raise NotFoldable(f"{label} ({reader.op}) reads it on axis {axis}: not a MatMul or Gemm on its channels, "
                              "a reshape that keeps them or a norm")
    return ends


def _composed(norms: list[BatchNormNode]) -> tuple[np.ndarray, np.ndarray]:
    scale, shift = np.ones(norms[0].gamma.shape[0]), np.zeros(norms[0].gamma.shape[0])
    for bn in norms:
        s, t = bn.scale_shift()
        scale, shift = scale * s, shift * s + t
    return scale, shift


def _norms_reference(norms: list[BatchNormNode]) -> Expr:
    expr: Expr = Input()
    for bn in norms:
        expr = bn.reference(expr)
    return expr


def _matmul_weight(state: FoldState, node: gs.Node) -> tuple[np.ndarray, gs.Node | None, int | None, np.ndarray]:
    """A MatMul's constant B [K, N], the bias Add that alone reads it (or None), the bias's operand
    index there, and the bias [N] (zeros without one)."""
    weight = constant_value(node.inputs[1])
    if weight is None or weight.ndim != 2 or weight.dtype.kind != "f":
        raise NotFoldable(f"{node_label(node)}: its second input is not a constant matrix")
    weight = np.asarray(weight, np.float64)
    add = node.outputs[0].outputs[0] if len(node.outputs[0].outputs) == 1 else None
    if add is not None and add.op == "Add" and node.outputs[0].name not in state.outputs:
        index = 1 if add.inputs[0] is node.outputs[0] else 0
        bias = constant_value(add.inputs[index])
        if bias is not None and bias.dtype.kind == "f" and bias.size == weight.shape[1] and \
                bias.shape[-1:] == (weight.shape[1],):
            return weight, add, index, np.asarray(bias, np.float64).reshape(-1)
    return weight, None, None, np.zeros(weight.shape[1])


def _rewrite_matmul(state: FoldState, node: gs.Node, add: gs.Node | None, index: int | None, folded: AffineMap,
                    dtype) -> gs.Tensor:
    """Give the MatMul ``node`` ``folded``'s weight and its bias Add (``add``'s constant at
    ``index``, or a new Add) its bias; returns the tensor the biased product is written to."""
    label = node_label(node)
    node.inputs[1] = state.constant(f"{label}.weight", folded.weight.T.astype(dtype))
    bias = state.constant(f"{label}.bias", folded.bias.astype(dtype))
    if add is not None:
        add.inputs[index] = bias
        return add.outputs[0]
    output = node.outputs[0]
    product = gs.Variable(f"{output.name}.product")
    node.outputs[0] = product
    state.insert_after(node, gs.Node("Add", f"{label}.bias_add", inputs=[product, bias], outputs=[output]))
    return output


def _fold_end(state: FoldState, end: End, source: gs.Tensor) -> None:
    """Give ``end``'s MatMul or Gemm the composed norm's scale and shift (a MatMul's bias goes to its
    bias Add's constant, or a new Add); register it for the proof. Runs after the norms are
    bypassed: the layer reads raw values."""
    node, label = end.node, node_label(end.node)
    scale, shift = _composed(end.norms)
    norms = _norms_reference(end.norms)
    dtype = constant_value(node.inputs[1]).dtype
    if node.op == "MatMul":
        weight, add, index, bias = _matmul_weight(state, node)
        folded = AffineMap(GEMM, (weight * scale[:, None]).T, bias + shift @ weight)
        reference = GemmRef(norms, weight.T, bias)
        output = _rewrite_matmul(state, node, add, index, folded, dtype)
        tokens = end.axis
    else:
        weight, bias = state.gemm(node)
        folded = AffineMap(GEMM, weight * scale[None, :], bias + weight @ shift)
        reference = state.reference(node).on(norms)
        node.attrs.update(transB=1, alpha=1.0, beta=1.0)
        node.inputs[1] = state.constant(f"{label}.weight", folded.weight.astype(dtype))
        bias_tensor = state.constant(f"{label}.bias", folded.bias.astype(dtype))
        if len(node.inputs) > 2:
            node.inputs[2] = bias_tensor
        else:
            node.inputs.append(bias_tensor)
        output, tokens = node.outputs[0], None
    state.folded[output.name] = Folded(NORM_INTO_LINEAR, label, node.inputs[0].name, reference, folded, tokens=tokens,
                                       relation=Relation(end.tensor.name, end.axis, source.name, norms, end.taps))


def fold_pre_norm(state: FoldState) -> int:
    """Fold each BatchNormalization whose normalized values only linear layers read (through
    channel-keeping reshapes) into those layers."""
    count = 0
    for bn_node in [n for n in state.graph.nodes if n.op == "BatchNormalization"]:
        if not bn_node.outputs or not bn_node.inputs:
            continue  # taken in by an earlier fold
        readers = bn_node.outputs[0].outputs
        if not readers or all(r.op not in CARRIERS for r in readers):
            continue  # direct readers: the chain and gemm patterns' cases
        passed: list[gs.Node] = []
        try:
            norm = read_batch_norm(bn_node)
            ends = _ends(state, bn_node.outputs[0], 1, [norm], passed)
            for end in ends:  # every end readable before anything is rewritten
                if end.node.op == "MatMul":
                    _matmul_weight(state, end.node)
                else:
                    state.gemm(end.node)
        except NotFoldable as exc:
            state.leave(bn_node, f"pre-norm not folded: {exc}")
            continue
        norms = [bn_node] + [n for n in passed if n.op == "BatchNormalization"]
        state.record(NORM_INTO_LINEAR, bn_node.outputs[0].name, tuple(node_label(n) for n in norms + [e.node for e in ends]))
        source = bn_node.inputs[0]
        for bn in norms:  # their readers read what they normalized
            state.bypass(bn)
        for end in ends:
            _fold_end(state, end, source)
        count += 1
    return count


def _linear_before(state: FoldState, bn_node: gs.Node) -> tuple[gs.Node, list[gs.Node]]:
    """The MatMul (or its bias Add) whose output ``bn_node`` normalizes (LeViT's LinearNorm: Linear →
    flatten → BN1d), through reshapes that keep each output column a channel, and those reshapes;
    NotFoldable if none."""
    tensor, axis = bn_node.inputs[0], 1
    dims = state.dims(tensor)
    if dims is None or len(dims) != 2:
        raise NotFoldable("its input is not known to be rows of channels (2-d)")
    carriers, reader = [], bn_node
    while True:
        node = producer(tensor)
        if node is None or _only_value_reader(tensor, state.outputs) is not reader:
            raise NotFoldable("no MatMul before it that only it reads")
        if node.op == "Add":
            matmul = next((producer(t) for t in node.inputs if producer(t) is not None), None)
            if matmul is None or matmul.op != "MatMul" or _matmul_weight(state, matmul)[1] is not node:
                raise NotFoldable(f"{node_label(node)} before it: not a MatMul's bias")
            node = matmul
        if node.op == "MatMul":
            rank = len(state.dims(tensor) or ())
            if not rank or axis != rank - 1:
                raise NotFoldable(f"{node_label(node)}'s columns do not reach its channels")
            return node, carriers
        if node.op not in ("Reshape", "Flatten"):
            raise NotFoldable(f"{node_label(node)} ({node.op}) before it: not a MatMul or a reshape")
        before, after = state.dims(node.inputs[0]), state.dims(tensor)
        moved = kept_axis(after, before, axis) if before and after else None
        if moved is None:
            raise NotFoldable(f"{node_label(node)}: the shapes known ({before} → {after}) do not show that it keeps each channel")
        carriers.append(node)
        tensor, axis, reader = node.inputs[0], moved, node


def fold_linear_norm(state: FoldState) -> int:
    """``BN(reshape(x @ W))`` → ``reshape(x @ W' + b')``: the BN's scale into W's columns, its shift the bias."""
    count = 0
    for bn_node in [n for n in state.graph.nodes if n.op == "BatchNormalization"]:
        if not bn_node.outputs or not bn_node.inputs or producer(bn_node.inputs[0]) is None or \
                producer(bn_node.inputs[0]).op not in ("Reshape", "Flatten"):
            continue
        try:
            bn = read_batch_norm(bn_node)
            matmul, carriers = _linear_before(state, bn_node)
            weight, add, index, bias = _matmul_weight(state, matmul)
            if weight.shape[1] != bn.gamma.shape[0]:
                raise NotFoldable(f"{node_label(matmul)}: {weight.shape[1]} columns for {bn.gamma.shape[0]} channels")
        except NotFoldable as exc:
            state.leave(bn_node, f"linear+bn not folded: {exc}")
            continue
        label, normalized = node_label(matmul), bn_node.outputs[0].name
        dtype = constant_value(matmul.inputs[1]).dtype
        scale, shift = bn.scale_shift()
        folded = AffineMap(GEMM, (weight * scale[None, :]).T, bias * scale + shift)
        source = matmul.inputs[0]
        state.record(LINEAR_NORM, matmul.outputs[0].name, (label, *(node_label(n) for n in carriers), node_label(bn_node)))
        state.bypass(bn_node)
        output = _rewrite_matmul(state, matmul, add, index, folded, dtype)
        reference = bn.reference(GemmRef(Input(), weight.T, bias))
        state.folded[output.name] = Folded(LINEAR_NORM, label, source.name, reference, folded, tokens=-1,  # its last axis
                                           relation=Relation(normalized, 1, source.name, reference))
        count += 1
    return count
