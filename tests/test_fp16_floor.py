"""The FP16 plan beyond range: tensors below FP16's normal range stay FP32, and the label-free floor
keeps a short run of nodes FP32 where the graph amplifies FP16 rounding; INT8's TensorRT fallback
runs its layers in the precision that plan gives them."""

import re

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper

from rvdeploy.compare import sqnr_db
from rvdeploy.data import image_folder
from rvdeploy.onnx_io import read_metadata
from rvdeploy.precision.calib import activation_stats, calibrate
from rvdeploy.precision.choices import DEFAULT_FP16_MIN_SQNR_DB
from rvdeploy.precision.fp16 import convert_fp16, plan_fp16
from rvdeploy.precision.fp16_file import Fp16Options, quantize_fp16, random_probes
from rvdeploy.precision.mixed import fallback_graph
from rvdeploy.precision.sensitivity import OutputProbe
from rvdeploy.preprocess import Preprocess

from test_cli import run
from test_int8_guard import CALIB


def _chain(path, ops: list[tuple[str, str, float | str | None]], shape=(4, 3, 8, 8)):
    """x through elementwise ops in a chain: (name, op, second input) each, the second input a constant,
    an earlier op's name (its output), or None (a unary op)."""
    nodes, inits, previous = [], [], "x"
    for i, (name, op, value) in enumerate(ops):
        out = "y" if i == len(ops) - 1 else f"{name}_out"
        inputs = [previous] + ([] if value is None else [f"{value}_out"] if isinstance(value, str) else [f"{name}_c"])
        if value is not None and not isinstance(value, str):
            inits.append(numpy_helper.from_array(np.float32(value), f"{name}_c"))
        nodes.append(helper.make_node(op, inputs, [out], name=name))
        previous = out
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def _outputs(path, x: np.ndarray) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {"x": x[i:i + 4]})[0] for i in range(0, len(x), 4)])


def _held_out_sqnr(graph, reference) -> float:
    """On probes the plan never saw: other seeds, both kinds."""
    x = np.concatenate([np.random.default_rng(7).standard_normal((8, 3, 8, 8), dtype=np.float32),
                        np.random.default_rng(8).random((8, 3, 8, 8), dtype=np.float32)])
    return sqnr_db(_outputs(graph, x), _outputs(reference, x))


def test_fp16_floor_keeps_what_fp16_cannot_compute_in_fp32(tmp_path):
    """1.0001·x − x: FP16 rounds the 1.0001 to 1 (its spacing there is 0.001), so nothing is left. ONNX
    Runtime on a CPU computes FP16 ops it has no kernel for in FP32: what it measures is the FP16
    weights' rounding and the FP16 inputs and outputs, not every tensor's. Without the floor the low
    SQNR is measured and called out; with it (the default) the Mul stays FP32 and the graph is exact."""
    gain = numpy_helper.from_array(np.float32(1.0001), "gain")
    nodes = [helper.make_node("Mul", ["x", "gain"], ["scaled"], name="mul"), helper.make_node("Sub", ["scaled", "x"], ["y"], name="sub")]
    graph = helper.make_graph(nodes, "cancel", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 3, 8, 8])], [gain])
    source = tmp_path / "cancel.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), source)
    report = quantize_fp16(source, tmp_path / "fp16.onnx", Fp16Options(min_sqnr=0))
    kinds = random_probes((4, 3, 8, 8), 8)  # the probes it was measured on, in batches of 4: the worse kind's SQNR
    assert report.output_sqnr_db == pytest.approx(
        min(sqnr_db(_outputs(tmp_path / "fp16.onnx", x), _outputs(source, x)) for x in kinds), abs=1e-6)
    assert report.output_sqnr_db < 1 and report.floor is None and report.judged_inputs == report.observed_inputs == 16
    code, stdout, stderr = run("quantize", source, "--fp16", "--min-sqnr", "0", "-o", tmp_path / "again.onnx")
    assert code == 0, stderr
    assert "amplifies FP16 rounding" in stdout and "no floor" in stdout

    report = quantize_fp16(source, tmp_path / "floor.onnx", Fp16Options())
    assert report.output_sqnr_db == np.inf and report.floor.met and report.floor.planned_sqnr_db < 1
    assert [(k.node, k.kind) for k in report.kept_fp32] == [("mul", "floor")]  # the Sub alone in FP16 is exact
    assert read_metadata(onnx.load(tmp_path / "floor.onnx"))["fp32_nodes"] == ["mul"]
    code, stdout, stderr = run("quantize", source, "--fp16", "-o", tmp_path / "floor_cli.onnx")
    assert code == 0, stderr
    assert re.search(r"identical; meets the 35 dB floor with its FP16 nodes 1 to 1 of 2 in graph order kept FP32", stdout)


