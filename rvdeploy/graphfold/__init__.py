"""Graph-level re-parameterization of any ONNX graph: values computed from constants alone become
initializers; parallel branches that read one tensor and are summed (Conv, BN, identity, AveragePool
and chains of them, dilated kernels included) fold into one Conv (or Gemm) with bias;
Conv→BatchNormalization folds into the Conv, BatchNormalization→Gemm into the Gemm, a BN or a 1x1
conv into the conv after it, a BN into the MatMuls after it through reshapes and the MatMul before
it; repeated until nothing changes. The result proves itself group by group under ONNX Runtime
before it is written.

    from rvdeploy.graphfold import fold_onnx_file
    report = fold_onnx_file("mobileone_s0.onnx", "mobileone_s0_plain.onnx")
    print(report.folded, report.ops_before["Conv"], "→", report.ops_after["Conv"])
"""

from rvdeploy.graphfold.fold import find_foldable, fold_graph
from rvdeploy.graphfold.onnx_file import fold_onnx_file
from rvdeploy.graphfold.proof import prove_graph_fold
from rvdeploy.graphfold.results import (
    BN_GEMM,
    CONSTANT,
    CONV_BN,
    CONV_CHAIN,
    LINEAR_NORM,
    NORM_INTO_LINEAR,
    PARALLEL,
    PRE_BN,
    FoldableGroup,
    GraphFoldError,
    GraphFoldOptions,
    GraphFoldProof,
    GraphFoldReport,
    GroupCheck,
    LeftAlone,
)

__all__ = [
    "BN_GEMM", "CONSTANT", "CONV_BN", "CONV_CHAIN", "LINEAR_NORM", "NORM_INTO_LINEAR", "PARALLEL", "PRE_BN",
    "FoldableGroup", "GraphFoldError", "GraphFoldOptions", "GraphFoldProof", "GraphFoldReport", "GroupCheck", "LeftAlone",
    "find_foldable", "fold_graph", "fold_onnx_file", "prove_graph_fold",
]
