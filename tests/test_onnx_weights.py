"""Weights held apart from the protobuf (rvdeploy.onnx_weights): read from the file into arrays,
run by ONNX Runtime as fed inputs, written streamed; and the graph fold of a file that way, against
the fold of the same graph loaded whole."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from rvdeploy import onnx_io
from rvdeploy.errors import OnnxError
from rvdeploy.graphfold import fold_graph, fold_onnx_file
from rvdeploy.onnx_io import load_onnx, run_with_values
from rvdeploy.onnx_weights import HELD, is_held, materialized, read_apart, write_apart
from test_graphfold import export, randomised, repvgg_style


def _canonical(model: onnx.ModelProto) -> bytes:
    return model.SerializeToString(deterministic=True)


def _same_values(a: onnx.ModelProto, b: onnx.ModelProto) -> bool:
    """The same graph, each initializer the same array however it is stored (raw, typed, external)."""
    arrays = lambda m: {t.name: numpy_helper.to_array(t).tolist() for t in m.graph.initializer}  # noqa: E731
    return (list(a.graph.node) == list(b.graph.node) and arrays(a) == arrays(b)
            and list(a.metadata_props) == list(b.metadata_props))


def _graph(old_ir: bool = False) -> onnx.ModelProto:
    """y = Relu(x @ W) * s + b, with W large (held apart), s small, b given as float_data (not raw)."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((96, 80)).astype(np.float32), "W")
    scale = numpy_helper.from_array(rng.standard_normal(80).astype(np.float32), "s")
    shift = helper.make_tensor("b", TensorProto.FLOAT, [80], rng.standard_normal(80).astype(np.float32).tolist())
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Mul", ["r", "s"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 96])]
    if old_ir:  # an old IR lists its initializers among the inputs
        inputs.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, [96, 80]))
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 80])],
                              [weight, scale, shift])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.metadata_props.add(key="note", value="kept")
    return model


@pytest.mark.parametrize("old_ir", [False, True])
def test_read_run_write_round_trip(tmp_path, old_ir):
    """Read: the large raw float32 weight is held apart (its values exact), the rest stays in the
    graph. Run: ONNX Runtime's values fed the held weight equal those of the whole graph. Written:
    the file onnx loads is the input graph, byte-deterministically, and reads back apart alike."""
    model = _graph(old_ir)
    onnx.save(model, str(tmp_path / "in.onnx"))
    structure, weights = read_apart(tmp_path / "in.onnx")
    assert list(weights) == ["W"] and not weights["W"].flags.writeable and weights["W"].dtype == np.float32
    assert np.array_equal(weights["W"], numpy_helper.to_array(model.graph.initializer[0]))
    held = {t.name: is_held(t) for t in structure.graph.initializer}
    assert held == {"W": True, "s": False, "b": False} and not structure.graph.initializer[0].raw_data
    assert _canonical(materialized(structure, weights)) == _canonical(model)

    feeds = {"x": np.random.default_rng(1).standard_normal((3, 96)).astype(np.float32)}
    whole = run_with_values(model, feeds, ["h"], "the graph")
    apart = run_with_values(structure, feeds, ["h"], "the graph", weights=weights)
    assert all(np.array_equal(apart[k], whole[k]) for k in ("h", "y"))
    assert [o.name for o in structure.graph.output] == ["y"]

    for name in ("a.onnx", "b.onnx"):
        write_apart(structure, weights, tmp_path / name, full_check=True)
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    assert _canonical(load_onnx(tmp_path / "a.onnx")) == _canonical(model)
    again, again_weights = read_apart(tmp_path / "a.onnx")
    assert _canonical(again) == _canonical(structure) and np.array_equal(again_weights["W"], weights["W"])


