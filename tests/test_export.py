import hashlib
import os
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from rvdeploy.arch import zoo_spec
from rvdeploy.checkpoint import load_train_weights, load_weights
from rvdeploy.export import ExportError, ExportOptions, export_onnx
from rvdeploy.onnx_io import read_metadata
from rvdeploy.files import sha256_file
from rvdeploy.reparam import fuse
from rvdeploy.synthetic import trained_like_state_dict
from rvdeploy.verify import check_parity, verify

from conftest import DIGITS_CKPT, to_mmpretrain, to_timm
from test_cli import assert_one_line_error, run


def _ort_vs_multi_branch(onnx_path, train_weights, batches):
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    from rvdeploy.model import build_model

    model = build_model(train_weights.spec, False, train_weights.tensors)
    shape = session.get_inputs()[0].shape
    worst = 0.0
    for batch in batches:
        x = torch.randn(batch, 3, shape[2], shape[3], generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            expected = model(x).numpy()
        got = session.run(None, {"input": x.numpy()})[0]
        assert got.shape == expected.shape == (batch, train_weights.spec.num_classes)
        worst = max(worst, float(np.abs(got - expected).max() / np.abs(expected).max()))
    return worst


@pytest.mark.parametrize("name", ["RepVGG-A0", "RepVGG-B1g2", "RepVGG-D2se"])
def test_zoo_variants_onnxruntime_matches_multi_branch_torch(tmp_path, name):
    spec = zoo_spec(name, num_classes=10)
    torch.save({"state_dict": trained_like_state_dict(spec)}, tmp_path / "t.pth")
    train = load_train_weights(tmp_path / "t.pth")
    deploy, _ = fuse(train)
    path = export_onnx(deploy, tmp_path / "m.onnx", ExportOptions(input_size=(64, 64)))
    parity = check_parity(path, train, batches=(1, 4))
    assert parity.passed and parity.reference == "multi-branch torch model"
    assert parity.max_rel_error <= parity.tolerance_rel <= 2e-3
    report = verify(path)
    assert report.ok, report.violations
    assert report.conv_layers == len(spec.blocks)


@pytest.mark.parametrize("convert", [lambda sd: sd, to_timm, to_mmpretrain], ids=["official", "timm", "mmpretrain"])
def test_every_layout_through_the_cli(tmp_path, small_spec, small_state, convert):
    torch.save(convert(small_state), tmp_path / "t.pth")
    code, _, stderr = run("export", tmp_path / "t.pth", "--onnx", tmp_path / "m.onnx", "--input-size", "48")
    assert code == 0, stderr
    train = load_train_weights(tmp_path / "t.pth")
    assert _ort_vs_multi_branch(tmp_path / "m.onnx", train, batches=(1, 5)) < 1e-4
    meta = read_metadata(onnx.load(tmp_path / "m.onnx"))
    assert meta["source_sha256"] == sha256_file(tmp_path / "t.pth")


def test_graph_is_plain_and_carries_metadata(tmp_path):
    code, _, stderr = run("fuse", DIGITS_CKPT, "-o", tmp_path / "f.pth")
    assert code == 0, stderr
    code, _, stderr = run("export", tmp_path / "f.pth", "--onnx", tmp_path / "d.onnx")
    assert code == 0, stderr
    model = onnx.load(tmp_path / "d.onnx")
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == onnx.helper.find_min_ir_version_for(list(model.opset_import))
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [17]
    assert [n.op_type for n in model.graph.node] == ["Conv", "Relu"] * 8 + ["GlobalAveragePool", "Flatten", "Gemm"]
    meta = read_metadata(model)
    assert meta["num_classes"] == 10 and meta["input_size"] == [32, 32] and meta["layers"] == 8
    assert meta["preprocess"]["resize"] == 32 and len(meta["preprocess"]["mean"]) == 3
    assert meta["source_sha256"] == sha256_file(tmp_path / "f.pth")
    assert meta["train_source_sha256"] == sha256_file(DIGITS_CKPT)
    assert meta["rvdeploy_version"] and meta["form"] == "fused"
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [3, 32, 32]


def test_fixed_batch_and_non_square_input(tmp_path):
    weights = load_weights(DIGITS_CKPT)
    deploy, _ = fuse(weights)
    path = export_onnx(deploy, tmp_path / "b4.onnx", ExportOptions(input_size=(40, 24), batch=4))
    dims = onnx.load(path).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [4, 3, 40, 24]
    parity = check_parity(path, weights)
    assert parity.batches == (4,) and parity.passed
    meta = read_metadata(onnx.load(path))
    assert meta["preprocess"]["input_size"] == [40, 24] and meta["preprocess"]["resize"] >= 40


def test_same_input_gives_identical_bytes_across_processes(tmp_path):
    exe = os.path.join(os.path.dirname(sys.executable), "rvdeploy")
    digests = []
    for i in range(2):
        out = tmp_path / f"m{i}.onnx"
        subprocess.run([exe, "export", str(DIGITS_CKPT), "--onnx", str(out)], check=True, capture_output=True)
        digests.append(hashlib.sha256(out.read_bytes()).hexdigest())
    assert digests[0] == digests[1]


def test_no_fuse_writes_the_multi_branch_graph(tmp_path):
    code, _, _ = run("export", DIGITS_CKPT, "--onnx", tmp_path / "mb.onnx", "--no-fuse")
    assert code == 0
    model = onnx.load(tmp_path / "mb.onnx")
    ops = {n.op_type for n in model.graph.node}
    assert {"Add", "BatchNormalization"} <= ops
    assert read_metadata(model)["form"] == "multi-branch"
    assert check_parity(tmp_path / "mb.onnx", load_weights(DIGITS_CKPT)).passed
    code, _, stderr = run("fuse", DIGITS_CKPT, "-o", tmp_path / "f.pth")
    assert_one_line_error(*run("export", tmp_path / "f.pth", "--onnx", tmp_path / "x.onnx", "--no-fuse"),
                          r"already fused: --no-fuse needs a training checkpoint")


@pytest.mark.parametrize("args, pattern", [
    (["--input-size", "big"], r"Invalid value for '--input-size': input size 'big' is not a number"),
    (["--input-size", "0"], r"input size '0' must be one or two positive integers"),
    (["--input-size", "-32"], r"must be one or two positive integers"),
    (["--input-size", "32x0"], r"must be one or two positive integers"),
    (["--opset", "7"], r"opset 7 is not supported: choose 13 to 20"),
    (["--opset", "99"], r"opset 99 is not supported"),
    (["--opset", "x"], r"Invalid value for '--opset'"),
    (["--batch", "0"], r"Invalid value for '--batch': 0 must be positive"),
    (["--batch", "many"], r"neither 'dynamic' nor a number"),
])
def test_export_bad_options(tmp_path, args, pattern):
    out = tmp_path / "m.onnx"
    out.write_bytes(b"keep me")
    assert_one_line_error(*run("export", DIGITS_CKPT, "--onnx", out, *args), pattern)
    assert out.read_bytes() == b"keep me"


def test_export_bad_inputs(tmp_path):
    assert_one_line_error(*run("export", tmp_path / "none.pth", "--onnx", tmp_path / "m.onnx"), r"no such file")
    (tmp_path / "bad.pth").write_bytes(DIGITS_CKPT.read_bytes()[:5000])
    assert_one_line_error(*run("export", tmp_path / "bad.pth", "--onnx", tmp_path / "m.onnx"), r"truncated or corrupt")
    assert_one_line_error(*run("export", DIGITS_CKPT, "--onnx", tmp_path / "no" / "m.onnx"), r"output directory .* does not exist")
    assert not (tmp_path / "m.onnx").exists()


def test_export_options_are_validated_in_the_library():
    with pytest.raises(ExportError, match="opset 12 is not supported"):
        ExportOptions(opset=12)
    with pytest.raises(ExportError, match="batch 0 must be positive"):
        ExportOptions(batch=0)
