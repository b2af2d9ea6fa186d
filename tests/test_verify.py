"""verify accepts what export writes and rejects hand-built bad graphs, naming the nodes."""

import json

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from rvdeploy.checkpoint import load_weights
from rvdeploy.export import ExportOptions, export_onnx
from rvdeploy.reparam import fuse
from rvdeploy.errors import OnnxError
from rvdeploy.verify import check_graph, verify

from conftest import DIGITS_CKPT
from test_cli import assert_one_line_error, run


@pytest.fixture(scope="module")
def good_model(tmp_path_factory) -> onnx.ModelProto:
    deploy, _ = fuse(load_weights(DIGITS_CKPT))
    path = export_onnx(deploy, tmp_path_factory.mktemp("good") / "good.onnx", ExportOptions())
    return onnx.load(path)


def edited(model: onnx.ModelProto, edit) -> onnx.ModelProto:
    graph = gs.import_onnx(model)
    edit(graph)
    graph.cleanup().toposort()
    out = gs.export_onnx(graph)
    out.ir_version = model.ir_version
    out.metadata_props.extend(model.metadata_props)
    return out


def nodes(graph, op):
    return [n for n in graph.nodes if n.op == op]


def messages(report):
    return [str(v) for v in report.violations]


def test_accepts_the_exported_graph(good_model):
    report = check_graph(good_model)
    assert report.ok and report.conv_layers == report.expected_layers == 8


def test_rejects_batch_norm_between_conv_and_relu(good_model):
    def insert_bn(graph):
        conv = nodes(graph, "Conv")[2]
        channels = conv.inputs[1].shape[0]
        params = [gs.Constant(f"bn_{p}", np.full(channels, v, np.float32)) for p, v in
                  (("scale", 1.0), ("bias", 0.0), ("mean", 0.0), ("var", 1.0))]
        bn_out = gs.Variable("bn_out", dtype=np.float32)
        relu = conv.outputs[0].outputs[0]
        relu.inputs[0] = bn_out
        graph.nodes.append(gs.Node("BatchNormalization", name="/hand/BatchNorm", inputs=[conv.outputs[0], *params], outputs=[bn_out]))

    report = check_graph(edited(good_model, insert_bn))
    assert not report.ok
    assert "/hand/BatchNorm (BatchNormalization): BatchNormalization does not belong in a plain RepVGG graph" in messages(report)
    assert any(m.startswith("/hand/BatchNorm (BatchNormalization): expected Relu after /stage1/stage1.1/rbr_reparam/Conv") for m in messages(report))


def test_rejects_a_branch_and_names_the_node_it_leaves(good_model):
    def add_branch(graph):
        relus = nodes(graph, "Relu")
        a, b = relus[1].outputs[0], relus[2].outputs[0]
        summed = gs.Variable("summed", dtype=np.float32)
        consumer = b.outputs[0]
        consumer.inputs[0] = summed
        graph.nodes.append(gs.Node("Add", name="/hand/Add", inputs=[a, b], outputs=[summed]))

    report = check_graph(edited(good_model, add_branch))
    found = messages(report)
    assert "/hand/Add (Add): Add does not belong in a plain RepVGG graph" in found
    assert any(m.startswith("/stage1/stage1.0/nonlinearity/Relu (Relu): its output") and "feeds 2 nodes" in m for m in found)


def test_rejects_wrong_conv_attributes(good_model):
    def spoil(graph):
        convs = nodes(graph, "Conv")
        convs[3].attrs["strides"] = [3, 3]
        convs[5].attrs["pads"] = [0, 0, 0, 0]

    found = messages(check_graph(edited(good_model, spoil)))
    assert "/stage2/stage2.0/rbr_reparam/Conv (Conv): strides [3, 3], expected 1 or 2" in found
    assert "/stage3/stage3.0/rbr_reparam/Conv (Conv): pads [0, 0, 0, 0], expected [1, 1, 1, 1]" in found


def test_rejects_a_missing_layer(good_model):
    def drop_layer(graph):
        convs = nodes(graph, "Conv")
        relu_before = convs[4].inputs[0]
        relu_after = convs[4].outputs[0].outputs[0]
        relu_after.outputs[0].outputs[0].inputs[0] = relu_before

    report = check_graph(edited(good_model, drop_layer))
    assert "<graph> (-): 7 body Conv nodes, custom has 8 layers" in messages(report)
    assert not report.ok


def test_without_metadata_it_still_checks_the_chain(good_model):
    bare = onnx.ModelProto()
    bare.CopyFrom(good_model)
    del bare.metadata_props[:]
    report = check_graph(bare)
    assert report.conv_layers == 8
    assert messages(report) == ["<graph> (-): no rvdeploy metadata: the layer count and groups cannot be checked"]


def test_cli_reports_violations_with_exit_4(tmp_path):
    run("export", DIGITS_CKPT, "--onnx", tmp_path / "mb.onnx", "--no-fuse")
    code, stdout, stderr = run("verify", tmp_path / "mb.onnx", "--json")
    assert code == 4 and "Traceback" not in stdout + stderr
    data = json.loads(stdout)
    assert not data["ok"]
    flagged = {(v["node"], v["op"]) for v in data["violations"]}
    assert ("/stage1/stage1.1/rbr_identity/BatchNormalization", "BatchNormalization") in flagged
    assert ("/stage0/Add", "Add") in flagged


def test_cli_parity_with_checkpoint(tmp_path):
    run("export", DIGITS_CKPT, "--onnx", tmp_path / "d.onnx")
    code, stdout, _ = run("verify", tmp_path / "d.onnx", "--checkpoint", DIGITS_CKPT, "--json")
    assert code == 0
    parity = json.loads(stdout)["parity"]
    assert parity["passed"] and parity["batches"] == [1, 3] and parity["max_rel_error"] < 1e-5


def test_non_onnx_inputs_are_one_line_errors(tmp_path):
    (tmp_path / "notes.onnx").write_text("these are not the weights you are looking for")
    assert_one_line_error(*run("verify", tmp_path / "notes.onnx"), r"notes\.onnx is not an ONNX model")
    (tmp_path / "empty.onnx").write_bytes(b"")
    assert_one_line_error(*run("verify", tmp_path / "empty.onnx"), r"empty\.onnx is not an ONNX model")
    assert_one_line_error(*run("verify", tmp_path / "missing.onnx"), r"missing\.onnx: no such file")
    with pytest.raises(OnnxError, match=r"repvgg_digits_train\.pth is not an ONNX model"):
        verify(DIGITS_CKPT)