def test_external_data_is_held_apart_too(tmp_path):
    onnx.save_model(_graph(), str(tmp_path / "ext.onnx"), save_as_external_data=True, location="ext.data",
                    size_threshold=0)  # (it moves the weights out of the model it saves)
    structure, weights = read_apart(tmp_path / "ext.onnx")
    assert list(weights) == ["W"] and _same_values(materialized(structure, weights), _graph())
    (tmp_path / "ext.data").unlink()
    with pytest.raises(OnnxError, match="external data cannot be read"):
        read_apart(tmp_path / "ext.onnx")


def test_over_two_gigabytes_it_writes_external_data(tmp_path, monkeypatch):
    model = _graph()
    onnx.save(model, str(tmp_path / "in.onnx"))
    structure, weights = read_apart(tmp_path / "in.onnx")
    monkeypatch.setattr(onnx_io, "_PROTO_LIMIT", 1000)
    write_apart(structure, weights, tmp_path / "big.onnx", full_check=True)
    assert (tmp_path / "big.onnx.data").stat().st_size >= weights["W"].nbytes
    assert _same_values(onnx.load(str(tmp_path / "big.onnx")), model)


def _raw_data_span(data: bytes, array: np.ndarray) -> tuple[int, int]:
    start = data.index(array.tobytes())
    return start, start + array.nbytes


def test_broken_files_are_refused_in_one_line(tmp_path):
    model = _graph()
    data = model.SerializeToString()
    start, end = _raw_data_span(data, numpy_helper.to_array(model.graph.initializer[0]))
    cases = {
        "truncated": data[: (start + end) // 2],  # ends inside the held weight's data
        "garbage": b"\xff" * 64,
        "empty": b"",
    }
    messages = {"truncated": "not an ONNX model", "garbage": "not an ONNX model", "empty": "the file is empty"}
    for name, content in cases.items():
        (tmp_path / f"{name}.onnx").write_bytes(content)
        with pytest.raises(OnnxError, match=messages[name]) as caught:
            read_apart(tmp_path / f"{name}.onnx")
        assert "\n" not in str(caught.value)
    # A shape that asks for more data than the tensor holds.
    wrong = _graph()
    wrong.graph.initializer[0].dims[0] = 97
    onnx.save(wrong, str(tmp_path / "wrong.onnx"))
    with pytest.raises(OnnxError, match=r"initializer 'W' holds 30720 bytes, its shape \[97, 80\] needs 31040"):
        read_apart(tmp_path / "wrong.onnx")
    # A file that points its external data at the held-apart marker, which names no file: refused.
    onnx.save_model(_graph(), str(tmp_path / "h.onnx"), save_as_external_data=True, location=HELD, size_threshold=0)
    (tmp_path / HELD).unlink()
    with pytest.raises(OnnxError, match="external data cannot be read"):
        read_apart(tmp_path / "h.onnx")
    with pytest.raises(OnnxError, match="no such file"):
        read_apart(tmp_path / "missing.onnx")


def test_a_graph_fold_of_a_file_equals_the_fold_of_the_loaded_graph(tmp_path):
    """Conv weights large enough to be held apart (48 channels): the file's fold, proven, is the
    in-memory fold's graph exactly, and ONNX Runtime agrees with the unfolded graph."""
    net = randomised(repvgg_style(48)).eval()
    x = torch.randn(1, 48, 16, 16)
    model = export(net, x)
    onnx.save(model, str(tmp_path / "in.onnx"))
    _, weights = read_apart(tmp_path / "in.onnx")
    assert len(weights) >= 4  # the 5x5 and 3x3 kernels of both blocks at least
    report = fold_onnx_file(tmp_path / "in.onnx", tmp_path / "out.onnx")
    assert report.proof.passed and report.proof.worst_ratio < 1
    expected, _ = fold_graph(model)
    written = load_onnx(tmp_path / "out.onnx")
    assert _canonical(written) == _canonical(expected)
    feeds = {"x": x.numpy()}
    ours = run_with_values(written, feeds, [], "the folded graph")["y"]
    assert np.abs(ours - net(x).detach().numpy()).max() < 1e-4
