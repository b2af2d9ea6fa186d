"""``quantize``, ``build-engine`` and ``eval``: the precision, engine and accuracy stages."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from rvdeploy.cli.options import backend_choice, bn_eps_option, recipe_from, recipe_options, to_backend
from rvdeploy.cli.render import console, print_json
from rvdeploy.errors import RvdeployError
from rvdeploy.machine import CPU_CLASSES
from rvdeploy.precision.choices import (DEFAULT_FP16_MIN_SQNR_DB, DEFAULT_METHOD, DEFAULT_MIN_SQNR_DB, DEFAULT_ROUNDING,
                                        KEPT_FP32_FOR, MAX_HELD_OUT, METHODS, MIN_IMAGES_TO_HOLD_OUT, ROUNDINGS,
                                        SENSITIVITY_IMAGES, TARGETS)


def precision_options(command):
    """What the precision step reads: calibration images, the INT8 method and cache, the accuracy
    guard, FP16 I/O, and the preprocessing recipe. Shared by ``quantize`` and ``build-engine``."""
    options = [
        click.option("--io-fp16", is_flag=True, help="With --fp16: FP16 model input and output too (default FP32)."),
        click.option("--calib", "calib_dir", type=click.Path(path_type=Path), help="Folder of calibration images (JPEG/PNG, recursive)."),
        click.option("--method", type=click.Choice(METHODS), default=DEFAULT_METHOD, show_default=True,
                     help="With --int8: calibration method (minmax was the best measured on the shipped model)."),
        click.option("--num-images", type=click.IntRange(min=1), help="Use the first N calibration images."),
        click.option("--calib-cache", type=click.Path(path_type=Path), help="With --int8: JSON cache of calibration ranges."),
        click.option("--equalize/--no-equalize", default=None,
                     help="With --int8: cross-layer equalization of the FP32 graph before calibration [default: "
                          "measured: kept where the INT8 graph's output SQNR on the held-out calibration images is the higher]."),
        click.option("--bias-correction/--no-bias-correction", default=True, show_default=True,
                     help="With --int8: correct each INT8 layer's bias by its mean output error on the calibration images."),
        click.option("--rounding", type=click.Choice(ROUNDINGS), default=DEFAULT_ROUNDING, show_default=True,
                     help="With --int8: INT8 weights chosen layer by layer to reproduce each layer's FP32 outputs on the "
                          "calibration images (adaptive), or each rounded to nearest (faster, less accurate)."),
        click.option("--min-sqnr", type=float, help="Label-free floor: the output SQNR (dB) against FP32 must reach this. "
                     f"--int8: on held-out calibration images (a quarter, at most {MAX_HELD_OUT}, picked with a fixed seed from "
                     f"{MIN_IMAGES_TO_HOLD_OUT} images on; nothing is fitted to them); the most sensitive layers leave INT8 "
                     f"until it does [default: {DEFAULT_MIN_SQNR_DB:g}; 0 turns it off, and every image is fitted on]. "
                     "--fp16: on the observed images (or random probes); a run of nodes in graph order, from where rounding is "
                     f"amplified most, stays FP32 until it does [default: {DEFAULT_FP16_MIN_SQNR_DB:g}; 0 turns it off]."),
        click.option("--val", "val_dir", type=click.Path(path_type=Path), help="With --int8: validation folder (one sub-folder per class) for the accuracy guard."),
        click.option("--max-top1-drop", type=click.FloatRange(min=0), help="With --int8: the accuracy guard's allowed top-1 drop in points."),
        click.option("--report", "report_path", type=click.Path(dir_okay=False), help="With --int8: write the per-layer report as JSON."),
        click.option("--plot", "plot_path", type=click.Path(dir_okay=False), help="With --int8: draw the per-layer report as PNG."),
    ]
    for decorator in reversed(options):
        command = decorator(command)
    return recipe_options(command)


def precision_from(precision: str | None, target: str, kwargs: dict, show_progress: bool, cpu: str = "auto"):
    """The FP16 or INT8 options from the shared precision options (popped from ``kwargs``)."""
    from rvdeploy import pipeline
    probe_size = None
    if precision == "fp16" and kwargs["calib_dir"] is None and kwargs["mean"] is None and kwargs["std"] is None:
        probe_size = kwargs.pop("recipe_size")  # random FP16 probes need a size (for a dynamic input), no recipe
        kwargs["recipe_size"] = None
    recipe, allow_upscale = recipe_from(kwargs)
    images = dict(calib_dir=kwargs.pop("calib_dir"), num_images=kwargs.pop("num_images"), recipe=recipe,
                  allow_upscale=allow_upscale)
    names = ("io_fp16", "method", "calib_cache", "equalize", "bias_correction", "rounding", "min_sqnr", "val_dir",
             "max_top1_drop", "report_path", "plot_path")
    io_fp16, method, cache, equalize, bias_correction, rounding, min_sqnr, val_dir, max_drop, report, plot = (
        kwargs.pop(k) for k in names)
    if precision == "fp16":
        given = [flag for flag, value in (("--report", report), ("--plot", plot),
                                          ("--rounding", None if rounding == DEFAULT_ROUNDING else rounding)) if value is not None]
        if given:
            raise RvdeployError(f"{given[0]} is for --int8: FP16 has no per-layer quantization to report")
        return pipeline.Fp16Options(io_fp16=io_fp16, probe_size=probe_size, show_progress=show_progress,
                                    min_sqnr=DEFAULT_FP16_MIN_SQNR_DB if min_sqnr is None else min_sqnr, **images)
    if precision == "int8":
        return pipeline.Int8Options(target=target, cpu=cpu, method=method, cache_path=cache, equalize=equalize,
                                    bias_correction=bias_correction, rounding=rounding, min_sqnr=DEFAULT_MIN_SQNR_DB if min_sqnr is None else min_sqnr,
                                    val_dir=val_dir, max_top1_drop=max_drop, report_path=report, plot_path=plot,
                                    show_progress=show_progress, **images)
    return None


def _db(value: float) -> str:
    return "identical" if value == float("inf") else f"{value:.1f} dB"


def _judged_on(report) -> str:
    """Where the report's output SQNRs were measured."""
    return f"on {report.held_out_images} held-out calibration images" if report.held_out_images else "on the calibration images"


