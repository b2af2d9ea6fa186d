"""Graph verification with onnx-graphsurgeon, and numeric parity with ONNX Runtime.

A deployable RepVGG graph is one chain: input → (Conv 3x3 → [SE] → Relu) × layers →
GlobalAveragePool → Flatten → Gemm → output; a backbone export ends at its last feature stage
instead, each requested stage's output a graph output. Every violation names the node it was found at.

A graph rvdeploy did not write (no rvdeploy metadata) has no recipe to be checked against: it gets
the ONNX checker, an ONNX Runtime load and a lint counting the re-parameterizable structures still
in it (what ``rvdeploy fuse MODEL.onnx`` would fold).
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch

from rvdeploy.arch import ArchSpec, BlockSpec
from rvdeploy.compare import compare_outputs, worst
from rvdeploy.errors import RvdeployError
from rvdeploy.graphfold import (BN_GEMM, CONV_BN, CONV_CHAIN, LINEAR_NORM, NORM_INTO_LINEAR, PARALLEL, PRE_BN,
                                find_foldable)
from rvdeploy.model import as_tuple
from rvdeploy.onnx_io import load_onnx, ort_session, read_metadata, run_session
from rvdeploy.preprocess import parse_size
from rvdeploy.weights import DeployWeights, TrainWeights

BODY_OPS = {"Conv", "Relu"}
HEAD_OPS = {"GlobalAveragePool", "Flatten", "Gemm"}
SE_OPS = {"GlobalAveragePool", "Conv", "Relu", "Sigmoid", "Mul"}


class VerifyError(RvdeployError):
    """The file is not an ONNX graph that can be checked at all."""


@dataclass(frozen=True)
class Violation:
    node: str
    op: str
    message: str

    def __str__(self) -> str:
        return f"{self.node} ({self.op}): {self.message}"


@dataclass(frozen=True)
class Parity:
    """ONNX Runtime against the torch net, both float32, measured against the torch net in float64."""

    batches: tuple[int, ...]
    max_abs_error: float  # ONNX Runtime vs. torch float32: what a user sees
    max_rel_error: float  # ONNX Runtime vs. torch float64, relative to the largest output
    float32_noise_rel: float  # torch float32 vs. float64: what float32 explains
    tolerance_rel: float
    reference: str  # what ONNX Runtime was compared with
    passed: bool
    outputs: tuple[str, ...] = ()  # every graph output compared
    worst_output: str | None = None  # the one closest to (or furthest over) its tolerance


@dataclass
class VerifyReport:
    path: str
    arch: str | None
    expected_layers: int | None
    conv_layers: int
    violations: list[Violation] = field(default_factory=list)
    parity: Parity | None = None
    outputs: tuple[str, ...] = ()  # the graph's outputs: several for a backbone (feature) export
    foreign: bool = False  # no rvdeploy metadata: checked by the lint, not against a recipe
    foldable: dict[str, int] = field(default_factory=dict)  # foreign graphs: foldable groups left, by kind
    left_alone: list[dict] = field(default_factory=list)  # foreign graphs: look-alikes the fold would leave, and why

    @property
    def foldable_groups(self) -> int:
        return sum(self.foldable.values())

    @property
    def ok(self) -> bool:
        return not self.violations and (self.parity is None or self.parity.passed)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["ok"] = self.ok
        data["violations"] = [asdict(v) for v in self.violations]
        data["foldable_groups"] = self.foldable_groups
        return data


class _ChainBroken(Exception):
    """The walk along the chain cannot go on; the violation is already recorded."""


class _Walker:
    """Follows the single chain from the graph input to its output, recording what deviates."""

    def __init__(self, graph: gs.Graph, violations: list[Violation]) -> None:
        self.graph = graph
        self.violations = violations
        self.visited: set[int] = set()

    def fail(self, node: gs.Node | None, message: str) -> None:
        self.violations.append(Violation(node.name if node else "<graph>", node.op if node else "-", message))

    def next_node(self, tensor: gs.Tensor, ops: set[str], after: str) -> gs.Node:
        consumers = list(tensor.outputs)
        if len(consumers) != 1:
            names = ", ".join(f"{n.name} ({n.op})" for n in consumers) or "nothing"
            producer = tensor.inputs[0] if tensor.inputs else None
            what = f"its output {tensor.name}" if producer else f"the graph input {tensor.name}"
            self.fail(producer, f"{what} feeds {len(consumers)} nodes ({names}); the chain must not branch")
            raise _ChainBroken
        node = consumers[0]
        if node.op not in ops:
            self.fail(node, f"expected {' or '.join(sorted(ops))} after {after}")
            raise _ChainBroken
        self.visited.add(id(node))
        return node

    def check_conv(self, conv: gs.Node, block: BlockSpec | None) -> None:
        attrs = conv.attrs
        weight = conv.inputs[1] if len(conv.inputs) > 1 else None
        kernel = list(attrs.get("kernel_shape", weight.shape[2:] if weight is not None and weight.shape else []))
        if kernel != [3, 3]:
            self.fail(conv, f"kernel {kernel}, expected 3x3")
        if list(attrs.get("pads", [0, 0, 0, 0])) != [1, 1, 1, 1]:
            self.fail(conv, f"pads {attrs.get('pads')}, expected [1, 1, 1, 1]")
        strides = list(attrs.get("strides", [1, 1]))
        if strides not in ([1, 1], [2, 2]):
            self.fail(conv, f"strides {strides}, expected 1 or 2")
        if list(attrs.get("dilations", [1, 1])) != [1, 1]:
            self.fail(conv, f"dilations {attrs.get('dilations')}, expected 1")
        if not isinstance(weight, gs.Constant):
            self.fail(conv, "its weight is not a constant initializer")
        if block is None:
            return
        if strides != [block.stride] * 2:
            self.fail(conv, f"stride {strides}, {block.name} has stride {block.stride}")
        if attrs.get("group", 1) != block.groups:
            self.fail(conv, f"group {attrs.get('group', 1)}, {block.name} has {block.groups}")
        if weight is not None and weight.shape is not None:
            expected = [block.out_channels, block.in_channels // block.groups, 3, 3]
            if list(weight.shape) != expected:
                self.fail(conv, f"weight shape {list(weight.shape)}, {block.name} needs {expected}")

    def walk_se(self, features: gs.Tensor, conv: gs.Node) -> gs.Tensor:
        """Squeeze-excitation: features → GAP → Conv → Relu → Conv → Sigmoid → Mul(features, gate)."""
        consumers = sorted(features.outputs, key=lambda n: n.op)
        if [n.op for n in consumers] != ["GlobalAveragePool", "Mul"]:
            self.fail(conv, f"expected squeeze-excitation (GlobalAveragePool and Mul) after it, found {[n.op for n in consumers]}")
            raise _ChainBroken
        pool, mul = consumers
        self.visited.update({id(pool), id(mul)})
        gate = pool.outputs[0]
        for op in ("Conv", "Relu", "Conv", "Sigmoid"):
            gate = self.next_node(gate, {op}, "the SE's previous op").outputs[0]
        if mul not in gate.outputs:
            self.fail(mul, "the SE gate does not multiply the block's features")
            raise _ChainBroken
        return mul.outputs[0]

    def walk(self, spec: ArchSpec | None, stages: tuple[int, ...] = ()) -> int:
        """Walk the chain; return the number of body convs passed. With feature ``stages`` the chain ends
        at the last feature stage, whose outputs must be the graph's outputs."""
        tensor = self.graph.inputs[0]
        blocks = list(_checked_blocks(spec, stages)) if spec else None
        stage_ends = {spec.blocks_through(s): s for s in stages} if stages else {}
        stage_outputs: dict[int, gs.Tensor] = {}
        layers, after = 0, "the graph input"
        while blocks is None or layers < len(blocks):
            consumers = tensor.outputs
            if blocks is None and (len(consumers) != 1 or consumers[0].op != "Conv"):
                break  # no metadata: the body ends where the convs end
            conv = self.next_node(tensor, {"Conv"}, after)
            self.check_conv(conv, blocks[layers] if blocks else None)
            features = conv.outputs[0]
            if blocks and blocks[layers].se_channels:
                features = self.walk_se(features, conv)
            relu = self.next_node(features, {"Relu"}, conv.name)
            tensor, after = relu.outputs[0], relu.name
            layers += 1
            if layers in stage_ends:
                stage_outputs[stage_ends[layers]] = tensor
        if stages:
            self.check_feature_outputs([stage_outputs[s] for s in sorted(stages)], tensor.inputs[0])
            return layers
        pool = self.next_node(tensor, {"GlobalAveragePool"}, after)
        flat = self.next_node(pool.outputs[0], {"Flatten", "Reshape"}, pool.name)
        gemm = self.next_node(flat.outputs[0], {"Gemm"}, flat.name)
        if gemm.outputs[0] not in self.graph.outputs:
            self.fail(gemm, "the classifier's output is not the graph output")
        return layers

    def check_feature_outputs(self, expected: list[gs.Tensor], last: gs.Node) -> None:
        names = [t.name for t in self.graph.outputs]
        if names != [t.name for t in expected]:
            self.fail(last, f"the graph outputs {names} are not the feature stages' outputs {[t.name for t in expected]}")


