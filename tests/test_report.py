import itertools

import pytest
from matplotlib.colors import to_hex
from matplotlib.text import Text
from PIL import Image

from rvdeploy import report as report_module
from rvdeploy.report import build_latency_figure, format_speedup, markdown_table, plot_latency

LONG_PRECISION = "int8/tensorrt (2 nodes fp32)"


def latency(p50: float) -> dict:
    return {"min": 0.9 * p50, "mean": 1.05 * p50, "p50": p50, "p90": 1.1 * p50, "p95": 1.2 * p50, "p99": 1.4 * p50}


def make_report(models=("RepVGG-A0", "repvgg_digits_train"), forms=("fused", "multi-branch"),
                series=(("torch-cpu", "fp32"), ("onnxruntime-cpu", "int8/onnxruntime")), batches=(1, 8, 32),
                sizes=("32x32",), gpu=None) -> dict:
    """Rows in the order ``rvdeploy bench`` emits them, with latencies that differ by form, series and batch."""
    rows = []
    for (m, model), (f, form), (s, (backend, precision)), size, batch in itertools.product(
            enumerate(models), enumerate(forms), enumerate(series), sizes, batches):
        p50 = (0.4 + 0.3 * m) * batch * (1.6 if form == "multi-branch" else 1.0) / (1 + 0.7 * s) + 0.1
        gpu_compute = latency(0.8 * p50) if backend.endswith("cuda") else None
        rows.append({"model": model, "variant": f"{form}@{size}", "backend": backend, "precision": precision,
                     "batch": batch, "latency_ms": latency(p50), "throughput_ips": batch * 1000 / p50,
                     "iterations": 200, "gpu_compute_ms": gpu_compute, "reference_p50_ms": 2.0,
                     "normalized_p50": p50 / 2.0})
    machine = {"cpu": "AMD EPYC 7R13 Processor", "cpu_cores": 16, "versions": {"torch": "2.5.0"},
               "device": "cuda" if gpu else "cpu", "threads": 4}
    if gpu:
        machine["gpu"] = gpu
    return {"results": rows, "machine": machine}


TRT_SERIES = (("tensorrt-cuda", "fp32"), ("tensorrt-cuda", "fp16"), ("tensorrt-cuda", LONG_PRECISION))
CPU_SERIES = (("torch-cpu", "fp32"), ("torch-cpu", "int8/torch"), ("onnxruntime-cpu", "fp32"),
              ("onnxruntime-cpu", "int8/onnxruntime"))
REPORTS = {
    "two-models": make_report(),
    "two-models-stacked-panels": make_report(series=CPU_SERIES),
    "tensorrt-long-precision": make_report(models=("RepVGG-A0",), series=TRT_SERIES, gpu="NVIDIA H100 80GB HBM3"),
    "one-series": make_report(models=("repvgg_digits_train",), series=(("torch-cpu", "fp32"),)),
    "five-series": make_report(models=("RepVGG-A0",), series=TRT_SERIES + CPU_SERIES[2:], gpu="NVIDIA H100 80GB HBM3"),
    "eight-single-bar-clusters": make_report(models=[f"RepVGG-{n}" for n in ("A0", "A1", "A2", "B0", "B1", "B2",
                                                                             "B3", "D2se")],
                                             forms=("fused",), series=(("torch-cpu", "fp32"),), batches=(1, 8)),
    "two-input-sizes": make_report(models=("a_really_long_model_name_for_labels",), forms=("fused",),
                                   sizes=("32x32", "224x224"), batches=(1, 32)),
    "single-batch-fused-only": make_report(forms=("fused",), batches=(8,)),
}
REPORTS["hundredfold-speedup"] = make_report(models=("RepVGG-A0",), series=TRT_SERIES, batches=(1, 8), gpu="NVIDIA H100")
REPORTS["hundredfold-speedup"]["results"][0]["latency_ms"] = latency(150.0)


@pytest.fixture(scope="module", params=sorted(REPORTS))
def report(request):
    return REPORTS[request.param]


@pytest.fixture(scope="module")
def figure(report):
    return build_latency_figure(report)  # read-only in the tests, so shared per report


def tagged(figure, kind: str) -> dict:
    """Row index -> artist for the bars (``bar``) or speed-up labels (``speedup``) of every panel."""
    found = {}
    for axis in figure.axes:
        for artist in [*axis.patches, *axis.texts]:
            gid = artist.get_gid() or ""
            if gid.startswith(kind + ":"):
                found[int(gid.split(":")[1])] = artist
    return found