def _bias_correction_line(correction, rounding, judged_on: str) -> str:
    if correction is None:
        return "bias correction: off (--no-bias-correction)"
    chosen = len(rounding.bias_chosen) if rounding and rounding.kept else 0
    if not correction.layers:
        refitted = len(rounding.biases) if chosen else 0
        return (f"bias correction: none needed (adaptive rounding chose {chosen} INT8 layers' biases on held-out rows: "
                f"{refitted} refitted, {chosen - refitted} kept)" if chosen
                else "bias correction: no INT8 layer with a bias it can correct")
    measured = f"output SQNR {_db(correction.sqnr_before_db)} → {_db(correction.sqnr_after_db)} {judged_on}"
    if not correction.kept:
        return f"bias correction: not kept ({measured}: no better, or a guard limit broken)"
    return f"bias correction: {len(correction.layers)} INT8 layers corrected, {measured}"


def _rounding_line(rounding, judged_on: str) -> str:
    if rounding is None:
        return "rounding: to nearest (--rounding nearest)"
    adaptive = [layer for layer in rounding.layers if layer.kept]
    measured = f"output SQNR {_db(rounding.sqnr_before_db)} → {_db(rounding.sqnr_after_db)} {judged_on}"
    if not rounding.kept:
        return f"rounding: adaptive not kept ({measured}: no better); to nearest"
    gains = sorted(((layer.adaptive_sqnr_db - layer.nearest_sqnr_db, layer.node) for layer in adaptive), reverse=True)
    best = ", ".join(f"{node} +{gain:.1f} dB" for gain, node in gains[:SKIPPED_SHOWN])
    bias_only = sum(layer.bias_only for layer in adaptive)
    return (f"rounding: adaptive in {len(adaptive) - bias_only} of {len(rounding.layers)} INT8 layers, only the bias "
            f"refitted in {bias_only} (the rest to nearest: no better on held-out rows), {measured}; largest layer "
            f"gains: {best}")


def _cpu_format_line(cpu_format, int8_layers: int) -> str:
    here = "this CPU's class" if cpu_format.cpu == cpu_format.this_cpu else f"this CPU is {cpu_format.this_cpu}"
    unsigned = len(cpu_format.unsigned)
    kernels = {0: "u8s8", int8_layers: "u8u8"}.get(unsigned, f"{unsigned} of {int8_layers} u8u8, the rest u8s8")
    line = f"CPU class {cpu_format.cpu} ({here}): INT8 layers {kernels} ({cpu_format.how})"
    worst = sorted(((db, node) for node, db in cpu_format.saturation_db.items() if db > 0), reverse=True)[:3]
    if worst:
        line += "; saturation alone cost " + ", ".join(f"{node} {db:.1f} dB" for db, node in worst)
    return line + f"; every SQNR here was measured on this CPU ({cpu_format.this_cpu})"


