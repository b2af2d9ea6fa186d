"""Graph-level re-parameterization of any ONNX graph: parallel branches that read one tensor and
are summed fold into one Conv (or Gemm) with bias, Conv→BatchNormalization folds into the Conv,
BatchNormalization→Gemm into the Gemm, repeated until nothing changes; the result proves itself
group by group under ONNX Runtime before it is written.

    from rvdeploy.graphfold import fold_onnx_file
    report = fold_onnx_file("mobileone_s0.onnx", "mobileone_s0_plain.onnx")
    print(report.folded, report.ops_before["Conv"], "→", report.ops_after["Conv"])
"""

from rvdeploy.graphfold.fold import find_foldable, fold_graph
from rvdeploy.graphfold.onnx_file import fold_onnx_file
from rvdeploy.graphfold.proof import prove_graph_fold
from rvdeploy.graphfold.results import (
    BN_GEMM,
    CONV_BN,
    PARALLEL,
    FoldableGroup,
    GraphFoldError,
    GraphFoldOptions,
    GraphFoldProof,
    GraphFoldReport,
    GroupCheck,
    LeftAlone,
)

__all__ = [
    "BN_GEMM", "CONV_BN", "PARALLEL", "FoldableGroup", "GraphFoldError", "GraphFoldOptions", "GraphFoldProof",
    "GraphFoldReport", "GroupCheck", "LeftAlone", "find_foldable", "fold_graph", "fold_onnx_file", "prove_graph_fold",
]
