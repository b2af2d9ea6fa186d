"""``rvdeploy fuse MODEL.onnx`` (the graph-level fold) and ``verify``'s lint of graphs rvdeploy did not write."""

import json
import warnings

import onnx
import pytest
import torch

from rvdeploy.arch import custom_spec
from rvdeploy.compare import compare_outputs
from rvdeploy.model import build_model
from rvdeploy.onnx_io import ort_session, read_metadata

from conftest import DIGITS_CKPT, trained_like_state_dict
from test_cli import assert_one_line_error, run

SPEC = custom_spec(depths=(1, 2, 1), widths=(8, 16, 16), num_classes=3)  # 5 blocks, stage2.1 with an identity branch


@pytest.fixture(scope="module")
def multi_branch(tmp_path_factory):
    """Another framework's unfolded RepVGG: a multi-branch torch net exported by torch.onnx.export,
    no rvdeploy metadata, its own input and output names."""
    net = build_model(SPEC, deploy=False, state_dict=trained_like_state_dict(SPEC, seed=3))
    path = tmp_path_factory.mktemp("graph") / "unfolded.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.zeros(1, 3, 32, 32),), path, input_names=["image"], output_names=["scores"],
                          dynamic_axes={"image": {0: "n"}, "scores": {0: "n"}}, dynamo=False)
    return path, net


def ops(path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in onnx.load(path).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def test_verify_refuses_an_unfolded_graph_naming_the_count(multi_branch):
    path, _ = multi_branch
    code, stdout, stderr = run("verify", path)
    assert code == 4, stdout + stderr
    assert "5 foldable branch groups" in stdout and "run `rvdeploy fuse unfolded.onnx -o PLAIN.onnx`" in stdout
    code, stdout, _ = run("verify", path, "--json")
    report = json.loads(stdout)
    assert code == 4 and report["foreign"] and not report["ok"]
    assert report["foldable_groups"] == 5 and report["foldable"] == {"parallel branches": 5}


def test_fuse_of_a_graph_folds_it_and_verify_then_passes(tmp_path, multi_branch):
    path, net = multi_branch
    plain = tmp_path / "plain.onnx"
    code, stdout, stderr = run("fuse", path, "-o", plain)
    assert code == 0, stderr
    assert "5 parallel branches" in stdout and "passed" in stdout
    before = ops(path)  # the exporter folded each branch's BN into its conv; the identity BN stays
    assert (before["Conv"], before["Add"], before["BatchNormalization"]) == (10, 6, 1)
    after = ops(plain)
    assert after.get("Conv") == 5 and "Add" not in after and "BatchNormalization" not in after
    code, stdout, stderr = run("verify", plain)
    assert code == 0, stdout + stderr
    assert "nothing left to fold" in stdout
    # the plain graph computes the multi-branch net: ONNX Runtime against torch in float64
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    got = ort_session(plain).run(None, {"image": x.numpy()})[0]
    with torch.inference_mode():
        expected64 = build_model(SPEC, False, {k: v.double() for k, v in net.state_dict().items()}, dtype=torch.float64)(x.double())
        expected32 = net(x)
    assert compare_outputs(got, expected64, expected32).passed


def test_fuse_of_a_graph_reports_json(tmp_path, multi_branch):
    path, _ = multi_branch
    code, stdout, stderr = run("fuse", path, "-o", tmp_path / "plain.onnx", "--json")
    assert code == 0, stderr
    report = json.loads(stdout)
    assert report["folded"] == {"parallel branches": 5}
    assert report["ops_before"]["Conv"] == 10 and report["ops_after"]["Conv"] == 5
    assert report["proof"]["passed"] and report["proof"]["worst_ratio"] < 1


def test_fuse_of_a_plain_graph_says_nothing_to_fold(tmp_path, multi_branch):
    path, _ = multi_branch
    plain, again = tmp_path / "plain.onnx", tmp_path / "again.onnx"
    assert run("fuse", path, "-o", plain)[0] == 0
    code, stdout, stderr = run("fuse", plain, "-o", again)
    assert code == 0, stderr
    assert "nothing to fold" in stdout
    assert ops(again) == ops(plain)


@pytest.mark.parametrize("option", [["--arch", "RepVGG-A0"], ["--num-classes", "3"], ["--key", "model"],
                                    ["--bn-eps", "1e-3"], ["--prefix", "backbone."]])
def test_checkpoint_options_with_a_graph_are_refused(tmp_path, multi_branch, option):
    path, _ = multi_branch
    out = tmp_path / "plain.onnx"
    assert_one_line_error(*run("fuse", path, "-o", out, *option),
                          rf"{option[0]} only applies to checkpoints; unfolded\.onnx is an ONNX graph")
    assert not out.exists()


def test_fuse_of_a_graph_that_is_not_onnx_is_one_line(tmp_path):
    bad = tmp_path / "notes.onnx"
    bad.write_text("not a graph")
    assert_one_line_error(*run("fuse", bad, "-o", tmp_path / "out.onnx"), r"notes\.onnx is not an ONNX model")
    assert not (tmp_path / "out.onnx").exists()


def test_an_unfolded_rvdeploy_export_folded_in_the_graph_passes_verify_against_its_checkpoint(tmp_path):
    unfolded, plain = tmp_path / "mb.onnx", tmp_path / "plain.onnx"
    assert run("export", DIGITS_CKPT, "--onnx", unfolded, "--no-fuse")[0] == 0
    assert run("verify", unfolded)[0] == 4  # the multi-branch graph is no plain chain
    assert run("fuse", unfolded, "-o", plain)[0] == 0
    code, stdout, stderr = run("verify", plain, "--checkpoint", DIGITS_CKPT, "--json")
    assert code == 0, stdout + stderr
    report = json.loads(stdout)
    assert report["conv_layers"] == report["expected_layers"] == 8 and report["parity"]["passed"]
    assert read_metadata(onnx.load(plain))["form"] == "fused"  # what bench and eval then call it


def test_the_shipped_foreign_graph_folds_to_its_plain_form(tmp_path):
    """models/foreign/mobileone_tiny.onnx (what `make demo` folds): 9 branch groups, every BN kept by
    its exporter, equal parameters aliased through Identity nodes."""
    source = DIGITS_CKPT.parents[1] / "foreign" / "mobileone_tiny.onnx"
    code, stdout, _ = run("verify", source)
    assert code == 4 and "9 foldable branch groups and 30 Conv → BatchNormalization pairs" in stdout
    plain = tmp_path / "plain.onnx"
    code, _, stderr = run("fuse", source, "-o", plain)
    assert code == 0, stderr
    before, after = ops(source), ops(plain)
    assert (before["Conv"], before["Add"], before["BatchNormalization"]) == (30, 25, 34)
    assert (after["Conv"], after.get("Add", 0), after.get("BatchNormalization", 0), after.get("Identity", 0)) == (9, 0, 0, 0)
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1)).numpy()
    reference, folded = (ort_session(p).run(None, {"image": x})[0] for p in (source, plain))
    assert compare_outputs(folded, reference).max_rel_error < 1e-5
    assert run("verify", plain)[0] == 0