def check_graph(model: onnx.ModelProto, path: str = "<model>") -> VerifyReport:
    """Every structural check; violations are collected, not raised."""
    violations: list[Violation] = []
    meta = read_metadata(model)
    try:  # the recipe the checks are measured against; a damaged one cannot be checked against
        spec = ArchSpec.from_dict(meta["arch_spec"]) if "arch_spec" in meta else None
        input_size = list(parse_size(meta["input_size"])) if "input_size" in meta else None
        features = _features(meta, spec)
    except RvdeployError as exc:
        raise VerifyError(f"{path}: its rvdeploy metadata is malformed: {exc}") from None
    if spec is None:
        violations.append(Violation("<graph>", "-", "no rvdeploy metadata: the layer count and groups cannot be checked"))
    graph = gs.import_onnx(model)
    allowed = BODY_OPS | (set() if features else HEAD_OPS | {"Reshape"}) | (SE_OPS if spec is None or spec.se else set())
    for node in graph.nodes:
        if node.op not in allowed:
            violations.append(Violation(node.name, node.op, f"{node.op} does not belong in a plain RepVGG graph"))
    expected_outputs = len(features) or 1
    if len(graph.inputs) != 1 or len(graph.outputs) != expected_outputs:
        violations.append(Violation("<graph>", "-", f"{len(graph.inputs)} inputs and {len(graph.outputs)} outputs, "
                                                    f"expected 1 and {expected_outputs}"))
    else:
        shape = graph.inputs[0].shape or []
        expected_chw = [spec.in_channels, *input_size] if spec and input_size else None
        if len(shape) != 4 or (expected_chw and list(shape[1:]) != expected_chw):
            violations.append(Violation("<graph>", "-", f"input shape {shape}, expected [batch, {expected_chw or 'C, H, W'}]"))
    walker = _Walker(graph, violations)
    layers = 0
    if len(graph.inputs) == 1:
        try:
            layers = walker.walk(spec, features)
        except _ChainBroken:
            pass
        else:
            for node in graph.nodes:
                if id(node) not in walker.visited:
                    violations.append(Violation(node.name, node.op, "not on the chain from input to output"))
    convs = sum(1 for n in graph.nodes if n.op == "Conv")
    blocks = _checked_blocks(spec, features) if spec else ()
    se_convs = 2 * sum(1 for b in blocks if b.se_channels)
    if spec is not None and convs - se_convs != len(blocks):
        violations.append(Violation(
            "<graph>", "-", f"{convs - se_convs} body Conv nodes, {spec.name} has {len(blocks)} layers"
            + (f" up to stage {max(features)}" if features else "")
        ))
    return VerifyReport(
        path=path,
        arch=spec.name if spec else None,
        expected_layers=len(blocks) if spec else None,
        conv_layers=layers,
        violations=violations,
        outputs=tuple(t.name for t in graph.outputs),
    )


