"""The runner life cycle: one registry by artifact kind, acquire on entry, release on exit."""

import numpy as np
import pytest
import torch

from rvdeploy.backends import BackendError, backend_for, canonical_backend
from rvdeploy.compare import compare_outputs
from rvdeploy.checkpoint import load_weights
from rvdeploy.runners import OrtRunner, RunnerError, TensorRTRunner, TorchRunner, open_runner

from conftest import DIGITS_CKPT


def test_one_vocabulary_with_aliases():
    assert [canonical_backend(n) for n in ("ort", "trt", "rtx", "torch", "onnxruntime")] == [
        "onnxruntime", "tensorrt", "tensorrt-rtx", "torch", "onnxruntime"]
    with pytest.raises(BackendError, match=r"unknown backend 'tflite'"):
        canonical_backend("tflite")
    assert [backend_for(p) for p in ("a.pth", "a.safetensors", "a.onnx", "a.engine", "a.plan")] == [
        "torch", "torch", "onnxruntime", "tensorrt", "tensorrt"]
    assert backend_for("a.engine", "rtx") == "tensorrt-rtx"
    with pytest.raises(BackendError, match=r"backend onnxruntime needs an \.onnx graph, got a\.pth"):
        backend_for("a.pth", "ort")


def test_the_artifact_kind_picks_the_runner(tmp_path, digits_onnx):
    engine = tmp_path / "x.engine"
    engine.write_bytes(b"not built")
    kinds = {DIGITS_CKPT: TorchRunner, digits_onnx: OrtRunner, engine: TensorRTRunner}
    for path, kind in kinds.items():
        assert type(open_runner(path)) is kind
    with pytest.raises(RunnerError, match=r"none\.onnx: no such file"):
        open_runner(tmp_path / "none.onnx")


@pytest.mark.parametrize("source", ["checkpoint", "onnx"])
def test_acquire_on_entry_release_on_exit(digits_onnx, source):
    runner = open_runner(DIGITS_CKPT if source == "checkpoint" else digits_onnx)
    x = np.zeros((2, 3, 32, 32), np.float32)
    assert not runner.active
    with pytest.raises(RunnerError, match=r"not active"):
        runner.infer(x)
    with runner as active:
        assert active is runner and runner.active and runner.preprocess.input_size == (32, 32)
        assert runner.infer(x).shape == (2, 10)
        assert runner.timed(x)() is None
        held = runner.model if source == "checkpoint" else runner.session
        assert held is not None
    assert not runner.active
    assert (runner.model if source == "checkpoint" else runner.session) is None
    with pytest.raises(RunnerError, match=r"not active"):
        runner.infer(x)


def test_every_runner_computes_the_same_function(digits_onnx):
    x = np.random.default_rng(0).standard_normal((4, 3, 32, 32), dtype=np.float32)
    weights = load_weights(DIGITS_CKPT)
    with torch.inference_mode():
        reference64 = weights.to_module(torch.float64)(torch.from_numpy(x).double()).numpy()
    with open_runner(DIGITS_CKPT) as multi, open_runner(digits_onnx) as onnx:
        reference32 = multi.infer(x)
        assert compare_outputs(onnx.infer(x), reference64, reference32).passed
        assert multi.form == "multi-branch" and onnx.form == "fused"
        assert (multi.label, onnx.label) == ("repvgg_digits_train", "digits")  # a custom net is named by its file


@pytest.mark.gpu
def test_torch_runner_on_cuda_matches_the_cpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU here")
    x = np.random.default_rng(0).standard_normal((8, 3, 32, 32), dtype=np.float32)
    with open_runner(DIGITS_CKPT) as cpu, open_runner(DIGITS_CKPT, device="cuda") as gpu:
        expected = cpu.infer(x)
        got = gpu.infer(x)
        gpu.timed(x)()
    # cuDNN picks its own algorithms (TF32 among them on recent GPUs): 1e-3 relative.
    assert np.abs(got - expected).max() <= 1e-3 * np.abs(expected).max()


@pytest.mark.gpu
def test_bench_on_cuda_times_gpu_compute_apart():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU here")
    from rvdeploy.bench import BenchSettings, bench_target

    report = bench_target(DIGITS_CKPT, "torch", BenchSettings(batches=(2,), warmup_s=0, min_s=0.05, iters=3, device="cuda"))
    assert [r["backend"] for r in report["results"]] == ["torch-cuda", "torch-cuda"]
    for row in report["results"]:
        assert 0 < row["gpu_compute_ms"]["p50"] and row["latency_ms"]["p50"] > 0
    assert report["checks"][0]["passed"]