SKIPPED_SHOWN = 3  # the rest are in --report


def _skipped(skipped) -> str:
    """The layers equalization left alone: a count and the first few, with their reasons."""
    if not skipped:
        return ""
    shown = "; ".join(f"{s.first} → {s.second or '-'} ({s.reason})" for s in skipped[:SKIPPED_SHOWN])
    more = f"; {len(skipped) - SKIPPED_SHOWN} more in --report" if len(skipped) > SKIPPED_SHOWN else ""
    return f"; {len(skipped)} skipped: {shown}{more}"


def _first_few(nodes: list[str], guard) -> str:
    """The first few of ``nodes``, the guard's most sensitive first where it chose them; the count of the rest."""
    order = {node: i for i, node in enumerate(guard.fallback)} if guard else {}
    ranked = sorted(nodes, key=lambda node: order.get(node, len(order)))
    more = f" and {len(ranked) - SKIPPED_SHOWN} more (--report)" if len(ranked) > SKIPPED_SHOWN else ""
    return ", ".join(ranked[:SKIPPED_SHOWN]) + more


def _int8_summary(report) -> str:
    judged_on = _judged_on(report)
    calibrated = "from the cache" if report.from_cache else f"in {report.calibration_seconds:.1f} s"
    linear_int8 = len(set(report.linear_as_gemm) - set(report.fp16_nodes) - set(report.fp32_nodes))
    lines = [f"INT8 ({report.target} layout, {report.method}): {report.quantized_nodes} layers quantized, "
             f"calibrated on {report.calibration_images} images {calibrated}"
             + (f" ({report.held_out_images} more held out: nothing is fitted to them, every output SQNR below is "
                "measured on them)" if report.held_out_images else "")
             + (f", {report.skipped_images} unreadable images skipped" if report.skipped_images else "")
             + (f"; {linear_int8} of them token Linear layers (a MatMul by a constant weight, quantized as a Gemm)"
                if linear_int8 else "")
             + ("; in float by design: " + ", ".join(f"{n} {op}" for op, n in report.float_by_design.items())
                if report.float_by_design else "")]
    eq = report.equalization
    if eq is None:
        lines.append("equalization: off (--no-equalize)")
    elif eq.nothing_to_equalize:
        lines.append("equalization: nothing to equalize in this graph"
                     + (f" ({len(eq.skipped)} layers skipped: {eq.skipped[0].reason})" if eq.skipped else ""))
    else:
        line = f"equalization: {len(eq.pairs)} layer pairs equalized in {eq.sweeps} sweeps{_skipped(eq.skipped)}"
        if eq.sqnr_equalized_db is not None:
            measured = (f"output SQNR {_db(eq.sqnr_equalized_db)} equalized, {_db(eq.sqnr_plain_db)} without, weights "
                        f"rounded to nearest, {judged_on}")
            line += f"; kept ({measured})" if eq.kept else f"; not kept ({measured}): the graph is quantized as it is"
        lines.append(line)
    lines.append(_rounding_line(report.rounding, judged_on))
    lines.append(_bias_correction_line(report.bias_correction, report.rounding, judged_on))
    if report.cpu_format:
        lines.append(_cpu_format_line(report.cpu_format, report.quantized_nodes))
    out_of_int8 = [f"{len(nodes)} in {precision.upper()}: {_first_few(nodes, report.guard)}"
                   for precision, nodes in (("fp16", report.fp16_nodes), ("fp32", report.fp32_nodes)) if nodes]
    compared = (f" (outputs after a TopK compared by the {len(report.compared_tensors)} tensors it selects from; "
                "--report names them)" if report.compared_tensors else "")
    lines.append(f"output SQNR against FP32 {judged_on}{compared}: {_db(report.output_sqnr_db)}; "
                 + ("; ".join(out_of_int8) if out_of_int8 else "every layer in INT8"))
    if report.guard:
        g = report.guard
        limits = ([f"SQNR ≥ {g.min_sqnr_db:g} dB"] if g.min_sqnr_db is not None else []) + (
            [f"top-1 drop ≤ {g.max_top1_drop:g} points"] if g.max_top1_drop is not None else [])
        measured = f"all-INT8 SQNR {_db(g.int8_sqnr_db)}, final {_db(g.final_sqnr_db)}"
        if g.fp32_top1 is not None:
            measured += f"; FP32 top-1 {g.fp32_top1:.2f}%, all-INT8 {g.int8_top1:.2f}%, final {g.final_top1:.2f}%"
        missed = ("; out of reach: with every layer out of INT8 the graph still misses it (it amplifies "
                  "low-precision rounding; check it on trained weights and real inputs)" if g.out_of_reach else
                  "; the limit was not met even so")
        lines.append(f"accuracy guard ({', '.join(limits)}): {measured}; {len(g.fallback)} layers out of INT8"
                     + ("" if g.met else missed))
    return "\n".join(lines)


