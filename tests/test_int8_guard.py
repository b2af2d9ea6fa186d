"""INT8 that keeps accuracy: equalization wiring, per-layer sensitivity from one quantization, the
label-free (SQNR) and labelled guards, the fallback precision each target runs, the per-layer report."""

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime
import pytest

from rvdeploy.compare import sqnr_db
from rvdeploy.data import batches, image_folder
from rvdeploy.engine.build import compile_onnx
from rvdeploy.engine.library import load_library
from rvdeploy.onnx_io import read_metadata
from rvdeploy.precision.calib import calibrate
from rvdeploy.precision.int8 import quantize_int8
from rvdeploy.precision.guard import held_out_split
from rvdeploy.precision.layer_report import block_name, build_layer_figure
from rvdeploy.precision.mixed import fallback_graph
from rvdeploy.precision.quantize import Int8Options, quantize_int8_file
from rvdeploy.precision.sensitivity import OutputProbe, layer_sqnr, single_layer_graph
from rvdeploy.preprocess import Preprocess

from conftest import ROOT
from test_cli import assert_one_line_error, run

CALIB = ROOT / "calib" / "digits"
HELDOUT = ROOT / "models" / "digits" / "heldout"
IMAGES = 128
STAGE3_0 = "/stage3/stage3.0/rbr_reparam/Conv"
BLOCKS = ["stage0", "stage1.0", "stage1.1", "stage2.0", "stage2.1", "stage3.0", "stage3.1", "stage4.0", "linear"]


def options(**kwargs) -> Int8Options:
    """Rounded to nearest unless told otherwise: these tests pin what equalization, sensitivity, the
    guards and bias correction do on their own (tests/test_rounding.py covers adaptive rounding, the default)."""
    return Int8Options(CALIB, num_images=IMAGES, show_progress=False, **{"rounding": "nearest", **kwargs})


def recipe_of(path) -> Preprocess:
    return Preprocess.from_dict(read_metadata(onnx.load(path))["preprocess"])


def outputs_on_calibration(path, recipe: Preprocess, held_out: bool = False) -> np.ndarray:
    """Every output of the graph at ``path`` on the calibration images, one row per image (plain ONNX
    Runtime); ``held_out``: on those a floor holds out to judge on (rvdeploy.precision.guard.held_out_split)."""
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    images = image_folder(CALIB, recipe, IMAGES)
    rows = []
    for pixels, _ in batches(held_out_split(images)[1] if held_out else images, recipe, 32):
        rows.append(np.concatenate([o.reshape(len(o), -1) for o in session.run(None, {"input": pixels})], axis=1))
    return np.concatenate(rows)


def top1_on_heldout(model: onnx.ModelProto, recipe: Preprocess) -> float:
    from rvdeploy.data import labelled_folder

    images = labelled_folder(HELDOUT, recipe)
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    hits = []
    for pixels, indices in batches(images, recipe, 64):
        hits += list(session.run(None, {"input": pixels})[0].argmax(1) == np.asarray([images.labels[i] for i in indices]))
    return 100 * float(np.mean(hits))


def with_graph(source: Path, out: Path, edit) -> Path:
    model = onnx.load(source)
    graph = gs.import_onnx(onnx.shape_inference.infer_shapes(model))  # intermediate tensors typed: they may become outputs
    edit(graph)
    graph.cleanup().toposort()
    edited = gs.export_onnx(graph)
    edited.ir_version = model.ir_version
    edited.metadata_props.extend(model.metadata_props)
    onnx.save(edited, out)
    return out


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("int8_guard")


@pytest.fixture(scope="module")
def imbalanced(work, digits_onnx) -> Path:
    """The digits net with one output channel of stage2.1 scaled by 400 and stage3.0 compensating: the
    same FP32 function, but per-tensor INT8 of stage3.0's input crushes its other channels."""
    def edit(graph):
        convs = [n for n in graph.nodes if n.op == "Conv"]
        convs[4].inputs[1].values[0] *= 400.0
        convs[4].inputs[2].values[0] *= 400.0
        convs[5].inputs[1].values[:, 0] /= 400.0
    return with_graph(digits_onnx, work / "imbalanced.onnx", edit)


@pytest.fixture(scope="module")
def builder():
    return load_library("tensorrt-rtx")


