"""FP16 and INT8 graphs: their layout, their accuracy on real data, calibration, the guard, and
NVIDIA's own TensorRT-RTX builder compiling every graph the precision stage produces."""

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import numpy_helper

from rvdeploy.checkpoint import load_train_weights
from rvdeploy.data import labelled_folder
from rvdeploy.engine.build import EngineBuildError, compile_onnx
from rvdeploy.engine.library import load_library
from rvdeploy.eval import evaluate
from rvdeploy.export import ExportOptions, export_onnx
from rvdeploy.onnx_io import read_metadata, write_metadata
from rvdeploy.precision.calib import CalibrationError
from rvdeploy.precision.fp16 import FP16_MAX, convert_fp16
from rvdeploy.precision.fp16_file import Fp16Options, quantize_fp16
from rvdeploy.precision.quantize import Int8Options, quantize_int8_file
from rvdeploy.reparam import fuse
from rvdeploy.runners import OrtRunner

from conftest import DIGITS_CKPT, ROOT
from test_cli import assert_one_line_error, run

CALIB = ROOT / "calib" / "digits"
HELDOUT = ROOT / "models" / "digits" / "heldout"


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("precision")


@pytest.fixture(scope="module")
def fp32(work) -> Path:
    return export_onnx(fuse(load_train_weights(DIGITS_CKPT))[0], work / "fp32.onnx", ExportOptions())


def top1(path) -> float:
    with OrtRunner(path) as runner:
        return evaluate(runner, labelled_folder(HELDOUT, runner.preprocess)).top1


def logits(path, batch) -> np.ndarray:
    with OrtRunner(path) as runner:
        return runner.infer(batch)


@pytest.fixture(scope="module")
def probe(fp32) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((6, 3, 32, 32), dtype=np.float32)


@pytest.fixture(scope="module")
def int8_trt(work, fp32) -> Path:
    quantize_int8_file(fp32, work / "int8_trt.onnx", Int8Options(CALIB, target="tensorrt", show_progress=False))
    return work / "int8_trt.onnx"


@pytest.fixture(scope="module")
def int8_ort(work, fp32) -> Path:
    quantize_int8_file(fp32, work / "int8_ort.onnx", Int8Options(CALIB, target="onnxruntime", show_progress=False))
    return work / "int8_ort.onnx"


@pytest.fixture(scope="module")
def builder():
    return load_library("tensorrt-rtx")


# -- FP16 ------------------------------------------------------------------------------------
def test_fp16_graph_is_typed_and_keeps_accuracy(work, fp32, probe):
    out = work / "fp16.onnx"
    report = quantize_fp16(fp32, out)
    model = onnx.load(out)
    assert report.kept_fp32 == [] and report.observed_on == "random probes" and report.floor.steps == []
    assert {init.data_type for init in model.graph.initializer} == {onnx.TensorProto.FLOAT16}
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert [n.op_type for n in model.graph.node].count("Cast") == 2
    meta = read_metadata(model)
    assert meta["precision"] == "fp16" and meta["num_classes"] == 10  # the export's metadata travels on
    reference = logits(fp32, probe)
    assert np.abs(logits(out, probe) - reference).max() <= 1e-2 * np.abs(reference).max()
    assert abs(top1(out) - top1(fp32)) <= 0.1


def test_fp16_io(work, fp32, probe):
    out = work / "fp16_io.onnx"
    quantize_fp16(fp32, out, Fp16Options(io_fp16=True, calib_dir=CALIB))
    model = onnx.load(out)
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert "Cast" not in {n.op_type for n in model.graph.node}
    reference = logits(fp32, probe)
    assert np.abs(logits(out, probe) - reference).max() <= 1e-2 * np.abs(reference).max()


