"""INT8 for the CPU it runs on: the CPU class as ONNX Runtime's kernels show it, the weight encoding that
picks the non-saturating kernels, the graphs made for each class, and the warning when a graph runs on
the other class. Everything is measured on the CPU the test runs on; where a figure depends on the
class, the test says which class and uses that class's bound."""

import warnings

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import numpy_helper

from rvdeploy.compare import sqnr_db
from rvdeploy.errors import QuantizeError, RvdeployWarning
from rvdeploy.machine import CPU_CLASSES, cpu_int8_class, describe_machine
from rvdeploy.onnx_io import read_metadata, save_onnx, write_metadata
from rvdeploy.precision import cpu_format
from rvdeploy.precision.calib import calibrate
from rvdeploy.precision.cpu_format import plan_cpu_format, saturating_layers
from rvdeploy.precision.int8 import encode_weights, quantizable_nodes, quantize_int8
from rvdeploy.precision.quantize import Int8Options, quantize_int8_file
from rvdeploy.precision.sensitivity import OutputProbe
from rvdeploy.data import image_folder
from rvdeploy.runners import open_runner

from test_bias_correction import heldout_labels, logits_on_heldout
from test_cli import assert_one_line_error, run
from test_int8_guard import CALIB, recipe_of

HERE = cpu_int8_class()
STEM = "/stage0/rbr_reparam/Conv"


def weight_arrays(model: onnx.ModelProto) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Each INT8 layer's weights as stored: (values, scale, zero point)."""
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    arrays = {}
    for node in model.graph.node:
        dq = producers.get(node.input[1]) if node.op_type in ("Conv", "Gemm") else None
        if dq is not None and dq.op_type == "DequantizeLinear":
            arrays[node.name] = tuple(inits[name] for name in dq.input[:3])
    return arrays


def dequantized(values, scale, zero) -> np.ndarray:
    shape = (-1,) + (1,) * (values.ndim - 1)
    return (values.astype(np.float64) - zero.reshape(shape)) * scale.reshape(shape).astype(np.float64)


@pytest.fixture(scope="module")
def made(tmp_path_factory, digits_onnx):
    """The digits model quantized for each CPU class and for this CPU's (auto), on every calibration image."""
    work = tmp_path_factory.mktemp("cpu_class")
    graphs = {}
    for cpu in ("vnni", "avx2", "auto"):
        out = work / f"{cpu}.onnx"
        report = quantize_int8_file(digits_onnx, out, Int8Options(CALIB, target="onnxruntime", cpu=cpu, show_progress=False))
        graphs[cpu] = out, report
    trt = work / "tensorrt.onnx"
    graphs["tensorrt"] = trt, quantize_int8_file(digits_onnx, trt, Int8Options(CALIB, show_progress=False))
    return graphs


def test_this_cpu_has_a_class_and_measurements_name_it():
    assert HERE in CPU_CLASSES
    assert describe_machine()["cpu_int8_class"] == HERE


def test_each_class_gets_its_graph_and_says_so(made):
    for cpu in ("vnni", "avx2", "auto"):
        path, report = made[cpu]
        meta = read_metadata(onnx.load(path))
        assert meta["int8_cpu"] == report.cpu_format.cpu == (HERE if cpu == "auto" else cpu)
        assert report.cpu_format.this_cpu == HERE
        unsigned = {node for node, (values, _, _) in weight_arrays(onnx.load(path)).items() if values.dtype == np.uint8}
        assert unsigned == set(meta["u8u8_layers"]) == set(report.cpu_format.unsigned)
    assert read_metadata(onnx.load(made["vnni"][0]))["u8u8_layers"] == []  # every layer on the fastest kernels
    assert made["tensorrt"][1].cpu_format is None and "int8_cpu" not in read_metadata(onnx.load(made["tensorrt"][0]))
    if HERE == "vnni":  # saturation cannot be seen here: every layer takes the kernels that cannot saturate
        assert set(made["avx2"][1].cpu_format.unsigned) == set(quantizable_nodes(onnx.load(made["avx2"][0])))
    else:  # measured here: the stem reads the image at full range and saturates (17 dB lost on Zen 3)
        assert STEM in made["avx2"][1].cpu_format.unsigned and made["avx2"][1].cpu_format.saturation_db[STEM] > 3