# -- sensitivity: one quantization, then graph edits -----------------------------------------
def test_single_layer_graphs_are_edits_of_the_one_quantized_graph(digits_onnx):
    fp32, recipe = onnx.load(digits_onnx), recipe_of(digits_onnx)
    images = image_folder(CALIB, recipe, 64)
    calibration = calibrate(digits_onnx, "key", images, recipe, "minmax", show_progress=False)
    probe = OutputProbe(fp32, images, recipe, digits_onnx)
    quantized = quantize_int8(digits_onnx, calibration, "tensorrt")
    for node in (n.name for n in fp32.graph.node if n.op_type in ("Conv", "Gemm")):
        single = single_layer_graph(fp32, quantized, node)
        readers = {i for n in single.graph.node if n.op_type in ("Conv", "Gemm")
                   for i in n.input if "QuantizeLinear" in i or "single_layer" in i}
        owner = {n.name for n in single.graph.node if set(n.input) & readers}
        assert owner == {node}  # only this layer reads dequantized tensors
        # The same function as quantizing that layer alone with onnxruntime (the old, N-quantizations way).
        alone = quantize_int8(digits_onnx, calibration, "tensorrt", nodes_to_quantize=(node,))
        np.testing.assert_allclose(probe.outputs(single), probe.outputs(alone), rtol=0, atol=1e-5)
    # The CPU layout quantizes outputs too: the single-layer graph requantizes the layer's output.
    cpu = quantize_int8(digits_onnx, calibration, "onnxruntime")
    single = single_layer_graph(fp32, cpu, STAGE3_0)
    conv = next(n for n in single.graph.node if n.name == STAGE3_0)
    assert next(n for n in single.graph.node if conv.output[0] in n.input).op_type == "QuantizeLinear"
    assert 20 < probe.sqnr(single) < 80


def test_sensitivity_costs_one_quantize_static_call(work, digits_onnx, monkeypatch):
    import onnxruntime.quantization as ortq

    calls = []
    original = ortq.quantize_static
    monkeypatch.setattr(ortq, "quantize_static", lambda *a, **k: calls.append(1) or original(*a, **k))
    report = quantize_int8_file(digits_onnx, work / "one.onnx", options(equalize=True, report_path=work / "one.json"))
    assert len(calls) == 1
    assert all(row.sqnr_db is not None and 15 < row.sqnr_db < 80 for row in report.layers)
    assert report.output_sqnr_db < min(row.sqnr_db for row in report.layers)  # all layers together are noisier
    # Sensitivity itself quantizes nothing: it edits the quantized graph it is given.
    fp32, recipe = onnx.load(digits_onnx), recipe_of(digits_onnx)
    images = image_folder(CALIB, recipe, 32)
    quantized = onnx.load(work / "one.onnx")
    layer_sqnr(fp32, quantized, OutputProbe(fp32, images, recipe, digits_onnx), show_progress=False)
    assert len(calls) == 1
    # Equalization kept where it measures better (the default): one call per graph measured, the chosen one's reused.
    quantize_int8_file(digits_onnx, work / "two.onnx", options(report_path=work / "two.json"))
    assert len(calls) == 3


# -- the guards ------------------------------------------------------------------------------
def test_label_free_and_labelled_sensitivity_agree(work, imbalanced):
    fp32, recipe = onnx.load(imbalanced), recipe_of(imbalanced)
    images = image_folder(CALIB, recipe, IMAGES)
    calibration = calibrate(imbalanced, "key", images, recipe, "minmax", show_progress=False)
    quantized = quantize_int8(imbalanced, calibration, "tensorrt")
    sqnr = layer_sqnr(fp32, quantized, OutputProbe(fp32, images, recipe, imbalanced), show_progress=False)
    top1 = {node: top1_on_heldout(single_layer_graph(fp32, quantized, node), recipe) for node in sqnr}
    assert min(sqnr, key=sqnr.get) == min(top1, key=top1.get) == STAGE3_0
    assert min(top1.values()) < max(top1.values()) - 1.0

    label_free = quantize_int8_file(imbalanced, work / "free.onnx", options(equalize=False, min_sqnr=30))
    labelled = quantize_int8_file(imbalanced, work / "labelled.onnx",
                                  options(equalize=False, val_dir=HELDOUT, max_top1_drop=0.5))
    assert label_free.guard.fallback[0] == labelled.guard.fallback[0] == STAGE3_0
    assert labelled.guard.met and labelled.guard.fp32_top1 - labelled.guard.final_top1 <= 0.5
    assert labelled.guard.int8_top1 < labelled.guard.fp32_top1 - 1.0  # the guard had work to do