def _number(value: float | None, digits: str = ".3g") -> str:
    return "-" if value is None else format(value, digits)


TABLE_ROWS, TABLE_WORST = 24, 10  # a net with more layers shows its most sensitive few


def _table_rows(layers: list) -> list:
    """Every layer of a small net; of a larger one the few with the lowest SQNR alone (where measured,
    else the first few), in graph order."""
    if len(layers) <= TABLE_ROWS:
        return layers
    ranked = sorted(range(len(layers)), key=lambda i: (layers[i].sqnr_db is None, layers[i].sqnr_db or 0.0, i))
    return [layers[i] for i in sorted(ranked[:TABLE_WORST])]


def layer_table(report) -> Table:
    """The per-layer report: block, spreads, input range, SQNR alone, each rounding's layer SQNR (when
    adaptive rounding ran), precision; the node name maps TensorRT layers back."""
    rows = _table_rows(report.layers)
    measured = any(row.sqnr_db is not None for row in report.layers)
    shown = "" if len(rows) == len(report.layers) else (
        f"; the {len(rows)} {'most sensitive' if measured else 'first'} of {len(report.layers)} layers, every one in --report")
    table = Table(title="INT8 per layer (SQNR alone: output SQNR with only that layer in INT8, on the first "
                        f"{SENSITIVITY_IMAGES} images{shown})")
    rounded = report.rounding is not None
    headings = ["block", "op", "weight spread before → after", "input range", "SQNR alone dB"]
    headings += ["layer SQNR dB nearest → adaptive"] if rounded else []
    for heading in [*headings, "precision", "node"]:
        table.add_column(heading, justify="right" if "dB" in heading else "left", overflow="fold")
    for row in rows:
        spread = f"{_number(row.weight_spread_before)} → {_number(row.weight_spread_after)}"
        span = "-" if row.input_min is None else f"{row.input_min:.3g} .. {row.input_max:.3g}"
        sqnr = "-" if row.sqnr_db is None else ("exact" if row.sqnr_db == float("inf") else f"{row.sqnr_db:.1f}")
        cells = [row.block, row.op, spread, span, sqnr]
        if rounded:
            cells.append("-" if row.nearest_sqnr_db is None else f"{row.nearest_sqnr_db:.1f} → {row.adaptive_sqnr_db:.1f}")
        table.add_row(*cells, row.precision, row.node)
    return table


def _summary(report) -> str:
    from rvdeploy import pipeline
    if isinstance(report, pipeline.Int8Report):
        return _int8_summary(report)
    return _fp16_summary(report)


