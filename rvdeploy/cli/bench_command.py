"""``bench``: latency and throughput tables, and the regression gate."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from rvdeploy.backends import BACKENDS
from rvdeploy.cli.options import SIZE, backend_choice, batch_list, bn_eps_option, to_backend
from rvdeploy.cli.render import console, status
from rvdeploy.errors import RegressionError
from rvdeploy.gate import NORMALIZE_MODES
from rvdeploy.report import markdown_table

LATENCY_COLUMNS = ("min", "mean", "p50", "p90", "p99")


def _results_table(report: dict, title: str) -> Table:
    table = Table(title=title)
    gpu = any(r["gpu_compute_ms"] for r in report["results"])
    headings = ("model", "variant", "backend", "precision", "batch", *(f"{k} ms" for k in LATENCY_COLUMNS), "img/s")
    for heading in headings + (("GPU p50 ms",) if gpu else ()):
        table.add_column(heading, justify="right" if "ms" in heading or heading in ("batch", "img/s") else "left")
    for r in report["results"]:
        lat = r["latency_ms"]
        gpu_cell = (f"{r['gpu_compute_ms']['p50']:.3f}" if r["gpu_compute_ms"] else "-",) if gpu else ()
        table.add_row(r["model"], r["variant"], r["backend"], r["precision"], str(r["batch"]),
                      *(f"{lat[k]:.3f}" for k in LATENCY_COLUMNS), f"{r['throughput_ips']:.1f}", *gpu_cell)
    return table


def _gate_table(gate, baseline: Path, max_regression: float) -> Table:
    kind = "normalised p50 (p50 / reference workload p50)" if gate.normalized else "p50 ms"
    table = Table(title=f"against {baseline}: {kind}, fail above +{max_regression:g}%")
    for heading in ("configuration", "baseline", "now", "change"):
        table.add_column(heading, justify="left" if heading == "configuration" else "right")
    for d in gate.deltas:
        change = f"{d.change_pct:+.1f}%"
        table.add_row(d.name, f"{d.baseline_p50:.4g}", f"{d.current_p50:.4g}",
                      f"[red]{change}[/red]" if d in gate.regressions else change)
    return table


@click.command()
@click.argument("targets", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--backend", type=backend_choice(BACKENDS), callback=to_backend,
              help="torch (checkpoint), onnxruntime (.onnx) or tensorrt (.engine, on the GPU); aliases ort, trt, rtx. "
                   "Default: by each TARGET's kind.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--batch", "batches", default="1,8,32", show_default=True, callback=batch_list, help="Comma-separated batch sizes.")
@click.option("--warmup-s", type=click.FloatRange(min=0), default=1.0, show_default=True)
@click.option("--min-s", type=click.FloatRange(min=0), default=3.0, show_default=True, help="Timed seconds per configuration (at least).")
@click.option("--iters", type=click.IntRange(min=1), default=20, show_default=True, help="Timed iterations per configuration (at least).")
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads (torch and ONNX Runtime).")
@click.option("--input-size", type=SIZE, help="Input size for a graph whose size is dynamic (default: the model's recipe, else 224); "
                                             "a graph with a fixed size runs at that size.")
@bn_eps_option
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="Write the results as JSON here.")
@click.option("--markdown", is_flag=True, help="Print the table as markdown.")
@click.option("--plot", type=click.Path(path_type=Path), help="Write a latency chart (PNG): p50 bars, p90-p99 whiskers, by batch.")
@click.option("--baseline", type=click.Path(path_type=Path), help="Bench JSON to compare p50 latencies against.")
@click.option("--max-regression", type=click.FloatRange(min=0), default=10.0, show_default=True,
              help="With --baseline: fail (exit 5) when a p50 is slower by more than this percentage.")
@click.option("--normalize", type=click.Choice(NORMALIZE_MODES), default="auto", show_default=True,
              help="Compare latencies divided by the reference workload's: auto when the baseline is from another machine.")
def bench(targets, backend, device, batches, warmup_s, min_s, iters, threads, input_size, bn_eps, json_out, markdown, plot,
          baseline, max_regression, normalize) -> None:
    """Latency and throughput of each TARGET, trtexec-style, in one table; optionally gated against a baseline.

    A training checkpoint on torch is timed both multi-branch and fused (checked to compute the same
    function first), with the speed-up.
    """
    from rvdeploy import pipeline
    settings = pipeline.BenchSettings(batches, warmup_s, min_s, iters, threads, input_size, device, bn_eps)
    options = pipeline.BenchOptions(backend, settings, json_out, plot, baseline, max_regression, normalize,
                                    progress=lambda what: status.print(f"timing {what}", highlight=False))
    outcome = pipeline.bench(list(targets), options)
    report = outcome.report
    machine = report["machine"]
    console.print(f"machine: {machine.get('gpu') or machine['cpu']}, {machine['cpu_cores']} cores, "
                  f"threads {threads or 'default'}; " + ", ".join(f"{k} {v}" for k, v in machine["versions"].items()),
                  highlight=False)
    if markdown:
        click.echo(markdown_table(report))
    else:
        console.print(_results_table(report, f"rvdeploy bench: {', '.join(Path(t).name for t in targets)}"))
    for check in report.get("checks", []):
        console.print(f"{check['model']}: {check['candidate']} vs. {check['reference']} on one probe batch: max rel error "
                      f"{check['max_rel_error']:.3g} (float32 explains {check['budget_rel']:.3g})", highlight=False)
    for skip in report.get("skipped_batches", []):
        console.print(f"{skip['model']}: its graph has a fixed batch of {skip['fixed_batch']}: batches "
                      f"{', '.join(map(str, skip['batches']))} skipped", highlight=False)
    for s in report.get("speedups", []):
        console.print(f"fused vs. multi-branch, batch {s['batch']}: {s['fused_vs_multi_branch']:.2f}x faster", highlight=False)
    if outcome.gate is None:
        return
    console.print(_gate_table(outcome.gate, baseline, max_regression))
    if outcome.gate.unmatched:
        console.print(f"not in the baseline: {', '.join(outcome.gate.unmatched)}", highlight=False)
    if outcome.regressed:
        worst = max(outcome.gate.regressions, key=lambda d: d.change_pct)
        raise RegressionError(f"latency regression: {worst.name} is {worst.change_pct:+.1f}% (limit +{max_regression:g}%)")