def test_min_sqnr_guard_meets_its_limit_measured_independently(work, digits_onnx):
    out = work / "guarded.onnx"
    report = quantize_int8_file(digits_onnx, out, options(min_sqnr=34))
    guard = report.guard
    assert guard.int8_sqnr_db < 34 <= guard.final_sqnr_db and guard.met
    assert 0 < len(guard.fallback) <= 4 and report.quantized_nodes == 9 - len(guard.fallback)
    recipe = recipe_of(digits_onnx)
    measured = sqnr_db(outputs_on_calibration(out, recipe, held_out=True),
                       outputs_on_calibration(digits_onnx, recipe, held_out=True))
    assert measured >= 34 and measured == pytest.approx(guard.final_sqnr_db, abs=1e-6)
    # the search: doubling, then bisection; the prefix written is the shortest that met among those measured
    lengths = [step["layers"] for step in guard.steps]
    assert lengths[:2] == [1, 2][:len(lengths[:2])] and len(set(lengths)) == len(lengths)
    met = [step["layers"] for step in guard.steps if step["sqnr_db"] >= 34]
    assert len(guard.fallback) == min(met) and all(step["sqnr_db"] < 34 for step in guard.steps
                                                  if step["layers"] < len(guard.fallback))


def test_a_floor_out_of_reach_is_said_at_once_without_ranking_the_layers(work, digits_onnx, monkeypatch):
    """99 dB: more than the FP16 graph (every layer out of INT8, tensorrt) scores. That graph is measured
    first and written, and no layer's sensitivity is measured; on onnxruntime the layers out run in
    FP32, which meets any floor, and the search runs."""
    import rvdeploy.precision.quantize as quantize

    ranked = []
    monkeypatch.setattr(quantize, "layer_sqnr", lambda *a, **k: ranked.append(1) or layer_sqnr(*a, **k))
    report = quantize_int8_file(digits_onnx, work / "unreachable.onnx", options(min_sqnr=99))
    guard = report.guard
    assert guard.out_of_reach and not guard.met and not guard.steps and not ranked
    assert 40 < guard.ceiling_sqnr_db == guard.final_sqnr_db < 99 and report.quantized_nodes == 0
    assert sorted(guard.fallback) == sorted(report.fp16_nodes + report.fp32_nodes) and len(guard.fallback) == 9
    reachable = quantize_int8_file(digits_onnx, work / "reachable.onnx", options(min_sqnr=99, target="onnxruntime"))
    assert not reachable.guard.out_of_reach and reachable.guard.met and reachable.guard.steps and ranked


def test_no_equalize_guard_falls_back_the_imbalanced_layer_and_equalization_fixes_it(work, imbalanced):
    plain = quantize_int8_file(imbalanced, work / "plain.onnx", options(equalize=False, min_sqnr=30))
    assert plain.equalization is None and plain.guard.met
    assert plain.guard.fallback[0] == STAGE3_0 and plain.guard.int8_sqnr_db < 20
    equalized = quantize_int8_file(imbalanced, work / "equalized.onnx", options())
    assert not equalized.equalization.nothing_to_equalize
    assert equalized.output_sqnr_db > plain.guard.int8_sqnr_db + 10  # equalization undoes the imbalance
    row = next(r for r in equalized.layers if r.node == "/stage2/stage2.1/rbr_reparam/Conv")
    assert row.weight_spread_before > 100 > 10 * row.weight_spread_after
    assert read_metadata(onnx.load(work / "equalized.onnx"))["equalized"] is True