def visible_texts(figure) -> list[Text]:
    """Every Text drawn: titles, axis labels, in-view tick labels, bar labels, legend entries and title."""
    texts = list(figure.texts)  # the suptitle
    for axis in figure.axes:
        texts += [axis.title, axis.xaxis.label, axis.yaxis.label, *axis.texts]
        (x0, x1), (y0, y1) = sorted(axis.get_xlim()), sorted(axis.get_ylim())
        texts += [t for t in axis.get_xticklabels() if x0 <= t.get_position()[0] <= x1]
        texts += [t for t in axis.get_yticklabels() if y0 <= t.get_position()[1] <= y1]
    for legend in figure.legends:
        texts += [legend.get_title(), *legend.get_texts()]
    return [t for t in texts if t.get_visible() and t.get_text().strip()]


def test_png_is_a_valid_image(report, tmp_path):
    path = tmp_path / "latency.png"
    plot_latency(report, path)
    with Image.open(path) as image:
        assert image.format == "PNG"
        width, height = image.size
        image.verify()
    assert 600 <= width <= 4000 and 400 <= height <= 4000
    assert [p.name for p in tmp_path.iterdir()] == ["latency.png"]  # no temporary file left beside it


def assert_no_text_overlaps(figure):
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    texts = visible_texts(figure)
    assert len(texts) > 10
    boxes = [(t, t.get_window_extent(renderer)) for t in texts]
    page = figure.bbox
    for text, box in boxes:
        assert page.x0 <= box.x0 and box.x1 <= page.x1 and page.y0 <= box.y0 and box.y1 <= page.y1, text.get_text()
    for (a, box_a), (b, box_b) in itertools.combinations(boxes, 2):
        assert not box_a.overlaps(box_b), f"{a.get_text()!r} overlaps {b.get_text()!r}"


def assert_labels_inside_panels(figure):
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    for axis in figure.axes:
        panel = axis.get_window_extent(renderer)
        for text in axis.texts:
            box = text.get_window_extent(renderer)
            assert panel.y0 <= box.y0 and box.y1 <= panel.y1, text.get_text()


def test_no_two_texts_overlap_and_all_fit_in_the_figure(figure):
    assert_no_text_overlaps(figure)


def test_speedup_labels_stay_inside_their_panel(figure):
    assert_labels_inside_panels(figure)


def test_labels_turn_upright_over_bars_too_narrow_for_them(monkeypatch):
    monkeypatch.setattr(report_module, "SLOT_IN", 0.12)  # squeeze every bar well under a label's width
    figure = build_latency_figure(REPORTS["five-series"])
    assert {t.get_rotation() for t in tagged(figure, "speedup").values()} == {90.0}
    assert_no_text_overlaps(figure)
    assert_labels_inside_panels(figure)


def test_each_row_gets_a_bar_and_a_label(report, figure):
    n = len(report["results"])
    assert sorted(tagged(figure, "bar")) == list(range(n))
    assert sorted(tagged(figure, "speedup")) == list(range(n))
    for i, bar in tagged(figure, "bar").items():
        assert bar.get_height() == pytest.approx(report["results"][i]["latency_ms"]["p50"])


def test_whiskers_run_from_p90_to_p99(report, figure):
    segments = {(round(s[0][0], 6), round(s[0][1], 6), round(s[1][1], 6))
                for axis in figure.axes for lines in axis.collections for s in lines.get_segments()
                if len(s) == 2 and s[0][0] == s[1][0]}  # the vertical strokes
    for i, bar in tagged(figure, "bar").items():
        lat = report["results"][i]["latency_ms"]
        x = round(bar.get_x() + bar.get_width() / 2, 6)
        assert (x, round(lat["p90"], 6), round(lat["p99"], 6)) in segments


def test_speedup_is_against_the_first_row_of_the_batch(report, figure):
    labels = tagged(figure, "speedup")
    rows = report["results"]
    for batch in {r["batch"] for r in rows}:
        indices = [i for i, r in enumerate(rows) if r["batch"] == batch]
        assert labels[indices[0]].get_text() == "1.00x"
        first = rows[indices[0]]["latency_ms"]["p50"]
        for i in indices[1:]:
            assert labels[i].get_text() == format_speedup(first / rows[i]["latency_ms"]["p50"])


def test_speedup_text_of_a_known_ratio():
    report = make_report(models=("RepVGG-A0",), forms=("fused",), batches=(8,))
    rows = report["results"]
    rows[0]["latency_ms"], rows[1]["latency_ms"] = latency(3.4), latency(1.0)
    labels = tagged(build_latency_figure(report), "speedup")
    assert (labels[0].get_text(), labels[1].get_text()) == ("1.00x", "3.40x")


