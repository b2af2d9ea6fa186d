"""The proofs' own arithmetic against torch's: the numpy convolution and pooling a graph fold's proof
runs, the probe images, and ONNX Runtime's values of a graph with outputs added."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from rvdeploy.graphfold.reference import AvgPoolRef, ConvRef, Input
from rvdeploy.onnx_io import run_with_values
from rvdeploy.probes import _bilinear, image_like

# (channels in, out, groups, kernel, strides, dilations, pads in ONNX order)
CONVS = [
    (8, 12, 4, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1)),
    (6, 6, 6, (3, 3), (2, 2), (1, 1), (1, 1, 1, 1)),  # depthwise, strided
    (4, 8, 1, (5, 3), (2, 1), (2, 1), (4, 1, 4, 1)),  # dilated, uneven
    (4, 6, 2, (3, 3), (1, 1), (1, 1), (0, 1, 2, 1)),  # off-centre pads
    (16, 32, 1, (1, 1), (1, 1), (1, 1), (0, 0, 0, 0)),
    (4, 4, 2, (3,), (2,), (1,), (1, 0)),  # 1-d
    (4, 6, 2, (3, 3, 3), (1, 2, 1), (1, 1, 1), (1, 1, 1, 1, 1, 1)),  # 3-d
]


@pytest.mark.parametrize("conv", CONVS, ids=str)
def test_convolution_matches_torch(conv):
    channels, out, groups, kernel, strides, dilations, pads = conv
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, channels) + (9,) * len(kernel))
    weight, bias = rng.standard_normal((out, channels // groups) + kernel), rng.standard_normal(out)
    reference = ConvRef(Input(), weight, bias, strides, pads, dilations, groups)
    n = len(kernel)
    padded = F.pad(torch.from_numpy(x), [p for i in reversed(range(n)) for p in (pads[i], pads[n + i])])
    expected = (F.conv1d, F.conv2d, F.conv3d)[n - 1](padded, torch.from_numpy(weight), torch.from_numpy(bias),
                                                      strides, 0, dilations, groups).numpy()
    result = reference.run(x, np.float64)
    assert result.shape == expected.shape and np.abs(result - expected).max() < 1e-12
    single = reference.run(x, np.float32)
    assert single.dtype == np.float32 and np.abs(single - expected).max() < 1e-4


def test_average_pool_counts_its_padding_like_torch():
    x = np.random.default_rng(1).standard_normal((2, 3, 8, 7))
    result = AvgPoolRef(Input(), (3, 3), (2, 2), (1, 1, 1, 1)).run(x, np.float64)
    expected = F.avg_pool2d(torch.from_numpy(x), 3, 2, padding=1, count_include_pad=True).numpy()
    assert result.shape == expected.shape and np.abs(result - expected).max() < 1e-14


@pytest.mark.parametrize("size", [7, 13, 32, 64])
def test_probe_images_resize_like_torch(size):
    low = np.random.default_rng(2).random((2, 3, 5, 5))
    resize = _bilinear(5, size)
    expected = F.interpolate(torch.from_numpy(low), size=(size, size), mode="bilinear", align_corners=False).numpy()
    assert np.abs(resize @ low @ resize.T - expected).max() < 1e-12


def test_probe_images_are_seeded_and_image_like():
    images = image_like(4, 3, 32, seed=3)
    assert images.dtype == np.float32 and images.shape == (4, 3, 32, 32)
    assert np.array_equal(images, image_like(4, 3, 32, seed=3)) and not np.array_equal(images, image_like(4, 3, 32, seed=4))
    # Smooth: neighbouring pixels far closer than random ones; channels move together.
    assert np.abs(np.diff(images, axis=3)).mean() < 0.2 * np.abs(images - images[::-1]).mean()
    assert np.corrcoef(images[:, 0].ravel(), images[:, 2].ravel())[0, 1] > 0.5


def _two_step_graph() -> onnx.ModelProto:
    """y = Relu(x @ W) + 1, with the Relu's input an intermediate tensor."""
    weight = numpy_helper.from_array(np.random.default_rng(4).standard_normal((4, 3)).astype(np.float32), "W")
    one = numpy_helper.from_array(np.ones(3, np.float32), "one")
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Add", ["r", "one"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], [weight, one])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_values_with_outputs_added():
    """Intermediate tensors added as outputs for one run: their values, and the model itself unchanged."""
    model = _two_step_graph()
    feeds = {"x": np.random.default_rng(5).standard_normal((2, 4)).astype(np.float32)}
    values = run_with_values(model, feeds, ["h", "r"], "the graph", threads=1)
    expected_h = feeds["x"] @ numpy_helper.to_array(model.graph.initializer[0])
    assert np.allclose(values["h"], expected_h, atol=1e-6) and np.allclose(values["y"], np.maximum(expected_h, 0) + 1, atol=1e-6)
    assert np.array_equal(values["r"], np.maximum(values["h"], 0))
    outputs_only = run_with_values(model, feeds, [], "the graph")
    assert set(outputs_only) == {"x", "y"} and np.array_equal(outputs_only["y"], values["y"])
    assert [o.name for o in model.graph.output] == ["y"]