def _rescaled(model: onnx.ModelProto, layer: int, scale: float) -> onnx.ModelProto:
    """The same function with layer ``layer``'s output multiplied by ``scale`` and the next layer's
    weights divided by it (ReLU is positively homogeneous): FP32 outputs are unchanged."""
    graph = gs.import_onnx(model)
    convs = [n for n in graph.nodes if n.op == "Conv"]
    w, b = convs[layer].inputs[1], convs[layer].inputs[2]
    w.values, b.values = w.values * scale, b.values * scale
    convs[layer + 1].inputs[1].values = convs[layer + 1].inputs[1].values / scale
    out = gs.export_onnx(graph)
    out.ir_version = model.ir_version
    out.metadata_props.extend(model.metadata_props)
    return out


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # the naive conversion below overflows on purpose
def test_fp16_keeps_out_of_range_layers_in_fp32(work, fp32, probe):
    big = work / "big.onnx"
    onnx.save(_rescaled(onnx.load(fp32), layer=3, scale=1e5), big)
    reference = logits(fp32, probe)
    assert np.abs(logits(big, probe) - reference).max() <= 1e-4 * np.abs(reference).max()
    out = work / "big_fp16.onnx"
    report = quantize_fp16(big, out, Fp16Options(calib_dir=CALIB))
    kept = {k.node for k in report.kept_fp32}
    assert {"/stage2/stage2.0/rbr_reparam/Conv", "/stage2/stage2.0/nonlinearity/Relu", "/stage2/stage2.1/rbr_reparam/Conv"} <= kept
    assert any("reaches" in k.reason and float(k.reason.rsplit(" ", 1)[1]) > FP16_MAX for k in report.kept_fp32)
    assert np.abs(logits(out, probe) - reference).max() <= 1e-2 * np.abs(reference).max()
    # Without the fallback FP16 overflows: the check is what keeps the output right.
    naive = work / "naive_fp16.onnx"
    onnx.save(convert_fp16(onnx.load(big)), naive)
    broken = logits(naive, probe)
    assert not np.isfinite(broken).all() or np.abs(broken - reference).max() > 0.5 * np.abs(reference).max()


# -- INT8 ------------------------------------------------------------------------------------
def _initializers(model):
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def test_int8_tensorrt_layout_follows_tensorrt_rules(int8_trt):
    model = onnx.load(int8_trt)
    assert model.opset_import[0].version >= 13
    inits = _initializers(model)
    consumers = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    producers = {o: n for n in model.graph.node for o in n.output}
    quantize = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    dequantize = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert quantize and dequantize
    for node in quantize + dequantize:
        zero_point = inits[node.input[2]]
        assert zero_point.dtype == np.int8 and not zero_point.any(), node.name  # symmetric int8
        assert all(c.op_type in ("Conv", "Gemm", "DequantizeLinear") for c in consumers[node.output[0]])
    for node in dequantize:
        assert inits.get(node.input[0], np.zeros(1, np.int8)).dtype != np.int32, "no int32 bias"
        scale = inits[node.input[1]]
        if node.input[0] in inits:  # a weight: per-channel on the output-channel axis
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            assert axis == 0 and scale.shape == (inits[node.input[0]].shape[0],), node.name
        else:  # an activation: per-tensor
            assert scale.shape == (), node.name
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm"):
            assert producers[node.input[1]].op_type == "DequantizeLinear"  # weight quantized
            assert producers[node.input[0]].op_type == "DequantizeLinear"  # activation quantized
            assert node.input[2] in inits and inits[node.input[2]].dtype == np.float32  # bias stays float
            assert all(c.op_type != "QuantizeLinear" for c in consumers.get(node.output[0], []))  # no output Q/DQ
    assert read_metadata(model)["int8_target"] == "tensorrt"


