import numpy as np
import pytest

from rvdeploy.timing import Latency, TimingError, measure


def test_statistics_of_a_known_series():
    samples = np.arange(1, 101, dtype=float)  # 1..100 ms
    stats = Latency.from_samples(samples, batch=4)
    assert (stats.iterations, stats.min, stats.mean) == (100, 1.0, 50.5)
    assert stats.p50 == pytest.approx(50.5)
    assert stats.p90 == pytest.approx(90.1)
    assert stats.p99 == pytest.approx(99.01)
    assert stats.throughput_ips == pytest.approx(4 * 1000 / 50.5)


def test_outliers_move_the_tail_not_the_median():
    samples = [10.0] * 95 + [100.0] * 5
    stats = Latency.from_samples(samples, batch=1)
    assert stats.p50 == 10.0 and stats.p90 == 10.0 and stats.p99 == 100.0
    assert stats.mean == pytest.approx(14.5)


@pytest.mark.parametrize("bad", [[], [1.0, float("nan")], [0.0, 1.0], [-1.0]])
def test_rejects_meaningless_series(bad):
    with pytest.raises(TimingError):
        Latency.from_samples(bad, batch=1)


def test_measure_honours_the_iteration_floor():
    calls = []
    stats = measure(lambda: calls.append(1), batch=2, warmup_s=0.0, min_s=0.0, min_iters=25)
    assert stats.iterations == 25 and len(calls) >= 25 and stats.batch == 2


# -- running and reporting -------------------------------------------------------------------
import copy
import json

from rvdeploy.bench import BenchSettings, bench_target
from rvdeploy.errors import REGRESSION_EXIT
from rvdeploy.gate import BaselineError, validate_report
from rvdeploy.gate import check_regression as compare

from conftest import DIGITS_CKPT
from test_cli import assert_one_line_error, run

QUICK = BenchSettings(batches=(1, 2), warmup_s=0.0, min_s=0.05, iters=3)
QUICK_ARGS = ["--warmup-s", "0", "--min-s", "0.05", "--iters", "3"]


def test_report_follows_the_documented_schema(digits_onnx):
    report = bench_target(digits_onnx, "ort", QUICK)
    assert set(report) == {"results", "machine"}
    assert [r["batch"] for r in report["results"]] == [1, 2]
    for row in report["results"]:
        assert {"model", "variant", "backend", "precision", "batch", "latency_ms", "throughput_ips"} <= set(row)
        assert set(row["latency_ms"]) == {"min", "mean", "p50", "p90", "p95", "p99"}
        lat = row["latency_ms"]
        assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p95"] <= lat["p99"]
        assert row["throughput_ips"] == pytest.approx(row["batch"] * 1000 / lat["mean"])
        assert row["model"] == "digits" and row["variant"] == "fused@32x32" and row["backend"] == "onnxruntime-cpu"
        assert row["reference_p50_ms"] > 0 and row["normalized_p50"] == pytest.approx(lat["p50"] / row["reference_p50_ms"])
    machine = report["machine"]
    assert machine["cpu_cores"] >= 1 and "onnxruntime" in machine["versions"] and machine["reference_workload"]["op"] == "conv3x3"
    validate_report(report, "report")


def test_training_checkpoint_times_both_forms_and_the_speedup():
    report = bench_target(DIGITS_CKPT, "torch", BenchSettings(batches=(4,), warmup_s=0.0, min_s=0.05, iters=3))
    assert [r["variant"] for r in report["results"]] == ["multi-branch@32x32", "fused@32x32"]
    speedup = report["speedups"][0]
    assert speedup["batch"] == 4
    rows = {r["variant"]: r["latency_ms"]["p50"] for r in report["results"]}
    assert speedup["fused_vs_multi_branch"] == pytest.approx(rows["multi-branch@32x32"] / rows["fused@32x32"])


# -- the gate --------------------------------------------------------------------------------
def _report(p50: float, reference: float, cpu: str = "cpu A") -> dict:
    row = {"model": "RepVGG-A0", "variant": "fused@64x64", "backend": "onnxruntime-cpu", "precision": "fp32", "batch": 4,
           "latency_ms": {k: p50 for k in ("min", "mean", "p50", "p90", "p95", "p99")}, "throughput_ips": 4000 / p50,
           "reference_p50_ms": reference}
    return {"results": [row], "machine": {"cpu": cpu, "cpu_cores": 2, "gpu": None}}


def test_gate_passes_against_itself():
    report = _report(3.0, 0.5)
    comparison = compare(report, copy.deepcopy(report), 20)
    assert comparison.deltas[0].change_pct == 0 and not comparison.regressions and not comparison.normalized


def test_gate_fails_against_a_baseline_three_times_faster():
    comparison = compare(_report(3.0, 0.5), _report(1.0, 0.5), 20)
    assert comparison.deltas[0].change_pct == pytest.approx(200.0)
    assert comparison.regressions