def _fp16_summary(report) -> str:
    by_kind = {kind: [k for k in report.kept_fp32 if k.kind == kind] for kind in KEPT_FP32_FOR}
    what = {"range": "beyond FP16's range", "underflow": "below FP16's normal range", "floor": "for the floor"}
    kept = "; ".join(f"{len(nodes)} {what[kind]} ({', '.join(k.node for k in nodes[:SKIPPED_SHOWN])}"
                     f"{', ...' if len(nodes) > SKIPPED_SHOWN else ''})" for kind, nodes in by_kind.items() if nodes) or "none"
    probes = report.observed_on == "random probes"
    kinds = " (standard-normal, and smooth in [0, 1])" if probes else ""
    lines = [f"FP16: {report.nodes_fp16} nodes in FP16; kept in FP32: {kept}; {report.weights_flushed_to_zero} weights too "
             f"small for FP16 (flushed to 0); ranges checked on {report.observed_inputs} {report.observed_on}{kinds}"]
    on = "them" if report.judged_inputs == report.observed_inputs else f"{report.judged_inputs} of them"
    on += " (the worse kind's)" if probes else ""
    floor, measured = report.floor, f"output SQNR against FP32 on {on}: {_db(report.output_sqnr_db)}"
    if floor is None:
        low = (f"; under {DEFAULT_FP16_MIN_SQNR_DB:g} dB: this graph amplifies FP16 rounding, check it on real inputs"
               if report.output_sqnr_db < DEFAULT_FP16_MIN_SQNR_DB else "")
        lines.append(f"{measured} (no floor: --min-sqnr 0){low}")
    elif not floor.steps:
        lines.append(f"{measured}: meets the {floor.min_sqnr_db:g} dB floor")
    else:
        share = f"its FP16 nodes {floor.kept_from + 1} to {floor.kept_to} of {floor.fp16_nodes} in graph order"
        verdict = (f"meets the {floor.min_sqnr_db:g} dB floor with {share} kept FP32" if floor.met else
                   f"misses the {floor.min_sqnr_db:g} dB floor even with {share} kept FP32: this graph amplifies FP16 "
                   "rounding, check it on real inputs")
        lines.append(f"{measured}; {verdict} (FP16 elsewhere: {_db(floor.planned_sqnr_db)}; "
                     f"{len(floor.steps)} candidates measured)")
    return "\n".join(lines)


@click.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Graph to write.")
@click.option("--fp16", "precision", flag_value="fp16", help="FP16 weights and compute.")
@click.option("--int8", "precision", flag_value="int8", help="Explicit Q/DQ INT8 (needs --calib).")
@click.option("--target", type=click.Choice(TARGETS), default="tensorrt", show_default=True,
              help="Q/DQ layout: TensorRT's, or the one ONNX Runtime on x86 CPUs runs fastest.")
@click.option("--cpu", type=click.Choice(["auto", *CPU_CLASSES]), default="auto", show_default=True,
              help="With --target onnxruntime: the CPUs the graph is for. vnni: exact, fastest u8s8 kernels; avx2 (no VNNI): "
                   "u8u8 kernels where u8s8 would saturate. auto: this CPU's class.")
@precision_options
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def quantize(model, output, precision, target, cpu, as_json, **kwargs) -> None:
    """Write an FP16 or INT8 (Q/DQ) graph of the FP32 ONNX MODEL."""
    from rvdeploy import pipeline
    if precision is None:
        raise RvdeployError("choose --fp16 or --int8")
    if cpu != "auto" and precision != "int8":
        raise RvdeployError("--cpu is for --int8 --target onnxruntime")
    options = precision_from(precision, target, kwargs, not as_json, cpu)
    report = pipeline.quantize_model(model, output, options)
    if as_json:
        print_json({"precision": precision, "output": str(output), **report.to_dict()})
        return
    if isinstance(report, pipeline.Int8Report):
        console.print(layer_table(report))
    console.print(_summary(report), highlight=False)
    extras = [options.report_path, options.plot_path] if isinstance(options, pipeline.Int8Options) else []
    console.print("wrote " + ", ".join(str(path) for path in (output, *extras) if path))


@click.command(name="build-engine")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Engine file to write.")
@click.option("--fp16", "precision", flag_value="fp16", help="Build from the FP16 graph (made first, kept next to the engine).")
@click.option("--int8", "precision", flag_value="int8", help="Build from the INT8 Q/DQ graph (needs --calib).")
@click.option("--backend", type=backend_choice(("auto", "tensorrt", "tensorrt-rtx")), default="auto", show_default=True,
              callback=to_backend, help="auto prefers TensorRT when it imports (aliases: trt, rtx).")
