"""A hybrid net as real tools export it (shape arithmetic on a dynamic batch, SiLU, LayerNorm, attention
MatMuls and Softmax, deformable sampling (GridSample on a grid the net computes, as RT-DETR's decoder
does), Resize, two outputs) through every later stage: FP16, INT8 for both targets,
TensorRT-RTX engines (FP32, FP16, INT8) and bench."""

import io
import math
import re
import warnings

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rvdeploy.compare import sqnr_db
from rvdeploy.data import batches, image_folder
from rvdeploy.engine.build import compile_onnx
from rvdeploy.engine.library import load_library
from rvdeploy.preprocess import given_recipe

from test_cli import run
from test_int8_guard import CALIB

SIZE = 32
RECIPE = ("--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25", "--input-size", str(SIZE))


class Hybrid(nn.Module):
    """Conv stem, one attention block over the feature map, a 2x upsampled feature output and logits."""

    def __init__(self, width: int = 32, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.SiLU())
        self.down = nn.Sequential(nn.Conv2d(16, width, 3, 2, 1), nn.BatchNorm2d(width), nn.SiLU())
        self.norm = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.offsets = nn.Linear(width, 2)
        self.fuse = nn.Conv2d(width, 16, 1)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        stem = self.stem(x)
        y = self.down(stem)
        n, c, h, w = y.shape  # shape arithmetic on the dynamic batch
        tokens = y.flatten(2).transpose(1, 2)
        q, k, v = self.qkv(self.norm(tokens)).chunk(3, dim=-1)
        attention = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(c), dim=-1)
        tokens = tokens + self.proj(attention @ v)
        y = tokens.transpose(1, 2).reshape(n, c, h, w)
        grid = torch.tanh(self.offsets(tokens)).reshape(n, h, w, 2)  # where each position samples from
        y = y + F.grid_sample(y, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        features = stem + self.fuse(F.interpolate(y, scale_factor=2.0, mode="nearest"))
        return self.head(tokens.mean(1)), features


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory):
    torch.manual_seed(0)
    net = Hybrid().eval()
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, torch.randn(1, 3, SIZE, SIZE), buffer, dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits", "features"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}, "features": {0: "batch"}})
    path = tmp_path_factory.mktemp("hybrid") / "hybrid.onnx"
    path.write_bytes(buffer.getvalue())
    ops = {n.op_type for n in onnx.load(path).graph.node}
    assert {"Shape", "Gather", "Softmax", "MatMul", "Resize", "Sigmoid", "GridSample"} <= ops, ops  # the constructs are there
    return path


def _outputs(path, pixels):
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [np.concatenate(o) for o in zip(*(session.run(None, {"input": x}) for x in pixels))]


@pytest.fixture(scope="module")
def held_out():
    recipe = given_recipe((0.5,) * 3, (0.25,) * 3, (SIZE, SIZE))  # what RECIPE says on the command line
    images = image_folder(CALIB, recipe, allow_upscale=True)
    return [x for x, _ in batches(images, recipe, 64)][2:]  # the images after the first 128 (calibration)


def test_fp16_takes_shape_arithmetic(hybrid, held_out, tmp_path):
    out = tmp_path / "fp16.onnx"
    code, stdout, stderr = run("quantize", hybrid, "--fp16", "-o", out, "--input-size", SIZE)
    assert code == 0, stderr
    for ours, ref in zip(_outputs(out, held_out), _outputs(hybrid, held_out)):
        assert sqnr_db(ours, ref) >= 35.0
    measured = re.search(r"output SQNR against FP32 on them \(the worse kind's\): ([0-9.]+) dB: meets the 35 dB floor",
                         stdout)  # on its random probes, with no node kept FP32 for the floor
    assert measured and float(measured.group(1)) >= 35.0 and "amplifies" not in stdout, stdout


@pytest.mark.parametrize("target", ["tensorrt", "onnxruntime"])
def test_int8_takes_the_hybrid_graph(hybrid, held_out, tmp_path, target):
    out = tmp_path / f"int8_{target}.onnx"
    code, stdout, stderr = run("quantize", hybrid, "--int8", "--target", target, "--calib", CALIB, "--num-images", 128,
                               "--allow-upscale", *RECIPE, "-o", out)
    assert code == 0, stderr
    equalization = next(line for line in stdout.splitlines() if line.startswith("equalization"))
    assert "a SiLU between them" in equalization and "squeeze-excitation" not in equalization  # named by what it is
    summary = next(line for line in stdout.splitlines() if line.startswith("INT8 ("))
    # the token Linear layers (qkv, proj, offsets) in INT8; attention's two MatMuls in float
    assert "3 of them token Linear layers" in summary and "in float by design: 1 GridSample, 1 LayerNormalization, " \
        "2 MatMul, 1 Softmax" in summary, summary
    written = onnx.load(out).graph
    producers = {o: n.op_type for n in written.node for o in n.output}
    linear = [n for n in written.node if n.op_type == "Gemm"]
    assert len(linear) == 4 and all(producers[n.input[1]] == "DequantizeLinear" for n in linear)
    if target == "onnxruntime":  # and ONNX Runtime runs every one of them as an integer GEMM
        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
        onnxruntime.InferenceSession(str(out), options, providers=["CPUExecutionProvider"])
        assert [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node].count("QGemm") == 4
    logits, features = _outputs(out, held_out)
    ref_logits, ref_features = _outputs(hybrid, held_out)
    assert sqnr_db(logits, ref_logits) >= 18.0 and sqnr_db(features, ref_features) >= 18.0


def test_engines_and_bench_take_the_hybrid_graph(hybrid, tmp_path):
    builder = load_library("tensorrt-rtx")
    fp16, int8 = tmp_path / "fp16.onnx", tmp_path / "int8.onnx"
    assert run("quantize", hybrid, "--fp16", "-o", fp16, "--input-size", SIZE)[0] == 0
    assert run("quantize", hybrid, "--int8", "--calib", CALIB, "--num-images", 64, "--allow-upscale", *RECIPE, "-o", int8)[0] == 0
    for graph in (hybrid, fp16, int8):
        engine, profiles = compile_onnx(graph, builder)
        assert len(engine) > 10_000
    code, stdout, stderr = run("bench", hybrid, fp16, "--batch", 1, "--warmup-s", 0.05, "--min-s", 0.1, "--input-size", SIZE)
    assert code == 0, stderr
