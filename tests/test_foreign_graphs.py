"""Graphs rvdeploy did not write, and multi-output graphs, through bench, verify, build-engine and eval.

The foreign graph emulates timm's folded RepVGG-A0 exported at 64 px by its user: the rvdeploy
A0 folded, exported with torch.onnx.export directly (no rvdeploy metadata, input "x", output "y"),
with a fixed batch of 1, a dynamic batch, and by the torch.export exporter (dynamo=True).
"""

import json
import shutil
import warnings

import numpy as np
import onnx
import pytest
import torch

from rvdeploy.arch import zoo_spec
from rvdeploy.export import ExportOptions, export_onnx
from rvdeploy.reparam import fuse
from rvdeploy.runners import open_runner
from rvdeploy.synthetic import trained_like_state_dict
from rvdeploy.weights import TrainWeights

from conftest import ROOT
from test_cli import assert_one_line_error, run

SIZE = 64
FAST_BENCH = ("--batch", "1,2", "--warmup-s", "0", "--min-s", "0.01", "--iters", "2")
IMAGENET = ("--mean", "0.485,0.456,0.406", "--std", "0.229,0.224,0.225", "--input-size", str(SIZE), "--allow-upscale")


def _torch_export(model: torch.nn.Module, path, batch: int | None, dynamo: bool = False):
    x = torch.zeros(batch or 1, 3, SIZE, SIZE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(model, (x,), path, input_names=["x"], output_names=["y"], dynamo=True,
                              dynamic_shapes=({0: torch.export.Dim("N")},))
        else:
            axes = None if batch else {"x": {0: "N"}, "y": {0: "N"}}
            torch.onnx.export(model, (x,), path, input_names=["x"], output_names=["y"], dynamic_axes=axes, dynamo=False)
    return path


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("foreign")
    spec = zoo_spec("A0", num_classes=2)
    deploy, _ = fuse(TrainWeights(spec, trained_like_state_dict(spec)))
    model = deploy.to_module()
    return {
        "rvdeploy": export_onnx(deploy, folder / "a0.onnx", ExportOptions(input_size=(SIZE, SIZE))),
        "features": export_onnx(deploy, folder / "a0-features.onnx", ExportOptions(input_size=(SIZE, SIZE), features=(1, 2, 3, 4))),
        "static": _torch_export(model, folder / "timm-b1.onnx", batch=1),
        "dynamic": _torch_export(model, folder / "timm.onnx", batch=None),
        "dynamo": _torch_export(model, folder / "timm-dynamo.onnx", batch=None, dynamo=True),
    }


def _bench(tmp_path, graph, *extra):
    out = tmp_path / "bench.json"
    code, stdout, stderr = run("bench", graph, *FAST_BENCH, "--json", out, *extra)
    assert code == 0, stderr
    return json.loads(out.read_text()), stdout


@pytest.mark.parametrize("kind, batches", [("static", [1]), ("dynamic", [1, 2]), ("dynamo", [1, 2])])
def test_bench_takes_the_input_size_from_the_graph(tmp_path, graphs, kind, batches):
    """Was: internal error ... INVALID_ARGUMENT: Got invalid dimensions for input (224 px fed to a 64 px graph)."""
    report, stdout = _bench(tmp_path, graphs[kind])
    assert [r["batch"] for r in report["results"]] == batches
    assert {r["variant"] for r in report["results"]} == {f"unknown@{SIZE}x{SIZE}"}  # another tool's graph says nothing
    assert all(r["latency_ms"]["p50"] > 0 for r in report["results"])
    if kind == "static":
        assert report["skipped_batches"] == [{"model": "timm-b1", "fixed_batch": 1, "batches": [2]}]
        assert "fixed batch of 1: batches 2 skipped" in stdout
    else:
        assert "skipped_batches" not in report


def test_bench_refuses_an_input_size_a_static_graph_does_not_take(tmp_path, graphs):
    assert_one_line_error(*run("bench", graphs["static"], *FAST_BENCH, "--input-size", "224"),
                          r"timm-b1\.onnx takes 64x64 inputs \(fixed in the graph\), not --input-size 224x224")


def test_bench_times_every_output_of_a_backbone(tmp_path, graphs):
    report, _ = _bench(tmp_path, graphs["features"])
    assert [r["batch"] for r in report["results"]] == [1, 2]
    assert report["results"][0]["variant"] == f"fused@{SIZE}x{SIZE}"


def test_runners_give_the_foreign_graphs_logits(graphs):
    x = np.random.default_rng(0).standard_normal((1, 3, SIZE, SIZE), dtype=np.float32)
    outputs = {}
    for kind in ("rvdeploy", "static", "dynamic", "dynamo"):
        with open_runner(graphs[kind]) as runner:
            outputs[kind] = runner.infer(x)
            assert runner.is_classifier and runner.input_chw == (3, SIZE, SIZE)
    for kind in ("static", "dynamic", "dynamo"):
        np.testing.assert_allclose(outputs[kind], outputs["rvdeploy"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["static", "dynamic", "dynamo"])
def test_verify_of_a_folded_foreign_graph_passes_its_lint(graphs, kind):
    code, stdout, stderr = run("verify", graphs[kind])
    assert code == 0, stdout + stderr
    assert "not an rvdeploy export: checker + ONNX Runtime load passed, nothing left to fold" in stdout
    code, stdout, _ = run("verify", graphs[kind], "--json")
    report = json.loads(stdout)
    assert report["foreign"] and report["ok"] and report["foldable_groups"] == 0 and report["conv_layers"] == 22


@pytest.mark.parametrize("kind, batch_range", [("static", [1, 1]), ("dynamo", [1, 32]), ("features", [1, 32])])
def test_build_engine_takes_any_graph_and_lists_every_output(tmp_path, graphs, kind, batch_range):
    engine = tmp_path / f"{kind}.engine"
    code, stdout, stderr = run("build-engine", graphs[kind], "-o", engine, "--backend", "rtx", "--json")
    assert code == 0, stderr
    side = json.loads(stdout)
    profile = side["profiles"][0]
    assert [profile["min"][0], profile["max"][0]] == batch_range and profile["min"][1:] == [3, SIZE, SIZE]
    names = [o["name"] for o in side["outputs"]]
    if kind == "features":
        assert names == ["stage1", "stage2", "stage3", "stage4"]
        assert [o["shape"][1:] for o in side["outputs"]] == [[48, 16, 16], [96, 8, 8], [192, 4, 4], [1280, 2, 2]]
    else:
        assert names == ["y"] and side["inputs"][0]["name"] == "x" and side["precision"] == "fp32"


def test_eval_of_a_foreign_graph_agrees_with_the_rvdeploy_export(tmp_path, graphs):
    data = tmp_path / "val"
    for label in ("0", "1"):  # the emulated A0 has two classes
        (data / label).mkdir(parents=True)
        for image in sorted((ROOT / "models" / "digits" / "heldout" / label).glob("*.png"))[:4]:
            shutil.copy(image, data / label)
    assert_one_line_error(*run("eval", graphs["dynamic"], "--data", data), r"timm\.onnx carries no preprocessing recipe")
    code, stdout, stderr = run("eval", graphs["rvdeploy"], graphs["static"], graphs["dynamic"], graphs["dynamo"],
                               "--data", data, *IMAGENET, "--compare", "--json")
    assert code == 0, stderr
    results = json.loads(stdout)["results"]
    assert all(r["images"] == 8 for r in results)
    assert len({r["top1"] for r in results}) == 1
    assert all(r["vs_first"]["top1_agreement"] == 1.0 and r["vs_first"]["max_rel_error"] < 1e-4 for r in results[1:])


def test_bench_refuses_an_impossible_input_size_in_one_line(tmp_path):
    """Was: internal error: MemoryError (a graph declaring 2^20 x 2^20 pixels)."""
    from onnx import TensorProto, helper, numpy_helper

    side = 2 ** 20
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], "huge",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, side, side])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, side, side])],
                              [numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w")])
    path = tmp_path / "huge.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    assert_one_line_error(*run("bench", path, *FAST_BENCH), r"huge\.onnx: a float32 input of 3x1048576x1048576 at batch \d+ takes .* GiB")