@pytest.mark.parametrize(("ratio", "text"), [(1.0, "1.00x"), (0.452, "0.45x"), (3.4, "3.40x"), (34.1, "34.1x"),
                                             (341.2, "341x"), (float("nan"), "n/a")])
def test_speedup_format(ratio, text):
    assert format_speedup(ratio) == text


def test_colour_follows_backend_and_precision(report, figure):
    colours = {}
    for i, bar in tagged(figure, "bar").items():
        row = report["results"][i]
        colours.setdefault((row["backend"], row["precision"]), set()).add(to_hex(bar.get_facecolor()))
    assert all(len(c) == 1 for c in colours.values()), "one series drawn in several colours"
    distinct = {next(iter(c)) for c in colours.values()}
    assert len(distinct) == len(colours), "two series share a colour"


def test_multi_branch_bars_are_hatched_and_fused_are_not():
    report = make_report()
    for i, bar in tagged(build_latency_figure(report), "bar").items():
        assert bool(bar.get_hatch()) == report["results"][i]["variant"].startswith("multi-branch")


def test_legend_names_every_series_and_the_whisker_convention():
    report = make_report(models=("RepVGG-A0",), series=TRT_SERIES, gpu="NVIDIA H100 80GB HBM3")
    figure = build_latency_figure(report)
    (legend,) = figure.legends
    entries = {t.get_text() for t in legend.get_texts()}
    assert {f"tensorrt-cuda · {p}" for _, p in TRT_SERIES} <= entries
    assert {"fused", "multi-branch", "whisker: p90 to p99"} <= entries
    assert "whisker = p90 to p99" in legend.get_title().get_text()
    title = figure.texts[0].get_text()
    assert "NVIDIA H100 80GB HBM3" in title and "16 CPU cores" in title and "RepVGG-A0" in title


def test_one_panel_per_batch_with_model_clusters():
    figure = build_latency_figure(make_report())
    assert [a.get_title() for a in figure.axes] == ["batch 1", "batch 8", "batch 32"]
    assert len({round(a.get_position().y0, 3) for a in figure.axes}) == 1  # side by side
    for axis in figure.axes:
        # long names may wrap at their separators to stay under their own cluster
        assert [t.get_text().replace("\n", "") for t in axis.get_xticklabels()] == ["RepVGG-A0", "repvgg_digits_train"]


def test_many_bars_stack_the_panels_with_their_own_y_scale():
    figure = build_latency_figure(REPORTS["two-models-stacked-panels"])
    assert len({round(a.get_position().x0, 3) for a in figure.axes}) == 1  # one above the other
    tops = [a.get_ylim()[1] for a in figure.axes]
    assert tops[0] < tops[1] < tops[2]


def test_cpu_title_names_cpu_cores_and_threads():
    title = build_latency_figure(make_report()).texts[0].get_text()
    assert "AMD EPYC 7R13 Processor" in title and "16 CPU cores" in title and "4 threads" in title


def test_empty_report_is_refused_and_leaves_an_existing_png(tmp_path):
    path = tmp_path / "latency.png"
    path.write_bytes(b"old")
    with pytest.raises(ValueError, match="no results"):
        plot_latency({"results": [], "machine": {}}, path)
    assert path.read_bytes() == b"old"


def test_markdown_table_has_a_line_per_row_with_formatted_values():
    report = make_report(models=("RepVGG-A0",), forms=("fused",), series=(("tensorrt-cuda", "fp16"), ("torch-cpu", "fp32")),
                         batches=(1,))
    report["results"][0]["latency_ms"] = {"min": 0.5, "mean": 0.6, "p50": 0.61234, "p90": 0.7, "p95": 0.75, "p99": 0.81}
    report["results"][0]["throughput_ips"] = 1633.04
    report["results"][0]["gpu_compute_ms"] = latency(0.5)
    lines = markdown_table(report).splitlines()
    assert len(lines) == 2 + len(report["results"])
    assert lines[0] == ("| model | variant | backend | precision | batch | p50 ms | p90 ms | p99 ms | img/s "
                        "| GPU compute p50 ms |")
    assert lines[2] == "| RepVGG-A0 | fused@32x32 | tensorrt-cuda | fp16 | 1 | 0.612 | 0.700 | 0.810 | 1633.0 | 0.500 |"
    assert lines[3].endswith("| - |")  # no GPU compute time on the CPU row
