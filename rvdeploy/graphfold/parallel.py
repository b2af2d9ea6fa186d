"""The parallel-branch pattern: branches that read one tensor and are summed become one Conv.

A sum tree is a tree of Add / Sub / Sum nodes, and Mul / Div by a per-channel constant (a layer
scale, FastViT's RepMixer, a distillation head's average), each inner node read only by its parent.
Its leaves are terms ``c * t`` (``c`` a per-channel coefficient) and constants. A term is a branch
of the shared input ``x`` when ``t`` is ``Conv(x)``, ``Gemm(x)``, ``BatchNormalization(x)`` or ``x``
itself, and its node is read by nothing else; the group is then one affine map of ``x``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import onnx_graphsurgeon as gs

from rvdeploy.graph_edit import node_label, producer
from rvdeploy.graphfold.chains import CHAIN_OPS, Step, input_channels, read_step, then
from rvdeploy.graphfold.constants import constant_value, single_reader
from rvdeploy.graphfold.linear import CONV, GEMM, AffineMap, diagonal_map, identity_map, merge, undilated
from rvdeploy.graphfold.nodes import NotFoldable, read_batch_norm
from rvdeploy.graphfold.reference import Expr, Input, SumRef
from rvdeploy.graphfold.results import PARALLEL
from rvdeploy.graphfold.state import FoldState

SUMS = ("Add", "Sub", "Sum")
AFFINE_OPS = ("Gemm",) + CHAIN_OPS


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
    nodes: list[gs.Node]  # the linear nodes that compute it, last first (a Conv, Gemm or a chain); none: the input itself

    @property
    def sources(self) -> list[gs.Tensor]:
        """The tensors the branch can be read as a function of, nearest first."""
        return [n.inputs[0] for n in self.nodes] or [self.tensor]

    def cut_at(self, shared: gs.Tensor) -> Branch:
        """The branch as a function of ``shared`` (one of its sources)."""
        if not self.nodes:
            return self
        index = next(i for i, s in enumerate(self.sources) if s is shared)
        return Branch(self.tensor, self.coefficient, self.nodes[:index + 1])


def _branch(state: FoldState, tensor: gs.Tensor, coefficient: np.ndarray) -> Branch:
    """The term's branch: its Conv, Gemm, BatchNormalization or AveragePool, and the chain of such
    nodes behind it, each read only by the next."""
    node = producer(tensor)
    if node is None or node.op not in AFFINE_OPS or not node.inputs or not single_reader(tensor, state.outputs):
        return Branch(tensor, coefficient, [])
    nodes = [node]
    while node.op in CHAIN_OPS:
        node = producer(node.inputs[0])
        if node is None or node.op not in CHAIN_OPS or not node.inputs or \
                single_reader(node.outputs[0], state.outputs) is not nodes[-1]:
            break
        nodes.append(node)
    return Branch(tensor, coefficient, nodes)


def _describe(branch: Branch, shared: gs.Tensor) -> str:
    """Why a branch that does not read the shared input cannot join the group."""
    if branch.nodes:
        node = branch.nodes[-1]
        return (f"residual path: {node.op} {node_label(node)} reads {branch.sources[-1].name!r}, "
                f"not the shared input {shared.name!r}")
    made_by = producer(branch.tensor)
    if made_by is not None and made_by.op in AFFINE_OPS and made_by.inputs and made_by.inputs[0] is shared:
        others = [node_label(n) for n in branch.tensor.outputs if n.op not in SUMS] or ["a graph output"]
        return f"branch {made_by.op} {node_label(made_by)}'s output is also read by {', '.join(others)}"
    what = f"the output of {made_by.op} {node_label(made_by)}" if made_by is not None else "a graph input"
    return (f"residual path or other op in a branch: {branch.tensor.name!r} ({what}) is not a Conv, Gemm, "
            f"BatchNormalization or AveragePool of the shared input {shared.name!r}")


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


def _check_shapes(members: list[Branch], maps: list[AffineMap | None], diagonal: list[bool]) -> tuple[int, int]:
    """The group's (output, input) channels; NotFoldable when its branches do not all map them alike."""
    linear = [(b, m) for b, m, d in zip(members, maps, diagonal) if not d]
    first, first_map = linear[0]
    outputs, inputs, strides = first_map.out_channels, first_map.in_channels, tuple(first_map.strides)
    name = lambda b: node_label(b.nodes[0])  # noqa: E731
    for branch, m in linear[1:]:
        if (m.out_channels, m.in_channels) != (outputs, inputs):
            raise NotFoldable(f"branch {name(branch)} maps {m.in_channels}→{m.out_channels} channels, "
                              f"{name(first)} {inputs}→{outputs}")
        if tuple(m.strides) != strides:
            raise NotFoldable(f"branches have different strides: {name(branch)} {list(m.strides)}, "
                              f"{name(first)} {list(strides)}")
    for branch, m, d in zip(members, maps, diagonal):
        if d and (inputs != outputs or any(s != 1 for s in strides)):
            raise NotFoldable(f"identity branch {branch.tensor.name!r} cannot match {name(first)} "
                              f"({inputs}→{outputs} channels, stride {list(strides)})")
        if d and m is not None and m.out_channels != outputs:
            raise NotFoldable(f"branch {name(branch)} has {m.out_channels} channels, not {outputs}")
    return outputs, inputs


