"""The stepwise run that bias correction and adaptive rounding go layer by layer with: on a graph with
shape arithmetic, attention, GridSample and two outputs, batches of two sizes, each tensor asked for
equals the whole graph's, a change to a layer's values reaches what reads it as a changed bias would,
and nothing is kept once its last reader has run."""

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import numpy_helper

from rvdeploy.precision.stepwise import StepwiseRun

from test_hybrid_graph import hybrid  # noqa: F401 (the fixture)

LAYERS = ("Conv", "Gemm", "MatMul")


def assert_close(got: np.ndarray, want: np.ndarray, name: str, tolerance: float) -> None:
    """Equal up to float rounding order (the parts' sessions fuse what the whole graph, run as written,
    does not): ``tolerance`` × the tensor's largest magnitude."""
    assert got.shape == want.shape and got.dtype == want.dtype, name
    assert np.abs(got.astype(np.float64) - want).max() <= tolerance * max(np.abs(want).max(), 1.0), name


def whole_graph(model: onnx.ModelProto, names: list[str], feeds: list[dict]) -> list[list[np.ndarray]]:
    """``names`` from one run of the whole graph per batch, as written (no fusions)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend(onnx.ValueInfoProto(name=name) for name in names)
    settings = onnxruntime.SessionOptions()
    settings.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = onnxruntime.InferenceSession(probe.SerializeToString(), settings, providers=["CPUExecutionProvider"])
    runs = [session.run(names, feed) for feed in feeds]
    return [[run[k] for run in runs] for k in range(len(names))]


@pytest.fixture()
def graph_and_feeds(hybrid):  # noqa: F811
    model = onnx.load(hybrid)
    rng = np.random.default_rng(0)
    feeds = [{"input": rng.standard_normal((n, 3, 32, 32), dtype=np.float32)} for n in (5, 3)]  # a symbolic batch
    layers = [node.output[0] for node in model.graph.node if node.op_type in LAYERS]
    return model, feeds, layers


def test_each_tensor_equals_the_whole_graphs(graph_and_feeds):
    model, feeds, layers = graph_and_feeds
    asked = layers + [output.name for output in model.graph.output]
    run = StepwiseRun(model, asked, feeds, "the hybrid graph")
    reference = whole_graph(model, asked, feeds)
    for name, expected in zip(asked, reference):
        for got, want in zip(run.values(model, name), expected):
            assert_close(got, want, name, 1e-5)  # measured: 1e-6
    assert run.kept == {}  # every value freed once its last reader ran


def test_a_replaced_value_reaches_its_readers_as_a_changed_bias_would(graph_and_feeds):
    model, feeds, layers = graph_and_feeds
    first = next(node for node in model.graph.node if node.op_type == "Conv")
    bias = next(init for init in model.graph.initializer if init.name == first.input[2])
    change = np.zeros(numpy_helper.to_array(bias).shape, np.float32)
    change[0] = 0.5
    changed = onnx.ModelProto()
    changed.CopyFrom(model)
    changed_bias = next(init for init in changed.graph.initializer if init.name == bias.name)
    changed_bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias) + change, bias.name))
    asked = layers + [output.name for output in model.graph.output]
    run = StepwiseRun(model, asked, feeds, "the hybrid graph")
    values = run.values(model, first.output[0])
    run.replace(first.output[0], [v + change.reshape(1, -1, 1, 1) for v in values])
    reference = whole_graph(changed, asked[1:], feeds)
    for name, expected in zip(asked[1:], reference):
        for got, want in zip(run.values(model, name), expected):
            assert_close(got, want, name, 1e-5)


def test_a_tensor_asked_out_of_turn_or_a_changed_graph_is_refused(graph_and_feeds):
    model, feeds, layers = graph_and_feeds
    run = StepwiseRun(model, layers[:2], feeds, "the hybrid graph")
    with pytest.raises(ValueError, match="out of turn"):
        run.values(model, layers[2])
    shorter = onnx.ModelProto()
    shorter.CopyFrom(model)
    del shorter.graph.node[-1]
    with pytest.raises(ValueError, match="nodes changed"):
        run.values(shorter, layers[0])
