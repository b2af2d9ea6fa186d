"""Token Linear layers (a MatMul by a constant weight, then its bias Add) rewritten as Gemm, for INT8:
the same outputs, from graphs as TorchScript and torch.export write them; attention's MatMuls untouched."""

import io
import warnings

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from torch import nn

from rvdeploy.compare import sqnr_db
from rvdeploy.engine.build import compile_onnx
from rvdeploy.engine.library import load_library
from rvdeploy.precision.linear_layers import linear_matmuls_as_gemm

from test_cli import run
from test_int8_guard import CALIB


class Tokens(nn.Module):
    """Linear layers on 3-D and 4-D tokens, one weight shared by two layers, a bias-free layer whose
    output is a graph output, and attention between them."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, 2, 1)
        self.qkv = nn.Linear(16, 48)
        self.proj = nn.Linear(16, 16)
        self.heads = nn.Linear(8, 8)  # on (batch, heads, tokens, 8)
        self.out = nn.Linear(16, 5, bias=False)

    def forward(self, x):
        tokens = self.conv(x).flatten(2).transpose(1, 2)
        q, k, v = self.qkv(tokens).chunk(3, dim=-1)
        attention = (q @ k.transpose(1, 2)).softmax(-1) @ v
        tokens = tokens + self.proj(attention) + self.proj(tokens)  # proj's weight read twice
        n, t, c = tokens.shape
        split = self.heads(tokens.reshape(n, t, 2, 8).transpose(1, 2)).transpose(1, 2).reshape(n, t, c)
        return self.out(split), tokens.mean(1)


def _export(dynamo: bool) -> onnx.ModelProto:
    torch.manual_seed(0)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Tokens().eval(), torch.randn(2, 3, 16, 16), buffer, dynamo=dynamo, opset_version=18 if dynamo else 17,
                          input_names=["x"], output_names=["tokens", "pooled"],
                          **({} if dynamo else {"dynamic_axes": {"x": {0: "batch"}}}))
    return onnx.load_from_string(buffer.getvalue())


def _run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "torch.export"])
def test_token_linear_layers_become_gemm_with_the_same_outputs(dynamo, capfd):
    model = _export(dynamo)
    rewritten, layers = linear_matmuls_as_gemm(model)
    onnx.checker.check_model(rewritten, full_check=True)
    ops = [n.op_type for n in rewritten.graph.node]
    assert len(layers) == 5 and ops.count("Gemm") == 5 and ops.count("MatMul") == 2  # qkv, proj twice, heads, out
    assert sorted(n.name for n in rewritten.graph.node if n.op_type == "Gemm") == sorted(layers)
    assert all(a.name == "transB" and a.i == 1 for n in rewritten.graph.node if n.op_type == "Gemm" for a in n.attribute)
    assert "distinct tensors that share the same name" not in capfd.readouterr().out  # proj's shared bias: one copy
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16), dtype=np.float32)
    for ours, theirs in zip(_run(rewritten, x), _run(model, x)):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    if not dynamo:  # the batch stays dynamic
        for ours, theirs in zip(_run(rewritten, x[:1]), _run(model, x[:1])):
            np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)


def test_a_graph_before_opset_11_is_returned_as_it_is():
    model = _export(False)
    old_opset = onnx.helper.make_model(model.graph, opset_imports=[onnx.helper.make_opsetid("", 10)])
    assert linear_matmuls_as_gemm(old_opset) == (old_opset, [])  # no optional Gemm C before opset 11


@pytest.mark.parametrize("target", ["tensorrt", "onnxruntime"])
def test_int8_takes_shared_bias_free_and_4d_token_linear_layers(tmp_path, target):
    source, out = tmp_path / "tokens.onnx", tmp_path / "int8.onnx"
    onnx.save(_export(False), source)
    code, stdout, stderr = run("quantize", source, "--int8", "--target", target, "--calib", CALIB, "--num-images", 64,
                               "--allow-upscale", "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25", "--input-size", 16,
                               "--min-sqnr", 0, "-o", out)
    assert code == 0, stderr
    assert "5 of them token Linear layers" in stdout and "in float by design: 2 MatMul, 1 Softmax" in stdout, stdout
    x = np.random.default_rng(1).uniform(-2, 2, (4, 3, 16, 16)).astype(np.float32)  # what the recipe makes of pixels
    for ours, theirs in zip(_run(onnx.load(out), x), _run(onnx.load(source), x)):
        assert sqnr_db(ours, theirs) >= 18.0
    if target == "tensorrt":
        engine, _ = compile_onnx(out, load_library("tensorrt-rtx"))
        assert len(engine) > 10_000