def _checked_blocks(spec: ArchSpec, stages: tuple[int, ...]) -> tuple[BlockSpec, ...]:
    """The blocks a graph must hold: all of them, or a backbone's up to its last feature stage."""
    return spec.blocks[: spec.blocks_through(max(stages))] if stages else spec.blocks


def _features(meta: dict, spec: ArchSpec | None) -> tuple[int, ...]:
    """The feature stages a backbone export gives (empty for a classifier), checked against its spec."""
    features = meta.get("features")
    if features is None:
        return ()
    last = spec.num_stages - 1 if spec else -1
    if (not isinstance(features, list) or not features or len(set(features)) != len(features)
            or not all(isinstance(f, int) and not isinstance(f, bool) and 0 <= f <= last for f in features)):
        raise VerifyError(f"rvdeploy.features {str(features)[:40]} is not a list of distinct stages 0..{last}")
    return tuple(sorted(features))


def check_parity(
    path: str | os.PathLike,
    weights: TrainWeights | DeployWeights,
    batches: tuple[int, ...] = (1, 3),
    seed: int = 0,
    features: tuple[int, ...] = (),
) -> Parity:
    """ONNX Runtime on the graph vs. the torch net of ``weights`` on seeded probe batches; with
    ``features`` (a backbone export) every stage output against the torch net's, each on its own scale."""
    session = ort_session(path)
    feed = session.get_inputs()[0]
    _, channels, height, width = feed.shape
    if isinstance(feed.shape[0], int):
        batches = (feed.shape[0],)
    if (channels, height, width) != (weights.spec.in_channels, *feed.shape[2:]) or not isinstance(height, int):
        raise VerifyError(f"graph input {feed.shape} does not fit {weights.spec.name}'s {weights.spec.in_channels} channels")
    model32, model64 = weights.to_module(), weights.to_module(torch.float64)
    if features:
        model32.as_backbone(features)
        model64.as_backbone(features)
    elif weights.spec.headless:
        raise VerifyError(f"{weights.spec.name} has no classifier: it can only be compared with a --features export")
    names = [o.name for o in session.get_outputs()]
    generator = torch.Generator().manual_seed(seed)
    got, expected32, expected64 = [], [], []  # per batch, per output
    for batch in batches:
        x = torch.randn(batch, channels, height, width, generator=generator)
        with torch.inference_mode():
            expected32.append([t.numpy() for t in as_tuple(model32(x))])
            expected64.append([t.numpy() for t in as_tuple(model64(x.double()))])
        got.append(run_session(session, {feed.name: x.numpy()}, path))
        shapes, torch_shapes = [g.shape for g in got[-1]], [e.shape for e in expected32[-1]]
        if shapes != torch_shapes:
            raise VerifyError(f"ONNX Runtime output shapes {shapes}, torch gives {torch_shapes}")
    comparisons = [
        compare_outputs(*(np.concatenate([per_batch[i] for per_batch in runs]) for runs in (got, expected64, expected32)))
        for i in range(len(names))
    ]
    closest = worst(comparisons)
    return Parity(
        batches=tuple(batches),
        max_abs_error=max(c.max_abs_error for c in comparisons),
        max_rel_error=closest.max_rel_error,
        float32_noise_rel=closest.noise_rel,
        tolerance_rel=closest.budget_rel,
        reference=f"{weights.form} torch model",
        passed=all(bool(c.passed) for c in comparisons),
        outputs=tuple(names),
        worst_output=names[comparisons.index(closest)],
    )


