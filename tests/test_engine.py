"""TensorRT engines: real builds with TensorRT-RTX on the CPU; running them under the gpu marker."""

import json
import sys

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from rvdeploy.arch import zoo_spec
from rvdeploy.data import labelled_folder
from rvdeploy.engine.build import BuildSettings, build_engine
from rvdeploy.engine.library import LibraryError, load_library
from rvdeploy.engine.sidecar import EngineFileError, check_engine, sidecar_path
from rvdeploy.eval import evaluate
from rvdeploy.export import ExportOptions, export_onnx
from rvdeploy.reparam import fuse
from rvdeploy.runners import OrtRunner, RunnerError, open_runner
from rvdeploy.synthetic import trained_like_state_dict
from rvdeploy.weights import TrainWeights

from conftest import ROOT
from test_cli import assert_one_line_error, run

CALIB = ROOT / "calib" / "digits"
HELDOUT = ROOT / "models" / "digits" / "heldout"


@pytest.fixture(scope="module")
def zoo_graphs(tmp_path_factory):
    """A0 and B1g2 (groups) at a small input, as FP32 ONNX graphs."""
    folder = tmp_path_factory.mktemp("zoo")
    paths = {}
    for name in ("RepVGG-A0", "RepVGG-B1g2"):
        spec = zoo_spec(name, num_classes=10)
        deploy, _ = fuse(TrainWeights(spec, trained_like_state_dict(spec)))
        paths[name] = export_onnx(deploy, folder / f"{name}.onnx", ExportOptions(input_size=(32, 32)))
    return paths


@pytest.mark.parametrize("name", ["RepVGG-A0", "RepVGG-B1g2"])
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_builds_every_precision_with_tensorrt_rtx(tmp_path, zoo_graphs, name, precision):
    engine = tmp_path / f"{name}-{precision}.engine"
    # The all-INT8 graph (--min-sqnr 0): these synthetic nets at 32 px reach 12 dB, and the floor's fallback (most of
    # B1g2 to FP16, minutes) is not what this test builds; tests/test_bias_correction.py builds a guarded graph.
    extra = {"fp32": [], "fp16": ["--fp16"],
             "int8": ["--int8", "--calib", CALIB, "--allow-upscale", "--num-images", "64", "--min-sqnr", "0"]}
    code, stdout, stderr = run("build-engine", zoo_graphs[name], "-o", engine, "--backend", "tensorrt-rtx", "--json", *extra[precision])
    assert code == 0, stderr
    side = json.loads(stdout)
    assert side["precision"] == precision and not side["skipped"]
    assert engine.stat().st_size == side["engine_bytes"] > 100_000
    assert side == {**json.loads(sidecar_path(engine).read_text()), "skipped": False}
    if precision != "fp32":
        typed = onnx.load(engine.with_suffix(".onnx"))  # the typed graph is kept next to the engine
        assert {p.key: p.value for p in typed.metadata_props}["rvdeploy.precision"] == json.dumps(precision)


def test_sidecar_records_the_build(tmp_path, zoo_graphs):
    from rvdeploy.files import sha256_file

    engine = tmp_path / "a0.engine"
    settings = BuildSettings(min_batch=2, opt_batch=4, max_batch=16, workspace_mb=256, opt_level=3)
    side = build_engine(zoo_graphs["RepVGG-A0"], engine, "tensorrt-rtx", settings).sidecar
    assert side["backend"] == "tensorrt-rtx" and side["library_version"] == load_library("tensorrt-rtx").version
    assert side["request"]["onnx_sha256"] == sha256_file(zoo_graphs["RepVGG-A0"])
    assert side["engine_sha256"] == sha256_file(engine)
    assert side["profiles"] == [{"input": "input", "min": [2, 3, 32, 32], "opt": [4, 3, 32, 32], "max": [16, 3, 32, 32]}]
    assert side["request"]["builder"] == {"strongly_typed": True, "tf32": False, "workspace_mb": 256, "opt_level": 3, "timing_cache": None}
    assert side["gpu"] is None and side["ahead_of_time"] is True  # no GPU on this machine
    assert side["build_seconds"] > 0 and side["built_at"]
    assert side["model_metadata"]["num_classes"] == 10 and side["precision"] == "fp32"