def test_gate_passes_a_within_noise_change():
    assert not compare(_report(3.15, 0.5), _report(3.0, 0.5), 20).regressions  # +5%


def test_normalisation_holds_across_a_machine_speed_change():
    # The baseline came from a machine twice as fast: the model and the reference both took half the time.
    fast_machine = _report(1.5, 0.25, cpu="cpu B")
    unchanged = _report(3.0, 0.5)
    raw = compare(unchanged, fast_machine, 20, normalize="never")
    assert raw.regressions  # raw milliseconds cry wolf
    auto = compare(unchanged, fast_machine, 20)
    assert auto.normalized and auto.deltas[0].change_pct == pytest.approx(0.0) and not auto.regressions
    # A real 50% regression on the slower machine is still caught, and not on a twice-slower baseline's raw numbers.
    slow_machine = _report(6.0, 1.0, cpu="cpu C")
    regressed = _report(4.5, 0.5)
    assert not compare(regressed, slow_machine, 20, normalize="never").regressions  # raw milliseconds sleep
    caught = compare(regressed, slow_machine, 20)
    assert caught.deltas[0].change_pct == pytest.approx(50.0) and caught.regressions


def test_gate_needs_matching_rows_and_reference_timings():
    other = _report(3.0, 0.5)
    other["results"][0]["batch"] = 8
    with pytest.raises(BaselineError, match="no result matches the baseline"):
        compare(_report(3.0, 0.5), other, 20)
    no_reference = _report(3.0, 0.5, cpu="cpu B")
    no_reference["results"][0]["reference_p50_ms"] = None
    with pytest.raises(BaselineError, match="cannot normalise"):
        compare(_report(3.0, 0.5), no_reference, 20)


def test_cli_gate_exit_codes(tmp_path, digits_onnx):
    out = tmp_path / "now.json"
    code, stdout, stderr = run("bench", digits_onnx, "--backend", "ort", "--batch", "2", *QUICK_ARGS, "--json", out, "--markdown")
    assert code == 0, stderr
    assert "| model | variant | backend |" in stdout
    current = json.loads(out.read_text())
    faster = copy.deepcopy(current)
    for row in faster["results"]:
        row["latency_ms"] = {k: v / 3 for k, v in row["latency_ms"].items()}
    (tmp_path / "faster.json").write_text(json.dumps(faster))
    code, stdout, stderr = run("bench", digits_onnx, "--backend", "ort", "--batch", "2", *QUICK_ARGS,
                               "--baseline", tmp_path / "faster.json", "--max-regression", "50")
    assert code == REGRESSION_EXIT
    assert stderr.strip().splitlines()[-1].startswith("error: latency regression: digits / fused@32x32 / onnxruntime-cpu / fp32 / 2 is +")
    slower = copy.deepcopy(current)
    for row in slower["results"]:
        row["latency_ms"] = {k: v * 3 for k, v in row["latency_ms"].items()}
    (tmp_path / "slower.json").write_text(json.dumps(slower))
    code, stdout, _ = run("bench", digits_onnx, "--backend", "ort", "--batch", "2", *QUICK_ARGS, "--baseline", tmp_path / "slower.json")
    assert code == 0 and "against" in stdout


def test_cli_plot(tmp_path, digits_onnx):
    code, _, stderr = run("bench", digits_onnx, "--backend", "ort", "--batch", "1", *QUICK_ARGS, "--plot", tmp_path / "p.png")
    assert code == 0, stderr
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_bad_input(tmp_path, digits_onnx):
    assert_one_line_error(*run("bench", tmp_path / "none.onnx", "--backend", "ort"), r"none\.onnx: no such file")
    assert_one_line_error(*run("bench", digits_onnx, "--backend", "tflite"), r"Invalid value for '--backend'")
    assert_one_line_error(*run("bench", digits_onnx, "--backend", "torch"), r"backend torch needs a checkpoint, got digits\.onnx")
    assert_one_line_error(*run("bench", DIGITS_CKPT, "--backend", "ort"), r"backend onnxruntime needs an \.onnx graph, got repvgg_digits_train\.pth")
    (tmp_path / "bad.json").write_text("{oops")
    assert_one_line_error(*run("bench", digits_onnx, "--backend", "ort", "--baseline", tmp_path / "bad.json"), r"bad\.json is not JSON")
    (tmp_path / "other.json").write_text(json.dumps({"rows": []}))
    assert_one_line_error(*run("bench", digits_onnx, "--backend", "ort", "--baseline", tmp_path / "other.json"),
                          r"is not an rvdeploy bench result")
    assert_one_line_error(*run("bench", digits_onnx, "--backend", "ort", "--batch", "0,8"), r"batch sizes must be positive")
    import torch

    if not torch.cuda.is_available():
        assert_one_line_error(*run("bench", digits_onnx, "--backend", "ort", "--device", "cuda"),
                              r"--device cuda: no CUDA GPU is available here")
