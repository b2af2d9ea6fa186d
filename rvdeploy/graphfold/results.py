"""What a graph fold reports: its options, the groups it folded or left alone, and its proof."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from rvdeploy.compare import Comparison, json_safe
from rvdeploy.errors import FoldError

# Kinds of fold, as counted in GraphFoldReport.folded and named in FoldableGroup.kind.
CONV_BN = "conv+bn"
BN_GEMM = "bn+gemm"
PARALLEL = "parallel branches"
PRE_BN = "bn+conv"  # a BatchNormalization folded into the conv after it
CONV_CHAIN = "conv+conv"  # two convs in sequence as one
NORM_INTO_LINEAR = "bn into matmul"  # a BatchNormalization folded into MatMuls through reshapes
LINEAR_NORM = "matmul+bn"  # a BatchNormalization folded into the MatMul before it, across reshapes
CONSTANT = "constant subgraph"  # a value computed from constants alone, now an initializer


class GraphFoldError(FoldError):
    """A folded graph that does not compute what its input graph computes (exit 3)."""


@dataclass(frozen=True)
class GraphFoldOptions:
    prove: bool = True  # ORT proof before writing
    probe_size: int = 64  # for dynamic spatial dims
    probe_batch: int = 2  # for a dynamic batch dim
    seed: int = 0


@dataclass(frozen=True)
class LeftAlone:
    """A structure that looks foldable but was left as it is, and why."""

    node: str  # a node name a user can find in Netron
    reason: str


@dataclass(frozen=True)
class FoldableGroup:
    """One fold: its kind, the tensor its folded node writes, and the nodes it replaces."""

    kind: str
    output: str
    nodes: tuple[str, ...]


@dataclass
class GroupCheck:
    """A folded node (float32) against the original nodes it replaces (float64), on their own input."""

    name: str
    kind: str
    max_error: float  # in the output channel where the ratio is largest
    budget: float  # what float32 explains there
    ratio: float  # max_error / budget; above 1 the fold is wrong

    @property
    def passed(self) -> bool:
        return self.ratio <= 1


@dataclass
class GraphFoldProof:
    groups: list[GroupCheck]
    worst_group: str | None
    worst_ratio: float
    end_to_end: Comparison  # output graph vs. input graph under ONNX Runtime: reported, not judged
    passed: bool

    def to_dict(self) -> dict:
        return json_safe({"groups": [asdict(g) for g in self.groups], "worst_group": self.worst_group,
                           "worst_ratio": self.worst_ratio, "end_to_end": self.end_to_end.to_dict(),
                           "passed": self.passed})


@dataclass
class GraphFoldReport:
    folded: dict[str, int]  # groups folded, by kind (nested folds included)
    ops_before: dict[str, int]  # op_type -> count (all ops)
    ops_after: dict[str, int]
    left_alone: list[LeftAlone]
    seconds: float  # the fold itself
    proof: GraphFoldProof | None = None
    total_seconds: float | None = None  # fold_onnx_file: load, fold, proof and save
    groups: list[FoldableGroup] = field(default_factory=list)  # every fold, in the order it was made

    @property
    def nothing_to_fold(self) -> bool:
        return not any(self.folded.values())

    def to_dict(self) -> dict:
        return json_safe({
            "folded": dict(self.folded), "ops_before": dict(self.ops_before), "ops_after": dict(self.ops_after),
            "left_alone": [asdict(a) for a in self.left_alone], "seconds": self.seconds,
            "total_seconds": self.total_seconds, "nothing_to_fold": self.nothing_to_fold, "proof": self.proof.to_dict() if self.proof else None,
            "groups": [asdict(g) for g in self.groups],
        })