def test_tensors_below_fp16s_normal_range_stay_fp32(tmp_path):
    """A layer scale of 1e-6, then 1e4 and 100 (FP16's range ends at 65504): FP16 holds 1e-6 with 4 bits
    (subnormal), so the scaled tensor loses ~25 dB; both nodes that touch it stay FP32, without the
    floor's search."""
    source = _chain(tmp_path / "scale.onnx", [("scale", "Mul", 1e-6), ("unscale", "Mul", 1e4), ("up", "Mul", 100.0),
                                              ("act", "Relu", None), ("gain", "Mul", 3.0)])
    naive = tmp_path / "naive.onnx"
    onnx.save(convert_fp16(onnx.load(source)), naive)
    assert _held_out_sqnr(naive, source) < 45
    report = quantize_fp16(source, tmp_path / "fp16.onnx", Fp16Options(min_sqnr=0))
    assert {(k.node, k.kind) for k in report.kept_fp32} == {("scale", "underflow"), ("unscale", "underflow")}
    assert "scale_out's FP16 copy is" in report.kept_fp32[0].reason and report.nodes_fp16 == 3
    assert _held_out_sqnr(tmp_path / "fp16.onnx", source) > 65


def test_the_floor_keeps_a_short_run_where_rounding_is_amplified(tmp_path):
    """3·x, then 1.0001 times that minus it, then two ops more. In FP16 the 1.0001 rounds to 1 and the
    difference is lost (ONNX Runtime on a CPU rounds the weights; it computes the ops it has no FP16
    kernel for in FP32). The floor's search keeps that Mul FP32, and only it: the run it finds starts
    after the first node."""
    ops = [("gain", "Mul", 3.0), ("scale", "Mul", 1.0001), ("cancel", "Sub", "gain"), ("act", "Relu", None),
           ("half", "Mul", 0.5)]
    source = _chain(tmp_path / "cancel.onnx", ops)
    report = quantize_fp16(source, tmp_path / "fp16.onnx")
    floor = report.floor
    assert floor.planned_sqnr_db < 1 and floor.met and (floor.kept_from, floor.kept_to, floor.fp16_nodes) == (1, 2, 5)
    assert [(k.node, k.kind) for k in report.kept_fp32] == [("scale", "floor")]
    assert report.nodes_fp16 == 4 and report.output_sqnr_db >= 36  # the search aims a dB over the floor
    assert [(step["from"], step["to"]) for step in floor.steps] == [(0, 1), (0, 2), (1, 2)]  # missed, met, met
    assert _held_out_sqnr(tmp_path / "fp16.onnx", source) >= 35

    code, stdout, stderr = run("quantize", source, "--fp16", "--min-sqnr", "101", "-o", tmp_path / "bad.onnx")
    assert code != 0 and "--min-sqnr must be a number of dB from 0" in stderr and not (tmp_path / "bad.onnx").exists()


def test_int8_tensorrt_fallback_runs_fp32_where_the_fp16_plan_does(tmp_path):
    """A 1x1 conv by 1.0001·I, minus its input, then a 3x3 conv: in FP16 the first conv's weight rounds
    to 1 and leaves nothing, so the FP16 plan keeps it FP32 (the floor), and a TensorRT fallback graph
    that takes it out of INT8 runs it in FP32; the 3x3 conv out of INT8 runs in FP16."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(1.0001 * np.eye(3, dtype=np.float32).reshape(3, 3, 1, 1), "w1"),
             numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w3"),
             numpy_helper.from_array(np.zeros(8, np.float32), "b3")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="scale"),
             helper.make_node("Sub", ["c1", "x"], ["d"], name="cancel"),
             helper.make_node("Conv", ["d", "w3", "b3"], ["c3"], name="body", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c3"], ["y"], name="act")]
    graph = helper.make_graph(nodes, "cancel_convs", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8, 8, 8])], inits)
    source = tmp_path / "convs.onnx"
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, source)
    recipe = Preprocess((8, 8), 8, (0.3,) * 3, (0.37,) * 3)
    images = image_folder(CALIB, recipe, 32)
    probe = OutputProbe(model, images, recipe, source)
    plan = plan_fp16(model, activation_stats(model, probe.feeds), probe.sqnr, DEFAULT_FP16_MIN_SQNR_DB)
    assert [(k.node, k.kind) for k in plan.kept_fp32] == [("scale", "floor")] and plan.floor.planned_sqnr_db < 1
    calibration = calibrate(source, "key", images, recipe, "minmax", show_progress=False)

    def fp32_nodes() -> set[str]:  # what quantize_int8_file passes
        return {k.node for k in plan.kept_fp32}

    mixed = fallback_graph(source, calibration, "tensorrt", ("scale",), fp32_nodes)
    assert mixed.precisions == {"scale": "fp32", "body": "int8"}
    both = fallback_graph(source, calibration, "tensorrt", ("scale", "body"), fp32_nodes)
    assert both.precisions == {"scale": "fp32", "body": "fp16"} and probe.sqnr(both.model) >= 35
    typed = {v.name: v.type.tensor_type.elem_type for v in both.model.graph.value_info}
    assert typed["c1"] == TensorProto.FLOAT and typed["c3"] == TensorProto.FLOAT16


def test_a_tensor_fp16_flushes_to_zero_scores_0_db(tmp_path):
    """Values of 1e-22: FP16 keeps none of them (FP32 squares of them would be 0 as well)."""
    source = _chain(tmp_path / "tiny.onnx", [("tiny", "Mul", 1e-22), ("back", "Mul", 1e22)])
    stats = activation_stats(onnx.load(source), [{"x": np.ones((4, 3, 8, 8), np.float32)}])
    assert stats.fp16_sqnr_db["tiny_out"] == 0.0 and stats.fp16_sqnr_db["y"] == np.inf and stats.peaks["y"] == 1.0