def test_identical_rebuild_is_skipped_unless_something_changed(tmp_path, zoo_graphs):
    engine = tmp_path / "m.engine"
    onnx_path = zoo_graphs["RepVGG-A0"]
    first = build_engine(onnx_path, engine, "tensorrt-rtx")
    assert not first.skipped
    assert build_engine(onnx_path, engine, "tensorrt-rtx").skipped
    assert not build_engine(onnx_path, engine, "tensorrt-rtx", force=True).skipped
    assert not build_engine(onnx_path, engine, "tensorrt-rtx", BuildSettings(max_batch=64)).skipped
    assert build_engine(onnx_path, engine, "tensorrt-rtx", BuildSettings(max_batch=64)).skipped
    assert not build_engine(zoo_graphs["RepVGG-B1g2"], engine, "tensorrt-rtx", BuildSettings(max_batch=64)).skipped
    engine.write_bytes(b"tampered")
    assert not build_engine(zoo_graphs["RepVGG-B1g2"], engine, "tensorrt-rtx", BuildSettings(max_batch=64)).skipped
    code, stdout, _ = run("build-engine", zoo_graphs["RepVGG-B1g2"], "-o", engine, "--max-batch", "64")
    assert code == 0 and "is up to date" in stdout


def test_parser_errors_name_the_node(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Relu", ["input"], ["r"], name="first_relu"),
         helper.make_node("Mystery", ["r"], ["out"], name="the_unknown_op", domain="com.example")],
        "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [-1, 3, 8, 8])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [-1, 3, 8, 8])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "odd.onnx")
    assert_one_line_error(*run("build-engine", tmp_path / "odd.onnx", "-o", tmp_path / "odd.engine"),
                          r"tensorrt-rtx cannot parse .*odd\.onnx: node the_unknown_op \(Mystery\)")
    assert not (tmp_path / "odd.engine").exists()


def test_no_backend_installed_says_what_to_install(tmp_path, zoo_graphs, monkeypatch):
    # An import guard: both libraries fail to import, as on a machine without them.
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setitem(sys.modules, "tensorrt_rtx", None)
    with pytest.raises(LibraryError, match=r"no TensorRT builder is installed \(tensorrt or tensorrt-rtx\): pip install 'rvdeploy\[gpu\]'.*pip install tensorrt-rtx-cu13"):
        load_library("auto")
    assert_one_line_error(*run("build-engine", zoo_graphs["RepVGG-A0"], "-o", tmp_path / "x.engine", "--backend", "tensorrt"),
                          r"no TensorRT builder is installed \(tensorrt\): pip install 'rvdeploy\[gpu\]'")


@pytest.mark.parametrize("args, pattern", [
    (["--min-batch", "8", "--opt-batch", "4"], r"min <= opt <= max, got min 8, opt 4"),
    (["--opt-batch", "64", "--max-batch", "32"], r"min <= opt <= max, got min 1, opt 64, max 32"),
    (["--min-batch", "0"], r"batch sizes must be positive"),
    (["--workspace", "0"], r"--workspace must be a positive number of MB, got 0"),
    (["--workspace", "-5"], r"--workspace must be a positive number of MB, got -5"),
    (["--workspace", "lots"], r"Invalid value for '--workspace'"),
    (["--opt-level", "9"], r"optimisation level must be 0 to 5"),
    (["--int8"], r"--int8 needs calibration images"),
    (["--backend", "cuda"], r"Invalid value for '--backend'"),
])
def test_build_engine_bad_options(tmp_path, zoo_graphs, args, pattern):
    assert_one_line_error(*run("build-engine", zoo_graphs["RepVGG-A0"], "-o", tmp_path / "x.engine", *args), pattern)
    assert not (tmp_path / "x.engine").exists()


def test_build_engine_bad_inputs(tmp_path):
    assert_one_line_error(*run("build-engine", tmp_path / "none.onnx", "-o", tmp_path / "x.engine"), r"none\.onnx: no such file")
    (tmp_path / "text.onnx").write_text("hello")
    assert_one_line_error(*run("build-engine", tmp_path / "text.onnx", "-o", tmp_path / "x.engine"), r"is not an ONNX model")
    deploy, _ = fuse(TrainWeights(zoo_spec("A0", num_classes=3), trained_like_state_dict(zoo_spec("A0", num_classes=3))))
    fixed = export_onnx(deploy, tmp_path / "b4.onnx", ExportOptions(input_size=(32, 32), batch=4))
    assert_one_line_error(*run("build-engine", fixed, "-o", tmp_path / "x.engine", "--max-batch", "8"),
                          r"apply to dynamic-batch graphs; this graph has a fixed batch of 4")
    code, stdout, _ = run("build-engine", fixed, "-o", tmp_path / "b4.engine", "--json")
    assert code == 0 and json.loads(stdout)["profiles"][0]["min"] == [4, 3, 32, 32]


