"""The graph fold against timm's own re-parameterization: same op counts, same function.

Run with `.venv-timm/bin/python -m pytest tests/test_graphfold_timm.py -q` (make test-timm).
"""

from __future__ import annotations

import copy
import io
import warnings
from collections import Counter

import onnx
import pytest
import torch

from rvdeploy.compare import compare_outputs
from rvdeploy.graphfold import fold_onnx_file
from rvdeploy.onnx_io import ort_session

timm = pytest.importorskip("timm", reason="timm needs torchvision, which does not import beside the CPU torch build: "
                                          "run in .venv-timm (make test-timm)")

# Conv counts before → after, as timm's reparameterize_model gives. NextViT folds pre-norms (into 1x1
# convs, and through reshapes and an average pool into attention's MatMuls); EfficientViM folds gates
# computed from a parameter (Sigmoid → Reshape → Gather, evaluated as a constant subgraph).
CONVS = {"mobileone_s0": (191, 43), "repvit_m0_9": (126, 103), "fastvit_t8": (68, 52), "repvgg_b1g4": (56, 28),
         "nextvit_small": (93, 93), "efficientvim_m1": (66, 66)}


def _randomised(net: torch.nn.Module) -> torch.nn.Module:
    g = torch.Generator().manual_seed(0)
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            for t, (lo, hi) in ((m.running_mean, (-0.2, 0.2)), (m.running_var, (0.5, 2.0)),
                                (m.weight.data, (0.5, 1.5)), (m.bias.data, (-0.2, 0.2))):
                t.copy_(torch.rand(t.shape, generator=g) * (hi - lo) + lo)
    return net.eval()


def _export(net: torch.nn.Module, x: torch.Tensor) -> onnx.ModelProto:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, x, buffer, dynamo=False, opset_version=17, input_names=["x"], output_names=["y"])
    return onnx.load_from_string(buffer.getvalue())


def _ops(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


@pytest.mark.parametrize("name", sorted(CONVS))
def test_fold_matches_timm_reparameterize_model(name, tmp_path):
    from timm.utils.model import reparameterize_model

    torch.manual_seed(0)
    net = _randomised(timm.create_model(name, pretrained=False))
    x = torch.randn(2, 3, 64, 64)
    model = _export(net, x)
    onnx.save(model, str(tmp_path / "in.onnx"))
    report = fold_onnx_file(tmp_path / "in.onnx", tmp_path / "out.onnx")
    folded = onnx.load(str(tmp_path / "out.onnx"))
    timm_plain = _export(reparameterize_model(copy.deepcopy(net)), x)

    before, after, theirs = _ops(model), _ops(folded), _ops(timm_plain)
    assert (before["Conv"], after["Conv"]) == CONVS[name]
    for op in ("Conv", "Add", "BatchNormalization"):
        assert after[op] == theirs[op], (op, after[op], theirs[op])
    assert report.proof.passed, report.proof.worst_group

    with torch.no_grad():
        reference = copy.deepcopy(net).double()(x.double()).numpy()
    run = lambda m: ort_session(m.SerializeToString()).run(None, {"x": x.numpy()})[0]  # noqa: E731
    comparison = compare_outputs(run(folded), reference, reference32=run(model))
    assert comparison.passed, comparison