# -- fallback precision per target -----------------------------------------------------------
def _layer(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


def test_tensorrt_fallback_is_typed_fp16_and_builds(work, imbalanced, builder):
    out = work / "trt_fallback.onnx"
    report = quantize_int8_file(imbalanced, out, options(equalize=False, min_sqnr=30))
    model = onnx.load(out)
    inits = {i.name: i for i in model.graph.initializer}
    conv = _layer(model, STAGE3_0)
    assert inits[conv.input[1]].data_type == onnx.TensorProto.FLOAT16 and inits[conv.input[2]].data_type == onnx.TensorProto.FLOAT16
    producers = {o: n for n in model.graph.node for o in n.output}
    assert producers[conv.input[0]].op_type == "Cast"  # from the FP32 activation into FP16
    assert set(report.fp16_nodes) == set(report.guard.fallback) and report.fp32_nodes == []
    assert {r.node: r.precision for r in report.layers}[STAGE3_0] == "fp16"
    assert read_metadata(model)["fp16_nodes"] == report.fp16_nodes
    engine, _ = compile_onnx(out, builder)
    assert len(engine) > 100_000


def test_onnxruntime_fallback_is_fp32(work, imbalanced):
    out = work / "ort_fallback.onnx"
    report = quantize_int8_file(imbalanced, out, options(equalize=False, min_sqnr=30, target="onnxruntime"))
    model = onnx.load(out)
    inits = {i.name: i for i in model.graph.initializer}
    conv = _layer(model, STAGE3_0)
    assert inits[conv.input[1]].data_type == onnx.TensorProto.FLOAT
    assert "Cast" not in {n.op_type for n in model.graph.node}
    assert set(report.fp32_nodes) == set(report.guard.fallback) and STAGE3_0 in report.fp32_nodes and report.fp16_nodes == []


def test_fallback_stays_fp32_where_fp16_overflows(work, digits_onnx):
    def edit(graph):  # layer 3's output x1e5, layer 4 compensates: FP16 cannot hold layer 3's output
        convs = [n for n in graph.nodes if n.op == "Conv"]
        convs[3].inputs[1].values *= 1e5
        convs[3].inputs[2].values *= 1e5
        convs[4].inputs[1].values /= 1e5
    big = with_graph(digits_onnx, work / "big.onnx", edit)
    recipe, node = recipe_of(big), "/stage2/stage2.0/rbr_reparam/Conv"
    images = image_folder(CALIB, recipe, 32)
    calibration = calibrate(big, "key", images, recipe, "minmax", show_progress=False)
    probe = OutputProbe(onnx.load(big), images, recipe, big)
    from rvdeploy.precision.calib import activation_stats
    from rvdeploy.precision.fp16 import plan_fp16

    plan = plan_fp16(onnx.load(big), activation_stats(onnx.load(big), probe.feeds), probe.sqnr, None)
    mixed = fallback_graph(big, calibration, "tensorrt", (node, "/stage1/stage1.0/rbr_reparam/Conv"),
                           lambda: {kept.node for kept in plan.kept_fp32})
    assert mixed.precisions[node] == "fp32" and mixed.precisions["/stage1/stage1.0/rbr_reparam/Conv"] == "fp16"
    assert np.isfinite(probe.outputs(mixed.model)).all()


# -- the per-layer report --------------------------------------------------------------------
def test_block_names():
    assert block_name("/stage2/stage2.3/rbr_reparam/Conv") == "stage2.3"
    assert block_name("/stage0/rbr_reparam/Conv") == "stage0"
    assert block_name("/stage1/stage1.0/se/down/Conv") == "stage1.0.se.down"
    assert block_name("/linear/Gemm") == "linear"
    assert block_name("backbone/conv_7") == "backbone/conv_7"


def test_report_json_table_and_plot(work, digits_onnx):
    out, report, plot = work / "r.onnx", work / "r.json", work / "r.png"
    code, stdout, stderr = run("quantize", digits_onnx, "--int8", "--calib", CALIB, "--num-images", IMAGES, "-o", out,
                               "--min-sqnr", "34", "--report", report, "--plot", plot)
    assert code == 0, stderr
    data = json.loads(report.read_text())
    layers = data["layers"]
    assert [row["block"] for row in layers] == BLOCKS and all(row["node"] for row in layers)
    for row in layers:
        assert row["op"] in ("Conv", "Gemm") and row["precision"] in ("int8", "fp16")
        assert row["weight_spread_before"] >= row["weight_spread_after"] >= 1.0
        assert 15 < row["sqnr_db"] < 80 and row["input_max"] > row["input_min"]
    assert {row["node"] for row in layers if row["precision"] == "fp16"} == set(data["guard"]["fallback"])
    assert data["output_sqnr_db"] >= 34 and len(data["equalization"]["pairs"]) == 8
    for heading in ("INT8 per layer", "block", "SQNR alone dB", "stage3.1", "/linear/Gemm"):
        assert heading in stdout
    assert "layer pairs equalized" in stdout and "accuracy guard (SQNR ≥ 34 dB)" in stdout
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000


def test_plot_text_does_not_overlap(work):
    from rvdeploy.precision.layer_report import LayerRow

    names = [f"stage{s}.{i}" for s in range(1, 5) for i in range(8)] + ["linear"]
    rows = [LayerRow(n, f"/{n}/Conv", "Conv", 30.0 / (k + 1), 2.0, 0.5, 9.0, 0.0, 4.0, 20.0 + k, ("int8", "fp16", "fp32")[k % 3])
            for k, n in enumerate(names)]
    figure = build_layer_figure(rows, "a long title for a 33-layer network")
    renderer = figure.canvas.get_renderer()
    figure.draw(renderer)
    texts = []
    for axes in figure.axes:
        texts += [axes.title, axes.xaxis.label, axes.yaxis.label, *axes.get_legend().get_texts()]
        for axis, limits in ((axes.xaxis, axes.get_xlim()), (axes.yaxis, axes.get_ylim())):  # the ticks drawn
            texts += [label for label, loc in zip(axis.get_ticklabels(), axis.get_ticklocs()) if min(limits) <= loc <= max(limits)]
    texts = [t for t in texts if t.get_visible() and t.get_text()]
    assert len(texts) > 33 + 6
    boxes = [t.get_window_extent(renderer) for t in texts]
    overlaps = [(texts[i].get_text(), texts[j].get_text()) for i in range(len(boxes)) for j in range(i + 1, len(boxes))
                if boxes[i].overlaps(boxes[j]) and boxes[i].width and boxes[j].width]
    assert overlaps == []


def test_bad_report_paths_and_limits_fail_before_any_work(work, digits_onnx, tmp_path):
    out = tmp_path / "q.onnx"
    base = ["quantize", digits_onnx, "--int8", "--calib", CALIB, "-o", out]
    assert_one_line_error(*run(*base, "--report", ""), r"--report needs a file path, got an empty one")
    assert_one_line_error(*run(*base, "--report", tmp_path / "missing" / "r.json"), r"--report .*missing.* does not exist")
    assert_one_line_error(*run(*base, "--plot", tmp_path / "missing" / "r.png"), r"--plot .*does not exist")
    assert_one_line_error(*run(*base, "--report", tmp_path), r"is a directory")
    for value in ("nan", "inf", "-5", "1e9"):
        assert_one_line_error(*run(*base, "--min-sqnr", value), r"--min-sqnr must be a number of dB from 0 \(no floor\) to 100")
    assert_one_line_error(*run("quantize", digits_onnx, "--fp16", "-o", out, "--report", tmp_path / "r.json"),
                          r"--report is for --int8")
    assert list(tmp_path.iterdir()) == []  # nothing written, not even the graph


def test_calibration_cache_tells_equalized_from_plain(work, digits_onnx):
    cache = work / "eq-cache.json"
    runs = [quantize_int8_file(digits_onnx, work / f"c{i}.onnx", options(equalize=equalize, cache_path=cache))
            for i, equalize in enumerate((True, False, True, False))]
    assert [r.from_cache for r in runs] == [False, False, True, True]
    assert len(json.loads(cache.read_text())["entries"]) == 2
    assert (work / "c0.onnx").read_bytes() == (work / "c2.onnx").read_bytes()


# -- foreign graphs: no metadata, several outputs, nothing to equalize -----------------------
def _bare(source: Path, out: Path, dynamic_size: bool = False) -> Path:
    model = onnx.load(source)
    del model.metadata_props[:]
    if dynamic_size:
        dims = model.graph.input[0].type.tensor_type.shape.dim
        dims[2].dim_param, dims[3].dim_param = "height", "width"
    onnx.save(model, out)
    return out


def test_fp16_of_a_graph_without_metadata_needs_no_recipe(work, digits_onnx, tmp_path):
    bare = _bare(digits_onnx, tmp_path / "bare.onnx")
    code, stdout, stderr = run("quantize", bare, "--fp16", "-o", tmp_path / "f.onnx", "--json")
    assert code == 0, stderr
    assert json.loads(stdout)["observed_on"] == "random probes"
    dynamic = _bare(digits_onnx, tmp_path / "dynamic.onnx", dynamic_size=True)
    assert_one_line_error(*run("quantize", dynamic, "--fp16", "-o", tmp_path / "g.onnx"),
                          r"dynamic input size \(\?x\?\): give --input-size for the FP16 range probes")
    code, _, stderr = run("quantize", dynamic, "--fp16", "--input-size", "32", "-o", tmp_path / "g.onnx")
    assert code == 0, stderr


def test_a_multi_output_backbone_quantizes(work, digits_onnx, tmp_path):
    def edit(graph):  # the feature maps of stage3 and stage4 as outputs, no head
        relus = [n for n in graph.nodes if n.op == "Relu"]
        graph.outputs = [relus[-2].outputs[0], relus[-1].outputs[0]]
    backbone = with_graph(digits_onnx, tmp_path / "backbone.onnx", edit)
    report = quantize_int8_file(backbone, tmp_path / "b8.onnx", options(min_sqnr=30, report_path=tmp_path / "b.json"))
    assert report.guard.met and len(report.layers) == 8  # the 8 Convs, no Gemm
    recipe = recipe_of(backbone)
    measured = sqnr_db(outputs_on_calibration(tmp_path / "b8.onnx", recipe, held_out=True),
                       outputs_on_calibration(backbone, recipe, held_out=True))
    assert measured >= 30 and len(onnx.load(tmp_path / "b8.onnx").graph.output) == 2
    code, stdout, stderr = run("quantize", backbone, "--fp16", "-o", tmp_path / "b16.onnx", "--json")
    assert code == 0, stderr
    # stage3's map is an output and stage4's input: stage4 reads it in FP16 as made, the output is cast to FP32
    # (ONNX Runtime refused the graph when stage4 read the cast; measuring FP16 at quantize time found it)
    assert json.loads(stdout)["output_sqnr_db"] >= 35


def test_a_graph_with_nothing_to_equalize_says_so(work, digits_onnx, tmp_path):
    def edit(graph):  # the stem alone: one Conv, no next layer to take a scale
        graph.outputs = [next(n for n in graph.nodes if n.op == "Relu").outputs[0]]
    stem = with_graph(digits_onnx, tmp_path / "stem.onnx", edit)
    code, stdout, stderr = run("quantize", stem, "--int8", "--calib", CALIB, "--num-images", 32, "-o", tmp_path / "s.onnx")
    assert code == 0, stderr
    assert "equalization: nothing to equalize in this graph" in stdout
    report = json.loads(run("quantize", stem, "--int8", "--calib", CALIB, "--num-images", 32, "-o", tmp_path / "s.onnx",
                            "--json")[1])
    assert report["equalization"]["pairs"] == [] and report["layers"][0]["block"] == "stage0"


def test_a_default_floor_keeps_int8_from_being_silently_bad(work, imbalanced):
    """By default the written graph reaches 20 dB on the calibration images: the imbalanced net without
    equalization (under 20 dB all-INT8) has its most sensitive layers taken out of INT8; --min-sqnr 0
    writes the all-INT8 graph, and a graph that meets the floor costs no sensitivity pass."""
    floored = quantize_int8_file(imbalanced, work / "floored.onnx", options(equalize=False))
    assert floored.guard.min_sqnr_db == 20.0 and floored.guard.int8_sqnr_db < 20 <= floored.output_sqnr_db
    assert floored.guard.fallback and floored.guard.met
    raw = quantize_int8_file(imbalanced, work / "raw.onnx", options(equalize=False, min_sqnr=0))
    assert raw.guard is None and raw.output_sqnr_db < 20 and not raw.fp16_nodes
    healthy = quantize_int8_file(imbalanced, work / "healthy.onnx", options())
    assert healthy.guard.met and not healthy.guard.fallback
    assert all(row.sqnr_db is None for row in healthy.layers)  # met at once: no layer was measured alone


def test_a_large_net_s_summary_names_a_few_layers_and_counts_the_rest():
    """A 60-layer net: the table shows the 10 lowest SQNR alone in graph order, the out-of-INT8 line the
    guard's 3 most sensitive and a count; the full lists are for --report."""
    from types import SimpleNamespace

    from rvdeploy.cli.precision_commands import _first_few, _table_rows
    from rvdeploy.precision.layer_report import LayerRow

    sqnr = [40.0 + (i * 37) % 60 for i in range(60)]
    sqnr[7] = None  # not measured: shown last
    rows = [LayerRow(f"b{i}", f"/b{i}/Conv", "Conv", 2.0, 2.0, None, None, 0.0, 1.0, db, "int8")
            for i, db in enumerate(sqnr)]
    shown = _table_rows(rows)
    worst = sorted((db, i) for i, db in enumerate(sqnr) if db is not None)[:10]
    assert [row.node for row in shown] == [f"/b{i}/Conv" for i in sorted(i for _, i in worst)]
    assert _table_rows(rows[:24]) == rows[:24]  # a small net: every layer
    guard = SimpleNamespace(fallback=["/b9/Conv", "/b2/Conv", "/b5/Conv", "/b1/Conv"])
    assert _first_few(["/b1/Conv", "/b2/Conv", "/b5/Conv", "/b9/Conv", "/b40/Conv"], guard) == \
        "/b9/Conv, /b2/Conv, /b5/Conv and 2 more (--report)"
    assert _first_few(["/b1/Conv", "/b2/Conv"], None) == "/b1/Conv, /b2/Conv"