# What a plain graph must not have left; a constant subgraph alone (shape arithmetic on constants)
# is not re-parameterization and passes.
FOLDABLE_LABELS = {PARALLEL: "foldable branch groups", CONV_BN: "Conv → BatchNormalization pairs",
                   BN_GEMM: "BatchNormalization → Gemm pairs", PRE_BN: "BatchNormalization → Conv pairs",
                   CONV_CHAIN: "Conv → Conv chains", NORM_INTO_LINEAR: "BatchNormalizations before MatMuls",
                   LINEAR_NORM: "MatMul → BatchNormalization pairs"}


def lint_foreign(model: onnx.ModelProto, path: str | os.PathLike) -> VerifyReport:
    """A graph rvdeploy did not write: the checker has passed (``load_onnx``); ONNX Runtime must load
    it, and no re-parameterizable structure may be left in it."""
    ort_session(path)
    groups, left_alone = find_foldable(model)
    groups = [g for g in groups if g.kind in FOLDABLE_LABELS]
    foldable = dict(Counter(g.kind for g in groups))
    violations = []
    if groups:
        left = " and ".join(f"{foldable[kind]} {label}" for kind, label in FOLDABLE_LABELS.items() if kind in foldable)
        violations.append(Violation("<graph>", "-", f"{left}: run `rvdeploy fuse {Path(path).name} -o PLAIN.onnx`"))
    graph = model.graph
    return VerifyReport(
        path=str(path),
        arch=None,
        expected_layers=None,
        conv_layers=sum(1 for n in graph.node if n.op_type == "Conv"),
        violations=violations,
        outputs=tuple(o.name for o in graph.output),
        foreign=True,
        foldable=foldable,
        left_alone=[{"node": x.node, "reason": x.reason} for x in left_alone],
    )


def verify(path: str | os.PathLike, weights: TrainWeights | DeployWeights | None = None) -> VerifyReport:
    """Check the graph at ``path`` (an rvdeploy export against its recipe, any other graph by the
    lint); with ``weights`` also compare ONNX Runtime against torch."""
    model = load_onnx(path)
    meta = read_metadata(model)
    report = check_graph(model, str(path)) if meta else lint_foreign(model, path)
    features = tuple(sorted(meta.get("features") or ()))  # check_graph has validated them
    if weights is not None:
        report.parity = check_parity(path, weights, features=features)
    return report
