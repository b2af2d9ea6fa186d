"""The graph fold on every zoo net's multi-branch export (`export --no-fuse`): the same graph, op
for op, as the checkpoint fold's plain export, proven group by group. Slow (B3 and D2se are
hundreds of MB): `pytest -m slow tests/test_graphfold_zoo.py`."""

from __future__ import annotations

from collections import Counter

import onnx
import pytest

from rvdeploy.arch import ZOO_NAMES, zoo_spec
from rvdeploy.export import ExportOptions, export_onnx
from rvdeploy.graphfold import PARALLEL, fold_onnx_file
from rvdeploy.reparam import fuse
from rvdeploy.synthetic import trained_like_state_dict
from rvdeploy.weights import TrainWeights


@pytest.mark.slow
@pytest.mark.parametrize("name", ZOO_NAMES)
def test_zoo_multibranch_export_folds_to_the_plain_graph(name, tmp_path):
    spec = zoo_spec(name, num_classes=10)
    train = TrainWeights(spec, trained_like_state_dict(spec))
    options = ExportOptions(input_size=(32, 32))
    multi_branch = export_onnx(train, tmp_path / "multi_branch.onnx", options)
    plain = export_onnx(fuse(train)[0], tmp_path / "plain.onnx", options)
    report = fold_onnx_file(multi_branch, tmp_path / "folded.onnx")
    counts = lambda path: Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)  # noqa: E731
    assert counts(tmp_path / "folded.onnx") == counts(plain)
    assert report.folded[PARALLEL] == len(spec.blocks)  # one group per block, stem included
    assert report.proof.passed, report.proof.worst_group