def test_the_classes_store_the_same_weights(made):
    """The u8u8 layers hold the u8s8 graph's weights + 128: the same grid, the same products."""
    signed, unsigned = (weight_arrays(onnx.load(made[cpu][0])) for cpu in ("vnni", "avx2"))
    assert signed.keys() == unsigned.keys()
    for node, (values, scale, zero) in signed.items():
        assert values.dtype == np.int8 and not zero.any()
        other, other_scale, other_zero = unsigned[node]
        np.testing.assert_array_equal(other_scale, scale)
        np.testing.assert_array_equal(dequantized(other, other_scale, other_zero), dequantized(values, scale, zero))


def test_the_graph_for_this_cpu_is_accurate_here(made, digits_onnx):
    """Held-out logits, measured here: the graph made for this CPU meets the bounds of the issue on
    either class (≥ 26 dB, within 1.5 dB of the tensorrt layout, top-1 within 0.5 point of FP32)."""
    recipe = recipe_of(digits_onnx)
    reference, labels = logits_on_heldout(digits_onnx, recipe), heldout_labels(recipe)
    fp32_top1 = (reference.argmax(1) == labels).mean() * 100
    trt_sqnr = sqnr_db(logits_on_heldout(made["tensorrt"][0], recipe), reference)
    sqnr = {}
    for cpu in ("vnni", "avx2", "auto"):
        logits = logits_on_heldout(made[cpu][0], recipe)
        sqnr[cpu] = sqnr_db(logits, reference)
        if cpu in ("auto", HERE, "avx2"):  # u8u8 layers do not saturate anywhere
            assert sqnr[cpu] >= 26.0 and sqnr[cpu] >= trt_sqnr - 1.5, (cpu, sqnr[cpu], trt_sqnr)
            assert fp32_top1 - (logits.argmax(1) == labels).mean() * 100 <= 0.5
    if HERE == "avx2":  # a VNNI graph on this CPU: its u8s8 layers saturate (12.6 dB here on Zen 3)
        assert sqnr["vnni"] < sqnr["avx2"] - 6.0
    else:  # the same products on both kernels, added exactly
        np.testing.assert_array_equal(logits_on_heldout(made["vnni"][0], recipe), logits_on_heldout(made["avx2"][0], recipe))


def test_encoding_is_exact_both_ways(made):
    model = onnx.load(made["vnni"][0])
    layers = frozenset(quantizable_nodes(model))
    unsigned = encode_weights(model, layers)
    assert all(values.dtype == np.uint8 and (zero == 128).all() for values, _, zero in weight_arrays(unsigned).values())
    back = {i.name: numpy_helper.to_array(i) for i in encode_weights(unsigned, frozenset()).graph.initializer}
    original = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    assert back.keys() == original.keys()
    assert all(back[k].dtype == original[k].dtype and np.array_equal(back[k], original[k]) for k in original)
    one = encode_weights(model, frozenset({STEM}))
    assert [n for n, (v, _, _) in weight_arrays(one).items() if v.dtype == np.uint8] == [STEM]


def test_saturation_budget_keeps_the_cheap_layers_on_the_fast_kernels():
    whole = 30.0  # noise 1e-3: the budget is 1e-4
    signed = {"a": 40.0, "b": 30.0, "c": 50.0, "d": float("nan"), "e": 45.0}
    unsigned = {"a": 40.0, "b": 45.0, "c": 51.0, "d": 40.0, "e": 46.0}
    # a: no loss; c and e lose 2e-6 and 6e-6 together; b loses 9.7e-4, over the budget; d: NaN, the worst
    assert saturating_layers(signed, unsigned, whole) == {"b", "d"}
    assert saturating_layers({"a": 40.0}, {"a": 40.0}, float("inf")) == frozenset()


def test_the_saturation_check_measures_each_layer_both_ways(monkeypatch, digits_onnx):
    """The AVX2 path measures every layer alone in u8s8 and in u8u8. Run here whatever this CPU is:
    on a VNNI CPU both kernels add exactly, so no layer loses anything and every layer stays u8s8."""
    model = onnx.load(digits_onnx)
    recipe = recipe_of(digits_onnx)
    images = image_folder(CALIB, recipe, 64)
    calibration = calibrate(digits_onnx, "test", images, recipe, "minmax", None, False)
    signed = quantize_int8(digits_onnx, calibration, "onnxruntime")
    monkeypatch.setattr(cpu_format, "cpu_int8_class", lambda: "avx2")
    plan = plan_cpu_format("avx2", model, signed, OutputProbe(model, images, recipe, "digits"), show_progress=False)
    assert set(plan.saturation_db) == set(quantizable_nodes(model)) and plan.unsigned == plan.measured_unsigned
    if HERE == "vnni":
        assert all(loss == 0 for loss in plan.saturation_db.values()) and not plan.unsigned
    else:
        assert STEM in plan.unsigned and plan.saturation_db[STEM] > 3