def test_int8_onnxruntime_layout_is_uint8_activations_int8_weights(int8_ort):
    """int8 weights, but uint8 (zero point 128) in the layers this CPU class runs u8u8 (test_cpu_class.py)."""
    model = onnx.load(int8_ort)
    inits = _initializers(model)
    activation_zero_points = {inits[n.input[2]].dtype for n in model.graph.node if n.op_type == "QuantizeLinear"}
    weight_dq = {n.output[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits}
    weight_types = {n.name: inits[weight_dq[n.input[1]].input[0]].dtype for n in model.graph.node if n.op_type in ("Conv", "Gemm")}
    assert activation_zero_points == {np.dtype(np.uint8)}
    unsigned = set(read_metadata(model)["u8u8_layers"])
    assert len(unsigned) < len(weight_types)
    assert weight_types == {node: np.dtype(np.uint8 if node in unsigned else np.int8) for node in weight_types}


def test_int8_accuracy_on_the_heldout_split(fp32, int8_trt, int8_ort):
    reference = top1(fp32)
    assert reference >= 99.0
    assert reference - top1(int8_trt) <= 0.5
    assert reference - top1(int8_ort) <= 0.5


def test_calibration_cache_hits_and_misses(work, fp32):
    cache = work / "calib-cache.json"
    first = quantize_int8_file(fp32, work / "c1.onnx", Int8Options(CALIB, method="minmax", equalize=True, cache_path=cache, show_progress=False))
    second = quantize_int8_file(fp32, work / "c2.onnx", Int8Options(CALIB, method="minmax", equalize=True, cache_path=cache, show_progress=False))
    assert (first.from_cache, second.from_cache) == (False, True)
    assert (work / "c1.onnx").read_bytes() == (work / "c2.onnx").read_bytes()
    other = quantize_int8_file(fp32, work / "c3.onnx", Int8Options(CALIB, method="percentile", equalize=True, cache_path=cache, show_progress=False))
    assert not other.from_cache
    fewer = quantize_int8_file(fp32, work / "c4.onnx", Int8Options(CALIB, method="minmax", num_images=64, equalize=True, cache_path=cache, show_progress=False))
    # the default floor holds a quarter out to judge on: fitted on 48, judged on 16
    assert not fewer.from_cache and (fewer.calibration_images, fewer.held_out_images) == (48, 16)
    entries = json.loads(cache.read_text())["entries"]
    assert len(entries) == 3
    from rvdeploy.files import sha256_file
    # Keyed by the graph calibrated: the equalized one (asked for), not the file given.
    assert len({key.split(":")[0] for key in entries}) == 1 and not any(key.startswith(sha256_file(fp32)) for key in entries)
    cache.write_text("{not json")
    with pytest.raises(CalibrationError, match="is not readable JSON"):
        quantize_int8_file(fp32, work / "c5.onnx", Int8Options(CALIB, cache_path=cache, show_progress=False))


@pytest.fixture(scope="module")
def outlier_model(work, fp32) -> Path:
    """The digits net with one channel of layer 4 scaled by 400 and layer 5 compensating: the same
    FP32 function, but per-tensor INT8 of layer 5's input crushes every other channel."""
    model = onnx.load(fp32)
    graph = gs.import_onnx(model)
    convs = [n for n in graph.nodes if n.op == "Conv"]
    w, b, nxt = convs[4].inputs[1], convs[4].inputs[2], convs[5].inputs[1]
    w.values[0] *= 400.0
    b.values[0] *= 400.0
    nxt.values[:, 0] /= 400.0
    out = gs.export_onnx(graph)
    out.ir_version = model.ir_version
    out.metadata_props.extend(model.metadata_props)
    path = work / "outlier.onnx"
    onnx.save(out, path)
    return path


def test_accuracy_guard_falls_back_the_sensitive_layer(work, fp32, outlier_model):
    # Without equalization (which would undo the outlier: tests/test_int8_guard.py), only the guard helps.
    assert abs(top1(outlier_model) - top1(fp32)) < 1e-9
    plain = quantize_int8_file(outlier_model, work / "outlier_int8.onnx",
                               Int8Options(CALIB, equalize=False, min_sqnr=0, show_progress=False))  # no default floor
    assert plain.fp32_nodes == [] and plain.fp16_nodes == []
    drop_unguarded = top1(fp32) - top1(work / "outlier_int8.onnx")
    assert drop_unguarded > 1.0
    guarded = quantize_int8_file(outlier_model, work / "guarded.onnx",
                                 Int8Options(CALIB, equalize=False, val_dir=HELDOUT, max_top1_drop=0.5, min_sqnr=0,
                                             show_progress=False))  # the labelled guard alone: calibrated as ``plain``
    report = guarded.guard
    assert report.met and report.fp32_top1 - report.final_top1 <= 0.5
    assert report.int8_top1 == pytest.approx(top1(fp32) - drop_unguarded)
    assert report.fallback[0] == "/stage3/stage3.0/rbr_reparam/Conv"  # the layer reading the outlier channel
    assert len(guarded.layers) == 9 and all(row.sqnr_db is not None for row in guarded.layers)
    assert set(guarded.fp16_nodes) == set(report.fallback) and len(report.fallback) < 9  # TensorRT runs them in FP16
    model = onnx.load(work / "guarded.onnx")
    assert read_metadata(model)["fp16_nodes"] == guarded.fp16_nodes
    assert top1(fp32) - top1(work / "guarded.onnx") <= 0.5


# -- TensorRT-RTX compiles every graph the stage produces ------------------------------------
@pytest.mark.parametrize("graph", ["fp32", "fp16", "int8_trt", "guarded"])
def test_tensorrt_rtx_builds_every_produced_graph(work, builder, request, graph):
    if graph in ("fp32", "int8_trt"):
        path = request.getfixturevalue(graph)
    else:
        request.getfixturevalue("fp32")
        if graph == "guarded":
            request.getfixturevalue("outlier_model")
            if not (work / "guarded.onnx").exists():
                quantize_int8_file(work / "outlier.onnx", work / "guarded.onnx",
                                   Int8Options(CALIB, equalize=False, val_dir=HELDOUT, max_top1_drop=0.5, min_sqnr=0,
                                             show_progress=False))  # the labelled guard alone: calibrated as ``plain``
        elif not (work / "fp16.onnx").exists():
            quantize_fp16(work / "fp32.onnx", work / "fp16.onnx")
        path = work / f"{graph}.onnx"
    engine, profiles = compile_onnx(path, builder)
    assert len(engine) > 100_000 and profiles[0]["max"][0] == 32


def test_tensorrt_rtx_rejects_the_cpu_layout_naming_the_node(builder, int8_ort):
    with pytest.raises(EngineBuildError, match=r"tensorrt-rtx cannot parse .*node input_QuantizeLinear \(QuantizeLinear\): .*zero point"):
        compile_onnx(int8_ort, builder)


# -- bad input -------------------------------------------------------------------------------
def test_quantize_bad_inputs(work, fp32, tmp_path):
    out = tmp_path / "q.onnx"
    assert_one_line_error(*run("quantize", fp32, "--int8", "-o", out), r"--int8 needs calibration images: --calib DIR")
    assert_one_line_error(*run("quantize", fp32, "-o", out), r"choose --fp16 or --int8")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(*run("quantize", fp32, "--int8", "--calib", tmp_path / "empty", "-o", out), r"holds no JPEG or PNG images")
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "notes.txt").write_text("no images here")
    assert_one_line_error(*run("quantize", fp32, "--int8", "--calib", tmp_path / "text", "-o", out), r"holds no JPEG or PNG images")
    assert_one_line_error(*run("quantize", fp32, "--int8", "--calib", tmp_path / "nowhere", "-o", out), r"nowhere: no such directory")
    (tmp_path / "broken").mkdir()
    for i in range(3):
        (tmp_path / "broken" / f"{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    assert_one_line_error(*run("quantize", fp32, "--int8", "--calib", tmp_path / "broken", "-o", out),
                          r"none of the 3 calibration images could be read")
    assert not out.exists()