def test_runtime_refuses_missing_or_mismatched_sidecars(tmp_path, zoo_graphs):
    engine = tmp_path / "m.engine"
    build_engine(zoo_graphs["RepVGG-A0"], engine, "tensorrt-rtx")
    side = sidecar_path(engine)
    original = side.read_text()
    assert check_engine(engine)[0]["backend"] == "tensorrt-rtx"

    side.write_text(json.dumps({**json.loads(original), "library_version": "0.0.1"}))
    with pytest.raises(EngineFileError, match=r"built with tensorrt-rtx 0\.0\.1 but .* is installed: rebuild it"):
        check_engine(engine)
    side.write_text(original)
    engine.write_bytes(engine.read_bytes() + b"\0")
    with pytest.raises(EngineFileError, match=r"does not match its sidecar \(sha256 differs\)"):
        check_engine(engine)
    side.unlink()
    assert_one_line_error(*run("eval", engine, "--data", HELDOUT), r"has no readable rvdeploy sidecar \(m\.engine\.json\)")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_running_an_engine_without_a_gpu_is_a_clear_error(tmp_path, zoo_graphs):
    engine = tmp_path / "m.engine"
    build_engine(zoo_graphs["RepVGG-A0"], engine, "tensorrt-rtx")
    assert_one_line_error(*run("eval", engine, "--data", HELDOUT), r"running a TensorRT engine needs a CUDA GPU; none is available here")


# -- on a GPU --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gpu_engines(tmp_path_factory):
    """FP32, FP16 and INT8 engines of the shipped model, built here with the installed backend."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU: engines are built here, but running them needs one")
    try:
        backend = load_library("auto")
    except LibraryError as exc:
        pytest.skip(f"a CUDA GPU but no TensorRT runtime to run engines: {exc}")
    folder = tmp_path_factory.mktemp("gpu")
    fp32 = folder / "digits.onnx"
    code, _, stderr = run("export", ROOT / "models/digits/repvgg_digits_train.pth", "--onnx", fp32)
    assert code == 0, stderr
    engines = {}
    for precision, extra in (("fp32", []), ("fp16", ["--fp16"]), ("int8", ["--int8", "--calib", CALIB])):
        engines[precision] = folder / f"{precision}.engine"
        code, _, stderr = run("build-engine", fp32, "-o", engines[precision], "--backend", backend.name, *extra)
        assert code == 0, stderr
    try:
        with open_runner(engines["fp32"]):
            pass
    except RunnerError as exc:
        pytest.skip(f"this GPU cannot run {backend.name} engines: {exc}")
    return fp32, engines


@pytest.mark.gpu
@pytest.mark.parametrize("precision, tolerance", [("fp32", 1e-4), ("fp16", 1e-2)])
def test_engine_matches_onnxruntime(gpu_engines, precision, tolerance):
    fp32, engines = gpu_engines
    batch = np.random.default_rng(0).standard_normal((8, 3, 32, 32), dtype=np.float32)
    with OrtRunner(fp32) as reference, open_runner(engines[precision]) as engine:
        expected, got = reference.infer(batch), engine.infer(batch)
    assert np.abs(got - expected).max() <= tolerance * np.abs(expected).max()


@pytest.mark.gpu
def test_int8_engine_accuracy(gpu_engines):
    fp32, engines = gpu_engines
    with OrtRunner(fp32) as reference, open_runner(engines["int8"]) as engine:
        images = labelled_folder(HELDOUT, reference.preprocess)
        assert evaluate(reference, images).top1 - evaluate(engine, images).top1 <= 0.5


@pytest.mark.gpu
def test_profile_bounds_are_enforced(gpu_engines):
    _, engines = gpu_engines
    with open_runner(engines["fp32"]) as engine:
        assert engine.infer(np.zeros((32, 3, 32, 32), np.float32)).shape == (32, 10)
        with pytest.raises(RunnerError, match=r"batch 33 is outside the engine's profile \(1 to 32\)"):
            engine.infer(np.zeros((33, 3, 32, 32), np.float32))
