"""Backbone exports (``export --features``) and headless checkpoints (``--prefix backbone.``)."""

import json

import numpy as np
import onnx
import pytest
import torch

from rvdeploy.compare import compare_outputs
from rvdeploy.onnx_io import ort_session, read_metadata
from rvdeploy.runners import open_runner

from conftest import DIGITS_CKPT, reference_stages, to_mmpretrain, to_timm
from test_cli import assert_one_line_error, run

SIZE = 32  # stage s has stride 2^(s+1): 16, 8, 4, 2, 1 px


def assert_stages_match(onnx_path, state, spec, stages, batch=3):
    """ONNX Runtime's outputs against the float64 reference, each within what float32 explains
    (the reference's own float32 run), at a dynamic batch of ``batch``."""
    session = ort_session(onnx_path)
    x = torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    got = session.run(None, {"input": x.numpy()})
    expected64 = [s.numpy() for s in reference_stages(state, spec, 1e-5, x)]
    expected32 = [s.numpy() for s in reference_stages(state, spec, 1e-5, x, torch.float32)]
    assert [o.name for o in session.get_outputs()] == [f"stage{s}" for s in stages]
    for stage, out in zip(stages, got):
        comparison = compare_outputs(out, expected64[stage], expected32[stage])
        assert comparison.passed, (stage, comparison)
        assert out.shape == (batch, spec.stage_channels(stage), SIZE // 2 ** (stage + 1), SIZE // 2 ** (stage + 1))


@pytest.fixture()
def train_ckpt(tmp_path, small_state):
    path = tmp_path / "train.pth"
    torch.save({"state_dict": small_state}, path)
    return path


def test_features_export_gives_every_stage_and_no_classifier(tmp_path, train_ckpt, small_spec, small_state):
    out = tmp_path / "feat.onnx"
    code, stdout, stderr = run("export", train_ckpt, "--onnx", out, "--input-size", SIZE, "--features", "4,1,2,3")
    assert code == 0, stderr
    assert "outputs stage1, stage2, stage3, stage4" in stdout
    model = onnx.load(out)
    assert {n.op_type for n in model.graph.node} == {"Conv", "Relu"}  # GAP, Flatten and Gemm gone
    assert not any(i.name.startswith("linear") for i in model.graph.initializer)
    meta = read_metadata(model)
    assert meta["features"] == [1, 2, 3, 4] and meta["outputs"] == ["stage1", "stage2", "stage3", "stage4"]
    assert "num_classes" not in meta and meta["arch_spec"]["num_classes"] is None
    assert_stages_match(out, small_state, small_spec, (1, 2, 3, 4))


def test_partial_features_stop_at_the_last_stage_asked_for(tmp_path, train_ckpt, small_spec, small_state):
    out = tmp_path / "feat02.onnx"
    assert run("export", train_ckpt, "--onnx", out, "--input-size", SIZE, "--features", "0,2")[0] == 0
    convs = sum(n.op_type == "Conv" for n in onnx.load(out).graph.node)
    assert convs == small_spec.blocks_through(2) == 1 + 2 + 3
    assert_stages_match(out, small_state, small_spec, (0, 2), batch=1)
    code, stdout, stderr = run("verify", out, "--checkpoint", train_ckpt, "--json")
    assert code == 0, stdout + stderr
    report = json.loads(stdout)
    assert report["conv_layers"] == report["expected_layers"] == 6 and report["outputs"] == ["stage0", "stage2"]


def test_verify_walks_a_backbone_and_compares_every_output(tmp_path, train_ckpt):
    out = tmp_path / "feat.onnx"
    run("export", train_ckpt, "--onnx", out, "--input-size", SIZE, "--features", "1,2,3,4")
    code, stdout, stderr = run("verify", out, "--checkpoint", train_ckpt, "--json")
    assert code == 0, stdout + stderr
    report = json.loads(stdout)
    assert report["ok"] and report["violations"] == [] and report["conv_layers"] == report["expected_layers"] == 9
    parity = report["parity"]
    assert parity["passed"] and parity["outputs"] == ["stage1", "stage2", "stage3", "stage4"]
    assert parity["max_rel_error"] < 1e-5 and parity["batches"] == [1, 3]


def test_verify_rejects_a_backbone_missing_an_output(tmp_path, train_ckpt):
    out = tmp_path / "feat.onnx"
    run("export", train_ckpt, "--onnx", out, "--input-size", SIZE, "--features", "1,2,3,4")
    model = onnx.load(out)
    del model.graph.output[1]  # stage2 is no longer given
    onnx.save(model, out)
    code, stdout, _ = run("verify", out, "--json")
    assert code == 4
    found = [v["message"] for v in json.loads(stdout)["violations"]]
    assert "1 inputs and 3 outputs, expected 1 and 4" in found
    assert any("are not the feature stages' outputs" in m for m in found)


def test_multi_branch_backbone_export_computes_the_same_and_verify_rejects_it(tmp_path, train_ckpt, small_spec, small_state):
    out = tmp_path / "mb.onnx"
    assert run("export", train_ckpt, "--onnx", out, "--input-size", SIZE, "--features", "1,2,3,4", "--no-fuse")[0] == 0
    assert_stages_match(out, small_state, small_spec, (1, 2, 3, 4))
    assert run("verify", out)[0] == 4


def test_runner_gives_every_output_and_eval_refuses_a_backbone(tmp_path):
    out = tmp_path / "digits-feat.onnx"
    assert run("export", DIGITS_CKPT, "--onnx", out, "--features", "1,2,3,4")[0] == 0
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32), dtype=np.float32)
    with open_runner(out) as runner:
        outputs = runner.infer(x)
        assert runner.output_names == ("stage1", "stage2", "stage3", "stage4") and not runner.is_classifier
        assert [o.shape[2] for o in outputs] == [8, 4, 2, 1] and all(len(o) == 2 for o in outputs)
    assert_one_line_error(*run("eval", out, "--data", DIGITS_CKPT.parent / "heldout"),
                          r"digits-feat\.onnx has no classifier output \(\[N, C\] logits; it gives stage1, .*\): eval needs one")