def _relabelled(source, out, cpu):
    model = onnx.load(source)
    write_metadata(model, {"int8_cpu": cpu})
    save_onnx(model, out)
    return out


def test_a_graph_for_the_other_class_warns_once_in_runners_eval_and_bench(made, tmp_path):
    other = next(c for c in CPU_CLASSES if c != HERE)
    foreign = _relabelled(made["auto"][0], tmp_path / "foreign.onnx", other)
    with pytest.warns(RvdeployWarning, match="VNNI"):
        with open_runner(foreign, backend="onnxruntime"):
            pass
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with open_runner(made["auto"][0], backend="onnxruntime"):  # made for this CPU: silent
            pass
        with open_runner(made["tensorrt"][0], backend="onnxruntime"):  # the GPU layout has no CPU class
            pass
    code, stdout, stderr = run("eval", foreign, "--data", CALIB.parent.parent / "models" / "digits" / "heldout")
    assert code == 0, stderr
    assert [line for line in stderr.splitlines() if line.startswith("warning:")] == [
        line for line in stderr.splitlines() if "foreign.onnx is an INT8 graph" in line] and "warning: foreign.onnx" in stderr
    assert f"int8/onnxruntime/{other}" in stdout
    benched = _relabelled(made["auto"][0], tmp_path / "benched.onnx", other)  # a new name: warnings show once each
    code, stdout, stderr = run("bench", benched, "--batch", 1, "--warmup-s", 0.05, "--min-s", 0.1)
    assert code == 0, stderr
    assert sum(line.startswith("warning: benched.onnx") for line in stderr.splitlines()) == 1


def test_cpu_option_is_checked(digits_onnx, tmp_path):
    with pytest.raises(QuantizeError, match="unknown CPU class"):
        Int8Options(CALIB, target="onnxruntime", cpu="avx512")
    with pytest.raises(QuantizeError, match="--cpu is for --target onnxruntime"):
        Int8Options(CALIB, cpu="avx2")
    out = tmp_path / "x.onnx"
    assert_one_line_error(*run("quantize", digits_onnx, "--int8", "--calib", CALIB, "--cpu", "vnni", "-o", out),
                          "--cpu is for --target onnxruntime")
    assert_one_line_error(*run("quantize", digits_onnx, "--fp16", "--cpu", "avx2", "-o", out), "--cpu is for --int8")
    assert not out.exists()


def test_summary_names_the_class_and_where_it_was_measured(digits_onnx, tmp_path):
    code, stdout, stderr = run("quantize", digits_onnx, "--int8", "--calib", CALIB, "--num-images", 64,
                               "--target", "onnxruntime", "--cpu", "avx2", "-o", tmp_path / "a.onnx")
    assert code == 0, stderr
    line = next(line for line in stdout.splitlines() if line.startswith("CPU class avx2"))
    assert f"measured on this CPU ({HERE})" in line
    assert ("this CPU's class" in line) == (HERE == "avx2")


def test_a_quantized_conv_agrees_with_the_class():
    """The class probe is one u8s8 product (MatMulInteger); a Q/DQ Conv, which ONNX Runtime runs as a
    QLinearConv, shows the same: exact on VNNI, saturated without it."""
    from onnx import TensorProto, helper

    channels, exact = 64, 255 * 127 * 64
    out_scale = exact / 255  # the exact sum is 255 on the output grid; a saturated one about half that
    inits = [numpy_helper.from_array(np.array(1.0, np.float32), "xs"), numpy_helper.from_array(np.array(0, np.uint8), "xz"),
             numpy_helper.from_array(np.full((4, channels, 1, 1), 127, np.int8), "w"),
             numpy_helper.from_array(np.ones(4, np.float32), "ws"), numpy_helper.from_array(np.zeros(4, np.int8), "wz"),
             numpy_helper.from_array(np.array(out_scale, np.float32), "ys"), numpy_helper.from_array(np.array(0, np.uint8), "yz")]
    nodes = [helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["x"]),
             helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wf"], axis=0),
             helper.make_node("Conv", ["x", "wf"], ["y"]),
             helper.make_node("QuantizeLinear", ["y", "ys", "yz"], ["yq"]),
             helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["out"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("xq", TensorProto.UINT8, [1, channels, 2, 2])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4, 2, 2])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y = session.run(None, {"xq": np.full((1, channels, 2, 2), 255, np.uint8)})[0]
    assert np.allclose(y, exact, rtol=1e-3) == (HERE == "vnni"), (y.ravel()[:2], exact, HERE)