def _gemm_branches(state: FoldState, members: list[Branch]) -> tuple[list[AffineMap | None], list[Expr]]:
    maps, references = [], []
    for branch in members:
        if len(branch.nodes) > 1 or any(n.op not in ("Gemm", "BatchNormalization") for n in branch.nodes):
            raise NotFoldable(f"branch {node_label(branch.nodes[0])}: a chain of nodes before a Gemm group")
        node = branch.nodes[0] if branch.nodes else None
        if node is None:
            maps.append(None)
            references.append(Input())
        elif node.op == "BatchNormalization":
            bn = read_batch_norm(node)
            maps.append(diagonal_map(GEMM, *bn.scale_shift()))
            references.append(bn.reference(Input()))
        else:
            weight, bias = state.gemm(node)
            maps.append(AffineMap(GEMM, weight, bias))
            references.append(state.reference(node))
    return maps, references


def _conv_branches(state: FoldState, members: list[Branch]) -> tuple[list[AffineMap | None], list[Expr]]:
    """Each branch's chain as one conv, dilations made alike (a group with one dilation merges
    dilated; mixed ones merge with their taps spread out), every kernel checked to be centred."""
    channels = next((input_channels(b.nodes[-1]) for b in members if b.nodes and b.nodes[-1].op != "AveragePool"), None)
    steps: list[Step | None] = []
    for branch in members:
        step = None
        for node in reversed(branch.nodes):
            after = read_step(state, node, channels if step is None else step.map.out_channels)
            step = after if step is None else then(step, after)
        if step is not None and (problem := step.centred_problem()):
            raise NotFoldable(f"branch {problem}")
        steps.append(step)
    dilations = {s.map.dilations for s in steps if s is not None and s.map.weight.shape[2:] != (1, 1)}
    if len(dilations) == 1:
        common = dilations.pop()
        maps = [None if s is None else replace(s.map, dilations=common) for s in steps]
    else:
        maps = [None if s is None else undilated(s.map) for s in steps]
    return maps, [Input() if s is None else s.reference for s in steps]


def _merge_group(state: FoldState, tree: SumTree, members: list[Branch]) -> tuple[AffineMap, Expr, gs.Node]:
    """The group's single map, its reference and the node it is named after; NotFoldable when it has none."""
    ops = {n.op for b in members for n in b.nodes}
    if "Gemm" in ops and ops & {"Conv", "AveragePool"}:
        raise NotFoldable("it mixes Conv and Gemm branches")
    kind = GEMM if "Gemm" in ops else CONV
    maps, references = (_gemm_branches if kind == GEMM else _conv_branches)(state, members)
    diagonal = [not b.nodes or [n.op for n in b.nodes] == ["BatchNormalization"] for b in members]
    outputs, _ = _check_shapes(members, maps, diagonal)
    full = [m if m is not None else identity_map(kind, outputs) for m in maps]
    coefficients = [_per_channel(b.coefficient, kind, outputs, f"the factor on {b.tensor.name!r}") for b in members]
    constant = sum((_per_channel(c, kind, outputs, "a constant term") for c in tree.constants), np.zeros(outputs))
    reference = SumRef(tuple(zip(coefficients, references)), constant)
    first = next(n for b in members for n in b.nodes if n.op in ("Conv", "Gemm"))
    return merge(full, coefficients, constant), reference, first


def _reads(branch: Branch, tensor: gs.Tensor) -> bool:
    return any(s is tensor for s in branch.sources)


def fold_group(state: FoldState, root: gs.Node) -> int:
    """Fold the sum tree at ``root`` when its branches share one input; else try its inner sums."""
    tree = expand(state, root)
    branches = [_branch(state, t, c) for t, c in tree.terms]
    sources = [s for b in branches if any(n.op in ("Conv", "Gemm") for n in b.nodes) for s in b.sources]
    if not sources:
        return 0  # nothing in it looks like a branch
    shared = max(sources, key=lambda s: sum(_reads(b, s) for b in branches))
    members = [b.cut_at(shared) for b in branches if _reads(b, shared)]
    others = [b for b in branches if not _reads(b, shared)]
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
    removed = tree.nodes + [n for b in members for n in b.nodes]
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