@click.option("--min-batch", type=int, help="Smallest batch of the profile (default 1).")
@click.option("--opt-batch", type=int, help="Batch the builder optimises for (default 8).")
@click.option("--max-batch", type=int, help="Largest batch of the profile (default 32).")
@click.option("--workspace", type=float, help="Builder workspace limit in MB.")
@click.option("--timing-cache", type=click.Path(path_type=Path), help="Timing cache file (read and updated; TensorRT only).")
@click.option("--opt-level", type=int, help="Builder optimisation level 0-5.")
@click.option("--tf32", is_flag=True, help="Allow TF32 for FP32 layers (off: FP32 engines match ONNX Runtime).")
@click.option("--force", is_flag=True, help="Rebuild even when the sidecar shows an identical build.")
@precision_options
@click.option("--json", "as_json", is_flag=True, help="Print the sidecar as JSON.")
def build_engine(model, output, precision, backend, min_batch, opt_batch, max_batch, workspace, timing_cache,
                 opt_level, tf32, force, as_json, **kwargs) -> None:
    """Build a TensorRT engine of MODEL (FP32, or FP16 / INT8 after the precision step)."""
    from rvdeploy import pipeline
    if workspace is not None and workspace <= 0:
        raise RvdeployError(f"--workspace must be a positive number of MB, got {workspace:g}")
    settings = pipeline.BuildSettings(min_batch, opt_batch, max_batch, None if workspace is None else max(1, round(workspace)),
                                      opt_level, tf32, str(timing_cache) if timing_cache else None)
    options = pipeline.BuildOptions(backend or "auto", settings, force,
                                    precision_from(precision, "tensorrt", kwargs, not as_json))
    outcome = pipeline.build(model, output, options)
    side = outcome.build.sidecar
    if as_json:
        print_json({"skipped": outcome.build.skipped, **side})
        return
    if outcome.build.skipped:
        console.print(f"{output} is up to date (identical build recorded in {output.name}.json); --force rebuilds it")
        return
    if outcome.precision_report is not None:
        console.print(_summary(outcome.precision_report), highlight=False)
    where = f"on {side['gpu']['name']}" if side["gpu"] else "ahead of time, without a GPU"
    profile = side["profiles"][0]
    console.print(
        f"built {output} ({side['precision']}, {side['backend']} {side['library_version']}, batch "
        f"{profile['min'][0]}..{profile['max'][0]} opt {profile['opt'][0]}, {side['engine_bytes'] / 1e6:.1f} MB) "
        f"{where} in {side['build_seconds']:.2f} s" + (f"; typed graph {outcome.typed_graph}" if outcome.typed_graph else ""),
        highlight=False,
    )


@click.command(name="eval")
@click.argument("models", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--data", "data_dir", type=click.Path(path_type=Path), required=True,
              help="Image folder with one sub-folder per class.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--batch", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--compare", is_flag=True,
              help="Also compare each model's logits with the first's: top-1 agreement, SQNR, max relative error.")
@recipe_options
@bn_eps_option
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def eval_command(models, data_dir, device, batch, compare, bn_eps, as_json, **kwargs) -> None:
    """Top-1 (and top-5) of one or more MODELS (checkpoint, .onnx or .engine) on DATA.

    Several models are listed side by side with the top-1 change against the first; with
    --compare, each model's logits are also compared with the first's, image by image.
    """
    from rvdeploy import pipeline
    recipe, allow_upscale = recipe_from(kwargs)
    options = pipeline.EvalOptions(device, batch, recipe, allow_upscale, compare, bn_eps, show_progress=not as_json)
    result = pipeline.evaluate_models(list(models), data_dir, options)
    if as_json:
        print_json(result.to_dict(str(data_dir)))
        return
    accuracies = [e.accuracy for e in result.evaluations]
    has_top5 = any(a.top5 is not None for a in accuracies)
    table = Table(title=f"accuracy on {data_dir} ({accuracies[0].images} images)")
    headings = ["model", "backend", "precision", "top-1 %", "Δ top-1"] + (["top-5 %"] if has_top5 else [])
    headings += ["agrees with first %", "SQNR dB", "max rel error"] if compare else []
    for heading in headings:
        table.add_column(heading, justify="left" if heading in ("model", "backend", "precision") else "right", overflow="fold")
    for a, agreement in zip(accuracies, result.agreements or [None] * len(accuracies)):
        row = [a.model, a.backend, a.precision, f"{a.top1:.2f}", f"{a.top1 - accuracies[0].top1:+.2f}"]
        row += [f"{a.top5:.2f}" if a.top5 is not None else "-"] if has_top5 else []
        if compare:
            row += ([f"{agreement.top1_agreement * 100:.2f}", f"{agreement.sqnr_db:.1f}", f"{agreement.max_rel_error:.3g}"]
                    if agreement else ["(reference)", "", ""])
        table.add_row(*row)
    console.print(table)
    if any(a.skipped for a in accuracies):
        console.print(f"{accuracies[0].skipped} unreadable images skipped")
