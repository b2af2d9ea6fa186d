"""Adaptive rounding of INT8 weights (rvdeploy.precision.rounding, .gptq): the arithmetic against
direct computation, and the digits model quantized with it against rounding to nearest: never worse
on the calibration images, better on held-out ones, weights on the grid TensorRT reads, with the guard,
bias correction and both layouts (and both CPU classes), and TensorRT-RTX builds it."""

import json

import numpy as np
import onnxruntime
import onnx
import pytest
import torch

from onnx import numpy_helper

from rvdeploy.compare import sqnr_db
from rvdeploy.engine.build import compile_onnx
from rvdeploy.engine.library import load_library
from rvdeploy.errors import QuantizeError
from rvdeploy.machine import cpu_int8_class
from rvdeploy.onnx_io import read_metadata
from rvdeploy.precision import gptq
from rvdeploy.precision.quantize import quantize_int8_file

from test_bias_correction import heldout_labels, logits_on_heldout
from test_cli import assert_one_line_error, run
from test_cpu_class import dequantized, weight_arrays
from test_int8_guard import CALIB, options, outputs_on_calibration, recipe_of

HERE = cpu_int8_class()

# -- the arithmetic -------------------------------------------------------------------------


@pytest.mark.parametrize("attrs", [
    {},
    {"strides": [2, 2], "pads": [1, 1, 1, 1]},
    {"dilations": [2, 3], "pads": [2, 3, 1, 0], "group": 2},
    {"group": 4, "pads": [1, 1, 1, 1]},  # depthwise at 4 channels
])
@pytest.mark.parametrize("channels", [4, 24])  # windows gathered channels-first, and channels-last (6+ a group)
def test_unfolded_windows_times_weights_are_the_convolution(attrs, channels):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, channels, 9, 11)).astype(np.float32)
    groups = attrs.get("group", 1)
    w = rng.standard_normal((8, channels // groups, 3, 2)).astype(np.float32)
    top, left, bottom, right = attrs.get("pads", [0, 0, 0, 0])
    padded = torch.nn.functional.pad(torch.from_numpy(x), (left, right, top, bottom))
    y = torch.nn.functional.conv2d(padded, torch.from_numpy(w), stride=attrs.get("strides", [1, 1]),
                                   dilation=attrs.get("dilations", [1, 1]), groups=groups).numpy()
    positions = gptq.output_positions(3, y.shape[2], y.shape[3], 60, rng)
    last = gptq.channels_last(x.shape, (3, 2), groups, len(positions[0]))
    assert last == (channels // groups >= 6)  # 60 windows of 6 taps read the 3 x 9 x 11 input over
    assert not gptq.channels_last(x.shape, (3, 2), groups, 10)  # 10 windows read less: gathered from it as it is
    rows = gptq.unfold(gptq.kernel_windows(x, attrs, (3, 2), last), attrs, positions)  # (rows, groups, K), window order
    order = gptq.window_order((3, 2), channels // groups, last)[:-1]
    per_group = np.empty((groups, 8 // groups, rows.shape[2]), np.float32)
    per_group[:, :, order] = w.reshape(groups, 8 // groups, -1)  # the weights in window order
    computed = np.einsum("rgk,gok->rgo", rows, per_group).reshape(len(rows), 8)
    assert np.allclose(computed, y[positions[0], :, positions[1], positions[2]], atol=1e-4)


def _layer(rng, rows=2000, k=24, out=6, steps=8):
    """A layer whose INT8 input is off by a gain per channel (as upstream rounding leaves it) and a little
    noise, on a grid of ``steps`` levels a side (coarse, so that rounding matters)."""
    x = np.abs(rng.standard_normal((rows, 1, k))).astype(np.float32)
    gain = 1 + 0.05 * rng.standard_normal(k)
    xq = (x * gain + 0.002 * rng.standard_normal(x.shape)).astype(np.float32)
    w, b = rng.standard_normal((1, out, k)), rng.standard_normal((1, out, 1))
    y = (np.einsum("rgk,gok->rgo", x, w) + b[:, :, 0]).astype(np.float32)
    scale = np.abs(w).max(axis=2) / steps
    return xq, y, np.concatenate([w, b], axis=2), scale, gain


def test_closed_form_noise_is_the_direct_one():
    rng = np.random.default_rng(1)
    xq, y, reference, _, _ = _layer(rng)
    chosen = reference + 0.01 * rng.standard_normal(reference.shape)
    direct = np.square(y - (np.einsum("rgk,gok->rgo", xq, chosen[:, :, :-1]) + chosen[:, :, -1])).sum()
    grams = gptq.Grams.of(xq, y)
    # The Gram matrices are float32 products (summed in float64): the noise, a difference of terms the
    # size of the energy, is exact to float32's share of the energy.
    assert grams.noise(chosen) == pytest.approx(direct, abs=1e-6 * grams.energy)
    assert grams.energy == pytest.approx(np.square(y.astype(np.float64)).sum())


@pytest.mark.parametrize("groups", [1, 3])  # one LAPACK triangular inverse; a batched inverse
def test_inverse_factor_is_the_cholesky_factor_of_the_inverse(groups):
    rng = np.random.default_rng(2)
    a = rng.standard_normal((groups, 20, 50))
    hessian = a @ a.transpose(0, 2, 1) + np.eye(20)
    upper = gptq.inverse_factor(hessian)
    assert np.allclose(upper, np.triu(upper))
    assert np.allclose(upper.transpose(0, 2, 1) @ upper, np.linalg.inv(hessian), atol=1e-12)


def test_gptq_with_a_diagonal_hessian_rounds_to_nearest():
    rng = np.random.default_rng(3)
    target = rng.standard_normal((2, 5, 7))
    scale = np.full((2, 5), 0.01)
    integers, free = gptq.gptq(target, gptq.inverse_factor(np.broadcast_to(np.eye(7), (2, 7, 7)).copy()), scale, 6)
    assert np.array_equal(integers, np.clip(np.round(target[:, :, :6] / 0.01), -127, 127))
    assert np.allclose(free, target[:, :, 6:])  # the free (bias) column takes no error from uncorrelated columns


def test_fit_beats_nearest_on_rows_it_never_saw_and_stays_on_the_grid():
    rng = np.random.default_rng(4)
    xq, y, reference, scale, gain = _layer(rng, rows=4000)
    nearest = np.concatenate([np.round(reference[:, :, :-1] / scale[..., None]) * scale[..., None], reference[:, :, -1:]], axis=2)
    folds = (gptq.Grams.of(xq[:2000], y[:2000]), gptq.Grams.of(xq[2000:], y[2000:]))
    result = gptq.fit_layer(reference, nearest, scale, folds, with_bias=True)
    assert result.chosen is not None and result.adaptive_sqnr_db > result.nearest_sqnr_db + 3  # it corrects the input error too
    grid = result.chosen[:, :, :-1] / scale[..., None]
    assert np.allclose(grid, np.round(grid), atol=1e-9) and np.abs(np.round(grid)).max() <= gptq.QMAX
    fresh = np.random.default_rng(99)  # the same layer on rows it was not fitted on
    x = np.abs(fresh.standard_normal((3000, 1, 24))).astype(np.float32)
    y_unseen = (np.einsum("rgk,gok->rgo", x, reference[:, :, :-1]) + reference[:, :, -1]).astype(np.float32)
    unseen = gptq.Grams.of((x * gain + 0.002 * fresh.standard_normal(x.shape)).astype(np.float32), y_unseen)
    assert unseen.noise(result.chosen) < unseen.noise(nearest)
    fixed = gptq.fit_layer(reference, nearest, scale, folds, with_bias=False)  # a bias that may not change stays
    assert fixed.chosen is not None and np.array_equal(fixed.chosen[:, :, -1], reference[:, :, -1])


def test_where_weights_cannot_gain_the_bias_alone_is_refitted_on_held_out_evidence():
    """The rows fitted on carry an error that only looks like a function of the input (a spurious
    dependence on its noise, absent from the held-out rows): weights fitted to it score worse there than
    nearest rounding. Both folds carry a shift of every output, which the bias alone takes up."""
    rng = np.random.default_rng(5)
    x = np.abs(rng.standard_normal((2000, 1, 20))).astype(np.float32)
    w, b = rng.standard_normal((1, 4, 20)), rng.standard_normal((1, 4, 1))
    noise = 0.02 * rng.standard_normal(x.shape)
    xq = (x + noise).astype(np.float32)
    y = np.einsum("rgk,gok->rgo", x, w) + b[:, :, 0] + 0.1
    y[0::2] += np.einsum("rgk,gok->rgo", noise, 30 * rng.standard_normal((1, 4, 20)))[0::2]
    y = y.astype(np.float32)
    reference, scale = np.concatenate([w, b], axis=2), np.abs(w).max(axis=2) / 127
    nearest = np.concatenate([np.round(w / scale[..., None]) * scale[..., None], b], axis=2)
    folds = (gptq.Grams.of(xq[0::2], y[0::2]), gptq.Grams.of(xq[1::2], y[1::2]))
    result = gptq.fit_layer(reference, nearest, scale, folds, with_bias=True)
    assert result.bias_only and result.bias_chosen and result.adaptive_sqnr_db > result.nearest_sqnr_db + 1
    assert np.array_equal(result.chosen[:, :, :-1], nearest[:, :, :-1])  # nearest's integers
    residual = y - np.einsum("rgk,gok->rgo", xq.astype(np.float64), nearest[:, :, :-1])
    np.testing.assert_allclose(result.chosen[0, :, -1], residual.mean(axis=0)[0], rtol=1e-5)  # least squares: the mean
    fixed = gptq.fit_layer(reference, nearest, scale, folds, with_bias=False)  # a bias that may not change: nothing to do
    assert fixed.chosen is None and not fixed.bias_chosen


# -- the digits model -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def rounded(tmp_path_factory, digits_onnx):
    """The digits model quantized (tensorrt layout, all-INT8) with each rounding, bias correction off
    (so that rounding alone differs), and with every default."""
    work = tmp_path_factory.mktemp("rounding")
    made = {}
    for rounding in ("nearest", "adaptive"):
        out = work / f"{rounding}.onnx"
        made[rounding] = out, quantize_int8_file(digits_onnx, out, options(rounding=rounding, bias_correction=False, min_sqnr=0))
    out = work / "default.onnx"
    made["default"] = out, quantize_int8_file(digits_onnx, out, options(rounding="adaptive", report_path=work / "report.json"))
    return made


def test_adaptive_is_never_worse_than_nearest_on_the_calibration_images(rounded, digits_onnx):
    recipe = recipe_of(digits_onnx)
    reference = outputs_on_calibration(digits_onnx, recipe)
    nearest, adaptive = (sqnr_db(outputs_on_calibration(rounded[r][0], recipe), reference) for r in ("nearest", "adaptive"))
    report = rounded["adaptive"][1].rounding
    assert report.kept and adaptive == pytest.approx(report.sqnr_after_db, abs=1e-6)
    assert nearest == pytest.approx(report.sqnr_before_db, abs=1e-6) and adaptive > nearest + 3
    for layer in report.layers:  # each layer kept adaptive rounding only where it scored higher
        assert layer.kept == (layer.adaptive_sqnr_db > layer.nearest_sqnr_db)
        assert (layer.node in report.weights) == layer.kept


def test_adaptive_beats_nearest_on_held_out_images_and_keeps_top1(rounded, digits_onnx):
    recipe = recipe_of(digits_onnx)
    fp32 = logits_on_heldout(digits_onnx, recipe)
    labels = heldout_labels(recipe)
    scores = {name: sqnr_db(logits_on_heldout(path, recipe), fp32) for name, (path, _) in rounded.items()}
    assert scores["adaptive"] > scores["nearest"] + 3
    assert scores["default"] >= 33.7  # the anchor: AIMET's CLE + AdaRound on this graph
    top1 = {name: float((logits_on_heldout(path, recipe).argmax(1) == labels).mean() * 100) for name, (path, _) in rounded.items()}
    assert top1["default"] >= float((fp32.argmax(1) == labels).mean() * 100) - 0.5


def test_weights_stay_on_the_grid_tensorrt_reads(rounded):
    nearest, adaptive = (weight_arrays(onnx.load(rounded[r][0])) for r in ("nearest", "adaptive"))
    changed = 0
    for node, (values, scale, zero) in adaptive.items():
        assert values.dtype == np.int8 and np.abs(values.astype(np.int16)).max() <= 127 and not zero.any()
        assert np.array_equal(scale, nearest[node][1])  # the quantizer's scales, per output channel
        changed += int((values != nearest[node][0]).sum())
    assert changed > 0
    model = onnx.load(rounded["adaptive"][0])
    assert read_metadata(model)["rounding"] == "adaptive"
    assert all(next(a.i for a in n.attribute if a.name == "axis") == 0
               for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0].endswith("_quantized"))


def test_tensorrt_rtx_builds_the_adaptively_rounded_graph(rounded):
    engine, _ = compile_onnx(rounded["default"][0], load_library("tensorrt-rtx"))
    assert len(engine) > 100_000


def test_report_has_both_roundings_per_layer(rounded):
    report = json.loads((rounded["default"][0].parent / "report.json").read_text())
    rows = {row["node"]: row for row in report["layers"]}
    for layer in report["rounding"]["layers"]:
        assert rows[layer["node"]]["nearest_sqnr_db"] == pytest.approx(layer["nearest_sqnr_db"])
        assert rows[layer["node"]]["adaptive_sqnr_db"] == pytest.approx(layer["adaptive_sqnr_db"])
    assert report["rounding"]["kept"] and report["bias_correction"] is not None


def test_both_cpu_classes_round_adaptively_in_their_own_encoding(tmp_path, digits_onnx):
    """The avx2 graph (u8u8 where made on a VNNI CPU) keeps its uint8 encoding, zero point 128. On a
    VNNI CPU, where u8s8 and u8u8 compute alike, its integers are the vnni graph's, value for value."""
    made = {}
    for cpu in ("vnni", "avx2"):
        out = tmp_path / f"{cpu}.onnx"
        report = quantize_int8_file(digits_onnx, out, options(target="onnxruntime", cpu=cpu, rounding="adaptive", min_sqnr=0))
        assert report.rounding.kept and report.rounding.sqnr_after_db > report.rounding.sqnr_before_db + 3
        made[cpu] = weight_arrays(onnx.load(out)), report
    unsigned = set(made["avx2"][1].cpu_format.unsigned)
    for node, (values, scale, zero) in made["avx2"][0].items():
        assert values.dtype == (np.uint8 if node in unsigned else np.int8)
        if HERE == "vnni":
            assert np.array_equal(dequantized(values, scale, zero), dequantized(*made["vnni"][0][node]))


def test_the_guard_falls_back_keeping_the_adaptive_integers_upstream(tmp_path, digits_onnx, rounded):
    """A candidate keeps the adaptive integers of its INT8 layers before the first layer out of INT8;
    those after it were fitted to errors the fallback removed, and are rounded to nearest."""
    out = tmp_path / "guarded.onnx"
    report = quantize_int8_file(digits_onnx, out, options(rounding="adaptive", min_sqnr=50))  # beyond INT8: layers fall back
    out_of_int8 = set(report.fp16_nodes) | set(report.fp32_nodes)
    assert out_of_int8 and report.rounding.kept
    written = weight_arrays(onnx.load(out))
    nearest = weight_arrays(onnx.load(rounded["nearest"][0]))
    order = [layer.node for layer in report.rounding.layers]  # graph order
    first_out = min(order.index(node) for node in out_of_int8)
    checked = 0
    for node in order:
        if node not in written:
            continue
        expected = report.rounding.weights.get(node, nearest[node][0]) if order.index(node) < first_out else nearest[node][0]
        assert np.array_equal(written[node][0], expected), node
        checked += 1
    assert checked == 9 - len(out_of_int8)


def test_unknown_rounding_is_one_line(tmp_path, digits_onnx):
    with pytest.raises(QuantizeError, match="unknown rounding"):
        options(rounding="stochastic")
    code, _, stderr = run("quantize", digits_onnx, "-o", tmp_path / "x.onnx", "--fp16", "--rounding", "nearest")
    assert_one_line_error(code, "", stderr, "--rounding is for --int8")
    assert not (tmp_path / "x.onnx").exists()
    code, stdout, _ = run("quantize", digits_onnx, "-o", tmp_path / "y.onnx", "--int8", "--calib", CALIB, "--rounding", "adaptive")
    assert code == 0 and "rounding: adaptive in" in stdout


def test_a_shared_bias_is_copied_and_a_missing_one_added(tmp_path):
    """The small graph whose two Convs share one bias and whose Gemm has none (tensorrt layout): each
    layer gets a bias of its own, the shared one is left as it was, and the rounded graph beats nearest."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from rvdeploy.onnx_io import save_onnx
    from rvdeploy.precision.int8 import target_options
    from rvdeploy.precision.rounding import adaptive_rounding
    from test_bias_correction import _small_pair

    fp32, _, feeds = _small_pair()
    rng = np.random.default_rng(5)
    feeds = [{"x": (rng.normal(size=(32, 4, 8, 8)) + 0.5).astype(np.float32)} for _ in range(4)]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.left = iter(feeds)

        def get_next(self):
            return next(self.left, None)

    settings = target_options("tensorrt")
    quantize_static(str(save_onnx(fp32, tmp_path / "fp32.onnx")), str(tmp_path / "int8.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=list(settings.op_types), per_channel=True, activation_type=QuantType.QInt8,
                    weight_type=QuantType.QInt8, extra_options=settings.extra_options)
    nearest = onnx.load(tmp_path / "int8.onnx")
    conv2 = next(n for n in nearest.graph.node if n.name == "conv2")
    conv2.input[2] = "b"  # onnxruntime's quantizer gives each its own copy: share it again
    rounded, report = adaptive_rounding(fp32, nearest, feeds, "tensorrt", show_progress=False)
    inits = {i.name: numpy_helper.to_array(i) for i in rounded.graph.initializer}
    node = {n.name: n for n in rounded.graph.node}
    assert np.array_equal(inits["b"], np.full(6, 0.1, np.float32))  # the shared original, untouched
    biased = [name for name in ("conv1", "conv2", "gemm") if name in report.biases]
    assert "gemm" in biased and len(node["gemm"].input) == 3
    for name in biased:
        assert node[name].input[2] != "b" and np.allclose(inits[node[name].input[2]], report.biases[name])
    outputs = lambda m: np.concatenate([onnxruntime.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])  # noqa: E731
                                        .run(None, f)[0] for f in feeds])
    reference = outputs(fp32)
    assert sqnr_db(outputs(rounded), reference) > sqnr_db(outputs(nearest), reference)