@pytest.mark.parametrize("value, code, pattern", [
    ("5", 1, r"--features 5: custom has stages 0 \(the stem\) to 4"),
    ("1,1", 2, r"'1,1' names a stage twice"),
    ("", 2, r"'' is not a comma-separated list of stage numbers"),
    ("one", 2, r"'one' is not a comma-separated list"),
    ("-1", 2, r"stages are numbered from 0"),
])
def test_bad_features_are_one_line(tmp_path, train_ckpt, value, code, pattern):
    out = tmp_path / "x.onnx"
    result = run("export", train_ckpt, "--onnx", out, "--features", value)
    assert result[0] == code
    assert_one_line_error(*result, pattern)
    assert not out.exists()


# -- headless checkpoints ----------------------------------------------------------------------
def detector_state(state: dict[str, torch.Tensor], convert=None) -> dict[str, torch.Tensor]:
    """A detector's state dict: the backbone (no classifier) under backbone., a neck and a head beside it."""
    backbone = {k: v for k, v in state.items() if not k.startswith("linear.")}
    backbone = convert(backbone) if convert else backbone
    return {"backbone." + k: v for k, v in backbone.items()} | {
        "neck.conv.weight": torch.randn(8, 96, 1, 1), "head.cls.weight": torch.randn(3, 8, 1, 1)}


@pytest.mark.parametrize("convert", [None, to_timm, to_mmpretrain], ids=["official", "timm", "mmpretrain"])
def test_headless_backbone_fuses_and_exports_its_stages(tmp_path, small_spec, small_state, convert):
    detector = tmp_path / "detector.pth"
    torch.save({"state_dict": detector_state(small_state, convert)}, detector)
    fused = tmp_path / "backbone.pth"
    code, stdout, stderr = run("fuse", detector, "-o", fused, "--prefix", "backbone.", "--json")
    assert code == 0, stderr
    report = json.loads(stdout)
    assert report["num_classes"] is None and report["fold"]["passed"] and report["prefix"] == "backbone."
    saved = torch.load(fused, weights_only=True)
    assert not any(k.startswith("linear.") for k in saved["state_dict"]) and saved["meta"]["num_classes"] is None
    out = tmp_path / "backbone.onnx"
    code, _, stderr = run("export", fused, "--onnx", out, "--input-size", SIZE, "--features", "1,2,3,4")
    assert code == 0, stderr
    assert_stages_match(out, small_state, small_spec, (1, 2, 3, 4))
    assert run("verify", out, "--checkpoint", detector, "--prefix", "backbone.")[0] == 0


def test_headless_export_straight_from_the_detector_checkpoint(tmp_path, small_spec, small_state):
    detector = tmp_path / "detector.pth"
    torch.save(detector_state(small_state), detector)
    out = tmp_path / "backbone.onnx"
    code, _, stderr = run("export", detector, "--prefix", "backbone.", "--onnx", out, "--input-size", SIZE, "--features", "2,3")
    assert code == 0, stderr
    assert_stages_match(out, small_state, small_spec, (2, 3))


def test_headless_mistakes_are_one_line(tmp_path, small_state):
    detector = tmp_path / "detector.pth"
    torch.save(detector_state(small_state), detector)
    assert_one_line_error(*run("export", detector, "--prefix", "backbone.", "--onnx", tmp_path / "x.onnx"),
                          r"headless backbone \(no classifier\): export its stage outputs with --features")
    assert_one_line_error(*run("fuse", detector, "-o", tmp_path / "f.pth", "--prefix", "model.backbone."),
                          r"no tensors under the prefix 'model.backbone.'; its top-level prefixes are: backbone., head., neck.")
    assert_one_line_error(*run("fuse", detector, "-o", tmp_path / "f.pth", "--prefix", "backbone.", "--num-classes", "3"),
                          r"--num-classes 3: the checkpoint has no classifier")
    assert not (tmp_path / "x.onnx").exists() and not (tmp_path / "f.pth").exists()