def test_corrupt_images_are_skipped_and_counted(work, fp32, tmp_path):
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for source in sorted(CALIB.glob("*.png"))[:20]:
        (mixed / source.name).write_bytes(source.read_bytes())
    (mixed / "bad.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    report = quantize_int8_file(fp32, tmp_path / "q.onnx", Int8Options(mixed, show_progress=False))
    assert (report.calibration_images, report.held_out_images, report.skipped_images) == (15, 5, 1)


def test_images_smaller_than_the_input_are_refused(tmp_path, small_spec, small_state):
    from rvdeploy.weights import TrainWeights

    deploy, _ = fuse(TrainWeights(small_spec, small_state))
    model = export_onnx(deploy, tmp_path / "m.onnx", ExportOptions(input_size=(64, 64)))  # ImageNet recipe, no upscale
    out = tmp_path / "q.onnx"
    assert_one_line_error(*run("quantize", model, "--int8", "--calib", CALIB, "-o", out),
                          r"256 of 256 calibration images are smaller than the 64x64 model input .*8x8.*--allow-upscale")
    code, _, stderr = run("quantize", model, "--int8", "--calib", CALIB, "--allow-upscale", "--json", "-o", out)
    assert code == 0, stderr


def test_graph_without_metadata_needs_a_recipe(fp32, tmp_path):
    bare = onnx.load(fp32)
    del bare.metadata_props[:]
    onnx.save(bare, tmp_path / "bare.onnx")
    out = tmp_path / "q.onnx"
    assert_one_line_error(*run("quantize", tmp_path / "bare.onnx", "--int8", "--calib", CALIB, "-o", out),
                          r"not an rvdeploy export \(no preprocessing metadata\): give --mean, --std and --input-size")
    code, stdout, stderr = run("quantize", tmp_path / "bare.onnx", "--int8", "--calib", CALIB, "-o", out, "--json",
                               "--mean", "0.3,0.3,0.3", "--std", "0.32,0.32,0.32", "--input-size", "32", "--allow-upscale")
    assert code == 0, stderr
    assert (json.loads(stdout)["calibration_images"], json.loads(stdout)["held_out_images"]) == (224, 32)
    assert_one_line_error(*run("quantize", tmp_path / "bare.onnx", "--fp16", "-o", out, "--mean", "0.3,0.3"),
                          r"must be three numbers")


@pytest.mark.parametrize("command", ["quantize", "build-engine", "eval"])
def test_every_image_reading_command_takes_the_same_recipe_options(fp32, tmp_path, command):
    bare = onnx.load(fp32)
    del bare.metadata_props[:]
    onnx.save(bare, tmp_path / "bare.onnx")
    args = {
        "quantize": ["quantize", tmp_path / "bare.onnx", "--int8", "--calib", CALIB, "--num-images", "32", "-o", tmp_path / "q.onnx"],
        "build-engine": ["build-engine", tmp_path / "bare.onnx", "--int8", "--calib", CALIB, "--num-images", "32",
                         "--backend", "rtx", "-o", tmp_path / "q.engine"],
        "eval": ["eval", tmp_path / "bare.onnx", "--data", HELDOUT],
    }[command]
    assert_one_line_error(*run(*args), r"give --mean, --std and --input-size")
    recipe = ["--mean", "0.30566,0.30566,0.30566", "--std", "0.32352,0.32352,0.32352", "--input-size", "32", "--resize", "32",
              "--allow-upscale"]
    code, stdout, stderr = run(*args, *recipe, "--json")
    assert code == 0, stderr
    result = json.loads(stdout)
    if command == "eval":
        assert result["results"][0]["top1"] > 99
    elif command == "build-engine":
        assert result["precision"] == "int8" and (tmp_path / "q.engine").stat().st_size == result["engine_bytes"]
    else:
        assert (result["calibration_images"], result["held_out_images"]) == (24, 8)


def test_quantizing_a_quantized_graph_is_refused(int8_trt, tmp_path):
    assert_one_line_error(*run("quantize", int8_trt, "--fp16", "-o", tmp_path / "x.onnx"),
                          r"already a int8 graph: quantize its FP32 export instead")


def test_metadata_round_trip_keeps_other_entries(fp32):
    model = onnx.load(fp32)
    model.metadata_props.add(key="someone.else", value="kept")
    write_metadata(model, {"precision": "fp16"})
    props = {p.key: p.value for p in model.metadata_props}
    assert props["someone.else"] == "kept" and read_metadata(model)["precision"] == "fp16"


# -- eval ------------------------------------------------------------------------------------
def test_eval_compares_models_side_by_side(fp32, int8_trt):
    code, stdout, stderr = run("eval", DIGITS_CKPT, fp32, int8_trt, "--data", HELDOUT, "--json")
    assert code == 0, stderr
    results = json.loads(stdout)["results"]
    assert [r["backend"] for r in results] == ["torch", "onnxruntime", "onnxruntime"]
    assert [r["precision"] for r in results] == ["fp32", "fp32", "int8/tensorrt"]
    assert results[0]["top1"] == pytest.approx(results[1]["top1"])  # fold + export keep every prediction
    assert all(r["images"] == 360 and r["top5"] is not None for r in results)
    code, stdout, _ = run("eval", fp32, int8_trt, "--data", HELDOUT)
    assert code == 0 and "Δ top-1" in stdout and "+0.00" in stdout


def test_eval_compare_measures_agreement_with_the_first_model(fp32, int8_trt, tmp_path):
    code, stdout, stderr = run("eval", "--compare", DIGITS_CKPT, fp32, int8_trt, "--data", HELDOUT, "--json")
    assert code == 0, stderr
    results = json.loads(stdout)["results"]
    assert results[0]["vs_first"] is None
    folded, int8 = results[1]["vs_first"], results[2]["vs_first"]
    # The fold and export change rounding only; INT8 changes the logits measurably but few decisions.
    assert folded["top1_agreement"] == 1.0 and folded["max_rel_error"] < 1e-5 and folded["sqnr_db"] > 90
    assert 0.97 <= int8["top1_agreement"] <= 1.0 and 10 < int8["sqnr_db"] < folded["sqnr_db"]
    code, stdout, _ = run("eval", "--compare", fp32, int8_trt, "--data", HELDOUT)
    assert code == 0 and "agrees with first %" in stdout and "(reference)" in stdout
    assert "agrees" not in run("eval", fp32, int8_trt, "--data", HELDOUT)[1]
    assert_one_line_error(*run("eval", "--compare", fp32, "--data", HELDOUT), r"--compare needs two or more models")


def test_eval_bad_inputs(fp32, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes((CALIB / "0011.png").read_bytes())
    assert_one_line_error(*run("eval", fp32, "--data", tmp_path), r"the data has 1 class folders, fp32.onnx has 10 classes")
    assert_one_line_error(*run("eval", tmp_path / "m.onnx", "--data", HELDOUT), r"m\.onnx: no such file")
    assert_one_line_error(*run("eval", fp32, "--data", tmp_path / "a" / "x.png"), r"is not a directory")
