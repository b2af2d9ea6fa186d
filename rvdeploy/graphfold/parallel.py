"""The parallel-branch pattern: branches that read one tensor and are summed become one Conv.

A sum tree is a tree of Add / Sub / Sum nodes, and Mul / Div by a per-channel constant (a layer
scale, FastViT's RepMixer, a distillation head's average), each inner node read only by its parent.
Its leaves are terms ``c * t`` (``c`` a per-channel coefficient) and constants. A term is a branch
of the shared input ``x`` when ``t`` is ``Conv(x)``, ``Gemm(x)``, ``BatchNormalization(x)`` or ``x``
itself, and its node is read by nothing else; the group is then one affine map of ``x``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from rvdeploy.graph_edit import node_label, producer
from rvdeploy.graphfold.constants import constant_value, single_reader
from rvdeploy.graphfold.linear import CONV, GEMM, AffineMap, diagonal_map, identity_map, merge
from rvdeploy.graphfold.nodes import NotFoldable, read_batch_norm
from rvdeploy.graphfold.reference import Expr, Input, SumRef
from rvdeploy.graphfold.results import PARALLEL
from rvdeploy.graphfold.state import FoldState

SUMS = ("Add", "Sub", "Sum")
AFFINE_OPS = ("Conv", "Gemm", "BatchNormalization")


def _scaled_operand(node: gs.Node) -> tuple[int, np.ndarray] | None:
    """For a Mul by a floating constant or a Div by one: (the other operand's index, the factor)."""
    if node.op not in ("Mul", "Div") or len(node.inputs) != 2:
        return None
    values = [constant_value(t) for t in node.inputs]
    if node.op == "Mul" and (values[0] is None) != (values[1] is None):
        index = 0 if values[0] is None else 1
        factor = values[1 - index]
    elif node.op == "Div" and values[0] is None and values[1] is not None:
        index, factor = 0, values[1]
    else:
        return None
    if factor.dtype.kind != "f" or not np.isfinite(factor).all() or (node.op == "Div" and (factor == 0).any()):
        return None
    factor = np.asarray(factor, np.float64)
    return index, factor if node.op == "Mul" else 1.0 / factor


def _is_linear(node: gs.Node) -> bool:
    return bool(node.outputs) and (node.op in SUMS or _scaled_operand(node) is not None)


@dataclass
class SumTree:
    nodes: list[gs.Node]  # root first
    terms: list[tuple[gs.Tensor, np.ndarray]] = field(default_factory=list)  # (tensor, coefficient)
    constants: list[np.ndarray] = field(default_factory=list)  # coefficient * value
    children: list[gs.Node] = field(default_factory=list)  # the root's inner linear nodes (roots of sub-trees)


def expand(state: FoldState, root: gs.Node) -> SumTree:
    tree = SumTree([])

    def visit(node: gs.Node, coefficient: np.ndarray) -> None:
        tree.nodes.append(node)
        scaled = _scaled_operand(node)
        if scaled is not None:
            operands = [(node.inputs[scaled[0]], coefficient * scaled[1])]
        elif node.op == "Sub":
            operands = [(node.inputs[0], coefficient), (node.inputs[1], -coefficient)]
        else:
            operands = [(t, coefficient) for t in node.inputs]
        for tensor, c in operands:
            value = constant_value(tensor)
            if value is not None:
                tree.constants.append(c * np.asarray(value, np.float64))
                continue
            inner = producer(tensor)
            if inner is not None and _is_linear(inner) and single_reader(tensor, state.outputs) is node:
                if node is root:
                    tree.children.append(inner)
                visit(inner, c)
            else:
                tree.terms.append((tensor, c))

    visit(root, np.ones(()))
    return tree


@dataclass
class Branch:
    tensor: gs.Tensor  # the summed term
    coefficient: np.ndarray
    source: gs.Tensor  # what the branch reads
    node: gs.Node | None  # its Conv, Gemm or BatchNormalization; None: the term is the tensor itself


def _branch(state: FoldState, tensor: gs.Tensor, coefficient: np.ndarray) -> Branch:
    node = producer(tensor)
    if node is not None and node.op in AFFINE_OPS and node.inputs and single_reader(tensor, state.outputs):
        return Branch(tensor, coefficient, node.inputs[0], node)
    return Branch(tensor, coefficient, tensor, None)


def _describe(branch: Branch, shared: gs.Tensor) -> str:
    """Why a branch that does not read the shared input cannot join the group."""
    if branch.node is not None:
        return (f"residual path: {branch.node.op} {node_label(branch.node)} reads {branch.source.name!r}, "
                f"not the shared input {shared.name!r}")
    made_by = producer(branch.tensor)
    if made_by is not None and made_by.op in AFFINE_OPS and made_by.inputs and made_by.inputs[0] is shared:
        others = [node_label(n) for n in branch.tensor.outputs if n.op not in SUMS] or ["a graph output"]
        return f"branch {made_by.op} {node_label(made_by)}'s output is also read by {', '.join(others)}"
    what = f"the output of {made_by.op} {node_label(made_by)}" if made_by is not None else "a graph input"
    return (f"residual path or other op in a branch: {branch.tensor.name!r} ({what}) is not a Conv, Gemm or "
            f"BatchNormalization of the shared input {shared.name!r}")


def _per_channel(value: np.ndarray, kind: str, channels: int, what: str) -> np.ndarray:
    """``value`` as one number per output channel; NotFoldable when it varies along another axis."""
    target = (1, channels, 1, 1) if kind == CONV else (1, channels)
    try:
        fits = np.broadcast_shapes(value.shape, target) == target
    except ValueError:
        fits = False
    if not fits:
        raise NotFoldable(f"{what} of shape {list(value.shape)} is not one value per channel")
    return np.broadcast_to(value, target).reshape(channels).astype(np.float64)


def _branch_map(state: FoldState, branch: Branch, kind: str) -> tuple[AffineMap | None, Expr]:
    """The branch as an affine map (None for the input itself: its size comes from the others)."""
    node = branch.node
    if node is None:
        return None, Input()
    if node.op == "BatchNormalization":
        bn = read_batch_norm(node)
        return diagonal_map(kind, *bn.scale_shift()), bn.reference(Input())
    if node.op == "Gemm":
        weight, bias = state.gemm(node)
        return AffineMap(GEMM, weight, bias), state.reference(node)
    conv, weight, bias = state.conv(node)
    problem = conv.centred_same_problem()
    if problem:
        raise NotFoldable(f"branch {node_label(node)}: {problem}")
    return AffineMap(CONV, weight, bias, conv.group, conv.strides), state.reference(node)


def _merge_group(state: FoldState, tree: SumTree, members: list[Branch]) -> tuple[AffineMap, Expr, gs.Node]:
    """The group's single map, its reference and the node it is named after; NotFoldable when it has none."""
    kinds = {b.node.op for b in members if b.node is not None and b.node.op != "BatchNormalization"}
    if len(kinds) > 1:
        raise NotFoldable("it mixes Conv and Gemm branches")
    kind = CONV if kinds == {"Conv"} else GEMM
    maps = [_branch_map(state, b, kind) for b in members]
    is_diagonal = [b.node is None or b.node.op == "BatchNormalization" for b in members]
    linear = [(b, m) for b, (m, _), d in zip(members, maps, is_diagonal) if not d]
    first, first_map = linear[0]
    outputs, inputs, strides = first_map.out_channels, first_map.in_channels, tuple(first_map.strides)
    for branch, m in linear[1:]:
        if (m.out_channels, m.in_channels) != (outputs, inputs):
            raise NotFoldable(f"branch {node_label(branch.node)} maps {m.in_channels}→{m.out_channels} channels, "
                              f"{node_label(first.node)} {inputs}→{outputs}")
        if tuple(m.strides) != strides:
            raise NotFoldable(f"branches have different strides: {node_label(branch.node)} {list(m.strides)}, "
                              f"{node_label(first.node)} {list(strides)}")
    for branch, (m, _), diagonal in zip(members, maps, is_diagonal):
        if diagonal and (inputs != outputs or any(s != 1 for s in strides)):
            raise NotFoldable(f"identity branch {branch.tensor.name!r} cannot match {node_label(first.node)} "
                              f"({inputs}→{outputs} channels, stride {list(strides)})")
        if diagonal and m is not None and m.out_channels != outputs:
            raise NotFoldable(f"branch {node_label(branch.node)} has {m.out_channels} channels, not {outputs}")
    full = [m if m is not None else identity_map(kind, outputs) for m, _ in maps]
    coefficients = [_per_channel(b.coefficient, kind, outputs, f"the factor on {b.tensor.name!r}") for b in members]
    constant = sum((_per_channel(c, kind, outputs, "a constant term") for c in tree.constants), np.zeros(outputs))
    reference = SumRef(tuple(zip(coefficients, (r for _, r in maps))), constant)
    return merge(full, coefficients, constant), reference, first.node


def fold_group(state: FoldState, root: gs.Node) -> int:
    """Fold the sum tree at ``root`` when its branches share one input; else try its inner sums."""
    tree = expand(state, root)
    branches = [_branch(state, t, c) for t, c in tree.terms]
    sources = [b.source for b in branches if b.node is not None and b.node.op in ("Conv", "Gemm")]
    if not sources:
        return 0  # nothing in it looks like a branch
    shared = max(sources, key=lambda s: sum(b.source is s for b in branches))
    members = [b for b in branches if b.source is shared]
    others = [b for b in branches if b.source is not shared]
    has_sum = any(n.op in SUMS for n in tree.nodes)
    try:
        if others:
            raise NotFoldable(_describe(others[0], shared))
        if not has_sum or (len(members) < 2 and not tree.constants):
            return 0
        folded, reference, first = _merge_group(state, tree, members)
    except NotFoldable as exc:
        state.leave(root, str(exc))
        return sum(fold_group(state, child) for child in tree.children)
    removed = tree.nodes + [b.node for b in members if b.node is not None]
    dtype = constant_value(first.inputs[1]).dtype
    state.replace(PARALLEL, root, removed, first.name or root.name, shared, folded, dtype, reference)
    return 1


def fold_parallel(state: FoldState) -> int:
    """Fold every maximal sum tree (one whose output is not summed further) that forms a group."""
    roots = []
    for node in state.graph.nodes:
        if _is_linear(node):
            reader = single_reader(node.outputs[0], state.outputs)
            if reader is None or not _is_linear(reader):
                roots.append(node)
    return sum(fold_group(state, root) for root in roots)
