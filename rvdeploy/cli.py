"""The ``rvdeploy`` command line: parse options, call the library, print the result."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from rvdeploy import __version__
from rvdeploy.errors import RvdeployError
from rvdeploy.preprocess import parse_size

# Messages are not hard-wrapped and tables get room when piped: logs get whole lines.
console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 160)
INTERNAL_ERROR_EXIT = 70
VERIFY_FAILED_EXIT = 4


class RvdeployGroup(click.Group):
    """Turns every failure, usage errors included, into one line on stderr and a non-zero exit status."""

    def main(self, *args, **kwargs):
        kwargs["standalone_mode"] = False
        try:
            result = super().main(*args, **kwargs)
        except click.ClickException as exc:  # usage errors: bad option values, missing arguments
            click.echo(f"error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("error: aborted", err=True)
            sys.exit(1)
        sys.exit(result if isinstance(result, int) else 0)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except RvdeployError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            ctx.exit(130)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except Exception as exc:  # a bug: still one line, with a way to see the traceback
            if os.environ.get("RVDEPLOY_DEBUG"):
                raise
            first = str(exc).splitlines()[0] if str(exc) else ""
            click.echo(
                f"internal error: {type(exc).__name__}: {first} (set RVDEPLOY_DEBUG=1 for the traceback)",
                err=True,
            )
            ctx.exit(INTERNAL_ERROR_EXIT)


class SizeType(click.ParamType):
    """S, HxW, H,W or 'H W'."""

    name = "size"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            return parse_size(value)
        except RvdeployError as exc:
            self.fail(str(exc), param, ctx)


SIZE = SizeType()


@click.group(cls=RvdeployGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="rvdeploy")
def main() -> None:
    """RepVGG from training checkpoint to fast inference."""


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f} M"


def _print_json(data: dict) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True))


@main.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="Fused checkpoint to write (.pth, or .safetensors).")
@click.option("--arch", help="Architecture name (e.g. RepVGG-A0); checked against the tensors. Default: inferred.")
@click.option("--num-classes", type=click.IntRange(min=1), help="Expected class count; checked against the classifier.")
@click.option("--key", help="Entry of a wrapped checkpoint that holds the weights (default: state_dict, model, ema...).")
@click.option("--bn-eps", type=click.FloatRange(min=0, min_open=True), default=1e-5, show_default=True,
              help="BatchNorm epsilon the network was trained with.")
@click.option("--probe-size", type=click.IntRange(min=8), default=64, show_default=True,
              help="Height and width of the self-check's probe images.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def fuse(checkpoint: Path, output: Path, arch, num_classes, key, bn_eps, probe_size, as_json) -> None:
    """Fold a multi-branch CHECKPOINT into plain 3x3 convs, prove the fold, write OUTPUT."""
    from rvdeploy.checkpoint import load_train_weights, save_deploy_weights
    from rvdeploy.reparam import fuse as fuse_weights

    start = time.perf_counter()
    train = load_train_weights(checkpoint, arch=arch, num_classes=num_classes, key=key, bn_eps=bn_eps)
    deploy, report = fuse_weights(train, probe_size=probe_size)
    save_deploy_weights(deploy, output)
    seconds = time.perf_counter() - start
    spec = train.spec
    summary = {
        "input": str(checkpoint),
        "output": str(output),
        "layout": train.source.layout,
        "wrapper": train.source.wrapper,
        "arch": spec.name,
        "num_classes": spec.num_classes,
        "params_train": spec.param_count(deploy=False),
        "params_deploy": spec.param_count(deploy=True),
        "fold": report.to_dict(),
        "seconds": seconds,
    }
    if as_json:
        _print_json(summary)
        return
    table = Table(title=f"rvdeploy fuse: {checkpoint.name} → {output.name}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("layout", train.source.layout + (f" (under '{train.source.wrapper}')" if train.source.wrapper else ""))
    table.add_row("architecture", f"{spec.name}, {spec.num_classes} classes, {len(spec.blocks)} conv layers")
    table.add_row("parameters", f"{_millions(summary['params_train'])} → {_millions(summary['params_deploy'])}")
    table.add_row("probe", "x".join(map(str, report.probe_shape)))
    table.add_row("max abs error", f"{report.max_abs_error:.3g}")
    table.add_row("max rel error", f"{report.max_rel_error:.3g} (float32 explains ≤ {report.tolerance_rel:.3g})")
    table.add_row("float64 rel error", f"{report.float64_rel_error:.3g}")
    table.add_row("self-check", "[green]passed[/green]")
    table.add_row("time", f"{seconds:.2f} s")
    console.print(table)


def _block_rows(spec) -> list[tuple[str, ...]]:
    rows = []
    for b in spec.blocks:
        branches = ["3x3", "1x1"] + (["identity"] if b.has_identity else [])
        rows.append((
            b.name,
            f"{b.in_channels}→{b.out_channels}",
            str(b.stride),
            str(b.groups),
            " + ".join(branches) + (f", SE {b.se_channels}" if b.se_channels else ""),
        ))
    return rows


@main.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--input-size", type=SIZE, help="Input size for FLOPs: S or HxW (default: the model's, else 224).")
@click.option("--key", help="Entry of a wrapped checkpoint that holds the weights.")
@click.option("--json", "as_json", is_flag=True, help="Print the description as JSON.")
def info(checkpoint: Path, input_size, key, as_json) -> None:
    """Describe a CHECKPOINT: layout, architecture, parameters, FLOPs and each block's branches."""
    from rvdeploy.checkpoint import load_weights
    from rvdeploy.weights import TrainWeights

    weights = load_weights(checkpoint, key=key)
    spec = weights.spec
    fused = not isinstance(weights, TrainWeights)
    layout = weights.source.layout
    size = input_size or (weights.preprocess.input_size if weights.preprocess else (224, 224))
    data = {
        "path": str(checkpoint),
        "layout": layout,
        "form": "deploy" if fused else "train",
        "arch": spec.name,
        "arch_spec": spec.to_dict(),
        "num_classes": spec.num_classes,
        "input_size": list(size),
        "params": {"train": spec.param_count(False), "deploy": spec.param_count(True)},
        "macs": {"train": spec.macs(size, False), "deploy": spec.macs(size, True)},
        "blocks": [
            dict(zip(("name", "channels", "stride", "groups", "branches"), row))
            for row in _block_rows(spec)
        ],
    }
    if as_json:
        _print_json(data)
        return
    table = Table(title=f"{checkpoint.name}: {spec.name} ({data['form']} form, {layout} layout)", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("classes", str(spec.num_classes))
    table.add_row("stages", f"depths {list(spec.depths)}, widths {list(spec.widths)}, stem {spec.stem_width}")
    table.add_row("parameters", f"train {_millions(data['params']['train'])}, deploy {_millions(data['params']['deploy'])}")
    table.add_row(f"GMACs @ {size[0]}x{size[1]}", f"train {data['macs']['train'] / 1e9:.3f}, deploy {data['macs']['deploy'] / 1e9:.3f}")
    console.print(table)
    blocks = Table("block", "channels", "stride", "groups", "branches (train form)" if not fused else "branches (before fusing)")
    for row in _block_rows(spec):
        blocks.add_row(*row)
    console.print(blocks)


class BatchType(click.ParamType):
    """``dynamic`` or a positive integer."""

    name = "dynamic|N"

    def convert(self, value, param, ctx):
        if value is None or value == "dynamic" or isinstance(value, int):
            return None if value == "dynamic" else value
        try:
            batch = int(value)
        except ValueError:
            self.fail(f"{value!r} is neither 'dynamic' nor a number", param, ctx)
        if batch < 1:
            self.fail(f"{batch} must be positive", param, ctx)
        return batch


@main.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--onnx", "onnx_path", type=click.Path(path_type=Path), required=True, help="ONNX file to write.")
@click.option("--input-size", type=SIZE, help="S, HxW or 'H W' (default: the model's recipe, else 224).")
@click.option("--batch", type=BatchType(), default="dynamic", show_default=True, help="'dynamic' or a fixed batch size.")
@click.option("--opset", type=int, default=17, show_default=True, help="ONNX opset (13-20).")
@click.option("--no-fuse", is_flag=True, help="Export the multi-branch training graph (to measure the fold's speed-up).")
@click.option("--arch", help="Architecture name, checked against the tensors (training checkpoints).")
@click.option("--key", help="Entry of a wrapped checkpoint that holds the weights.")
def export(checkpoint: Path, onnx_path: Path, input_size, batch, opset, no_fuse, arch, key) -> None:
    """Export CHECKPOINT (training form, fused on the way, or already fused) to a plain ONNX graph."""
    from rvdeploy.checkpoint import load_weights
    from rvdeploy.export import ExportOptions, export_onnx
    from rvdeploy.reparam import fuse as fuse_weights
    from rvdeploy.weights import TrainWeights

    options = ExportOptions(input_size=input_size, batch=batch, opset=opset)  # checked before any loading
    start = time.perf_counter()
    weights = load_weights(checkpoint, arch=arch, key=key)
    trained = isinstance(weights, TrainWeights)
    if no_fuse and not trained:
        raise RvdeployError(f"{checkpoint} is already fused: --no-fuse needs a training checkpoint")
    if trained and not no_fuse:
        weights, report = fuse_weights(weights)
        console.print(f"fused {weights.spec.name}: max rel error {report.max_rel_error:.3g} (self-check passed)")
    export_onnx(weights, onnx_path, options)
    form = "multi-branch" if no_fuse else "fused"
    console.print(
        f"wrote {onnx_path} ({form} {weights.spec.name}, opset {opset}, batch {batch or 'dynamic'}, "
        f"{onnx_path.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - start:.2f} s"
    )


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--checkpoint", type=click.Path(path_type=Path),
              help="Also run ONNX Runtime against this checkpoint's torch model (multi-branch when training form).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def verify(model: Path, checkpoint, as_json) -> None:
    """Check that MODEL is a plain RepVGG graph (exit 4 when it is not)."""
    from rvdeploy.checkpoint import load_weights
    from rvdeploy.verify import verify as verify_graph

    weights = load_weights(checkpoint) if checkpoint else None
    report = verify_graph(model, weights)
    if as_json:
        _print_json(report.to_dict())
    else:
        table = Table(title=f"rvdeploy verify: {model.name}", show_header=False)
        table.add_column(style="bold")
        table.add_column()
        table.add_row("architecture", report.arch or "unknown (no rvdeploy metadata)")
        table.add_row("conv layers on the chain", f"{report.conv_layers}" + (f" of {report.expected_layers}" if report.expected_layers else ""))
        table.add_row("violations", str(len(report.violations)) if report.violations else "[green]none[/green]")
        if report.parity:
            p = report.parity
            verdict = "[green]passed[/green]" if p.passed else "[red]failed[/red]"
            table.add_row("ONNX Runtime vs. torch", f"max abs {p.max_abs_error:.3g}, max rel {p.max_rel_error:.3g} "
                          f"(≤ {p.tolerance_rel:g}, batches {list(p.batches)}, vs. {p.reference}) {verdict}")
        table.add_row("result", "[green]OK[/green]" if report.ok else "[red]FAILED[/red]")
        console.print(table)
        for violation in report.violations:
            console.print(f"  [red]✗[/red] {violation}", highlight=False)
    if not report.ok:
        raise click.exceptions.Exit(VERIFY_FAILED_EXIT)


def _floats3(ctx, param, value):
    if value is None:
        return None
    try:
        numbers = tuple(float(v) for v in value.replace(",", " ").split())
    except ValueError:
        raise click.BadParameter(f"{value!r} is not three numbers") from None
    if len(numbers) != 3:
        raise click.BadParameter(f"{value!r} must be three numbers (one per channel)")
    return numbers


def recipe_options(command):
    """--mean/--std/--input-size/--resize/--allow-upscale: the recipe for graphs without rvdeploy metadata."""
    for decorator in reversed([
        click.option("--mean", callback=_floats3, help="Per-channel mean, e.g. 0.485,0.456,0.406 (graphs without metadata)."),
        click.option("--std", callback=_floats3, help="Per-channel std, e.g. 0.229,0.224,0.225."),
        click.option("--input-size", "recipe_size", type=SIZE, help="Model input size S or HxW (graphs without metadata)."),
        click.option("--resize", type=click.IntRange(min=1), help="Shorter side before the centre crop (default: size / 0.875)."),
        click.option("--allow-upscale", is_flag=True, help="Accept images smaller than the model input."),
    ]):
        command = decorator(command)
    return command


def _recipe(mean, std, size, resize):
    from rvdeploy.preprocess import IMAGENET_CROP_RATIO, Preprocess

    given = [v is not None for v in (mean, std, size)]
    if not any(given) and resize is None:
        return None
    if not all(given):
        raise RvdeployError("a preprocessing recipe needs all of --mean, --std and --input-size")
    return Preprocess(size, resize or round(max(size) / IMAGENET_CROP_RATIO), mean, std)


def _precision_summary(report) -> str:
    kept = ", ".join(k.node for k in report.kept_fp32) or "none"
    return (f"FP16: {report.nodes_fp16} nodes in FP16; kept in FP32: {kept}; "
            f"{report.weights_flushed_to_zero} weights too small for FP16 (flushed to 0); "
            f"ranges checked on {report.observed_inputs} {report.observed_on}")


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Graph to write.")
@click.option("--fp16", "precision", flag_value="fp16", help="FP16 weights and compute.")
@click.option("--int8", "precision", flag_value="int8", help="Explicit Q/DQ INT8 (needs --calib).")
@click.option("--io-fp16", is_flag=True, help="FP16 model input and output too (default FP32).")
@click.option("--calib", "calib_dir", type=click.Path(path_type=Path), help="Folder of calibration images (JPEG/PNG, recursive).")
@click.option("--target", type=click.Choice(["tensorrt", "onnxruntime"]), default="tensorrt", show_default=True,
              help="Q/DQ layout: TensorRT's, or the one ONNX Runtime on x86 CPUs runs fastest.")
@click.option("--method", type=click.Choice(["entropy", "percentile", "minmax"]), default=None,
              help="Calibration method (default: minmax, the best measured on the shipped model).")
@click.option("--num-images", type=click.IntRange(min=1), help="Use the first N calibration images.")
@click.option("--calib-cache", type=click.Path(path_type=Path), help="JSON cache of calibration ranges.")
@click.option("--val", "val_dir", type=click.Path(path_type=Path), help="Validation folder (one sub-folder per class) for the accuracy guard.")
@click.option("--max-top1-drop", type=click.FloatRange(min=0), help="Accuracy guard: allowed top-1 drop in points.")
@recipe_options
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def quantize(model, output, precision, io_fp16, calib_dir, target, method, num_images, calib_cache, val_dir,
             max_top1_drop, mean, std, recipe_size, resize, allow_upscale, as_json) -> None:
    """Write an FP16 or INT8 (Q/DQ) graph of the FP32 ONNX MODEL."""
    from rvdeploy.precision.quantize import DEFAULT_METHOD, quantize_fp16, quantize_int8_file

    if precision is None:
        raise RvdeployError("choose --fp16 or --int8")
    recipe = _recipe(mean, std, recipe_size, resize)
    if precision == "fp16":
        report = quantize_fp16(model, output, io_fp16, calib_dir, num_images, recipe, allow_upscale)
        data = {"precision": "fp16", "output": str(output), **report.to_dict()}
        summary = _precision_summary(report)
    else:
        if calib_dir is None:
            raise RvdeployError("--int8 needs calibration images: --calib DIR")
        report = quantize_int8_file(model, output, calib_dir, target, method or DEFAULT_METHOD, num_images, calib_cache,
                                    recipe, allow_upscale, val_dir, max_top1_drop, show_progress=not as_json)
        data = {"precision": "int8", "output": str(output), **report.to_dict()}
        calibrated = "from the cache" if report.from_cache else f"in {report.calibration_seconds:.1f} s"
        summary = (f"INT8 ({report.target} layout, {report.method}): {report.quantized_nodes} layers quantized, "
                   f"calibrated on {report.calibration_images} images {calibrated}"
                   + (f", {report.skipped_images} unreadable images skipped" if report.skipped_images else ""))
        if report.guard:
            g = report.guard
            fallback = f"{len(g.fallback)} layers kept in FP32: {', '.join(g.fallback)}" if g.fallback else "no layer needed FP32"
            summary += (f"\naccuracy guard (≤ {g.max_top1_drop} points): FP32 top-1 {g.fp32_top1:.2f}%, all-INT8 "
                        f"{g.int8_top1:.2f}%, final {g.final_top1:.2f}%; {fallback}"
                        + ("" if g.met else "; the limit was not met"))
    if as_json:
        _print_json(data)
    else:
        console.print(summary, highlight=False)
        console.print(f"wrote {output}")


@main.command(name="eval")
@click.argument("models", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--data", "data_dir", type=click.Path(path_type=Path), required=True,
              help="Image folder with one sub-folder per class.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--batch", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--compare", is_flag=True, help="Compare the MODELS side by side (implied by more than one).")
@recipe_options
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def eval_command(models, data_dir, device, batch, compare, mean, std, recipe_size, resize, allow_upscale, as_json) -> None:
    """Top-1 (and top-5) of one or more MODELS (checkpoint, .onnx or .engine) on DATA.

    Several models (rvdeploy eval --compare A B C --data DIR) are compared side by side, with the
    drop against the first.
    """
    from rvdeploy.data import DataError, labelled_folder
    from rvdeploy.eval import evaluate
    from rvdeploy.runners import open_runner

    override = _recipe(mean, std, recipe_size, resize)
    results = []
    for path in models:
        with open_runner(path, device) as runner:
            recipe = override or runner.preprocess
            if recipe is None:
                raise DataError(f"{path} carries no preprocessing recipe: give --mean, --std and --input-size")
            images = labelled_folder(data_dir, recipe, allow_upscale)
            results.append(evaluate(runner, images, recipe, batch, show_progress=not as_json))
    if as_json:
        _print_json({"data": str(data_dir), "results": [r.to_dict() for r in results]})
        return
    has_top5 = any(r.top5 is not None for r in results)
    table = Table(title=f"accuracy on {data_dir} ({results[0].images} images)")
    for heading in ("model", "backend", "precision", "top-1 %", "Δ top-1") + (("top-5 %",) if has_top5 else ()):
        table.add_column(heading, justify="left" if heading in ("model", "backend", "precision") else "right",
                         overflow="fold")
    for r in results:
        row = [r.model, r.backend, r.precision, f"{r.top1:.2f}", f"{r.top1 - results[0].top1:+.2f}"]
        table.add_row(*row, *([f"{r.top5:.2f}" if r.top5 is not None else "-"] if has_top5 else []))
    console.print(table)
    if any(r.skipped for r in results):
        console.print(f"{results[0].skipped} unreadable images skipped")


@main.command(name="build-engine")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Engine file to write.")
@click.option("--fp16", "precision", flag_value="fp16", help="Build from the FP16 graph (made first, kept next to the engine).")
@click.option("--int8", "precision", flag_value="int8", help="Build from the INT8 Q/DQ graph (needs --calib).")
@click.option("--backend", type=click.Choice(["auto", "tensorrt", "tensorrt-rtx"]), default="auto", show_default=True,
              help="auto prefers TensorRT when it imports.")
@click.option("--min-batch", type=int, help="Smallest batch of the profile (default 1).")
@click.option("--opt-batch", type=int, help="Batch the builder optimises for (default 8).")
@click.option("--max-batch", type=int, help="Largest batch of the profile (default 32).")
@click.option("--workspace", type=float, help="Builder workspace limit in MB.")
@click.option("--timing-cache", type=click.Path(path_type=Path), help="Timing cache file (read and updated; TensorRT only).")
@click.option("--opt-level", type=int, help="Builder optimisation level 0-5.")
@click.option("--tf32", is_flag=True, help="Allow TF32 for FP32 layers (off: FP32 engines match ONNX Runtime).")
@click.option("--force", is_flag=True, help="Rebuild even when the sidecar shows an identical build.")
@click.option("--io-fp16", is_flag=True, help="With --fp16: FP16 input and output too.")
@click.option("--calib", "calib_dir", type=click.Path(path_type=Path), help="With --int8: calibration images.")
@click.option("--method", type=click.Choice(["entropy", "percentile", "minmax"]), help="With --int8: calibration method.")
@click.option("--num-images", type=click.IntRange(min=1), help="With --int8: use the first N calibration images.")
@click.option("--calib-cache", type=click.Path(path_type=Path), help="With --int8: cache of calibration ranges.")
@click.option("--val", "val_dir", type=click.Path(path_type=Path), help="With --int8: validation folder for the accuracy guard.")
@click.option("--max-top1-drop", type=click.FloatRange(min=0), help="With --int8: allowed top-1 drop in points.")
@click.option("--allow-upscale", is_flag=True, help="Accept calibration images smaller than the model input.")
@click.option("--json", "as_json", is_flag=True, help="Print the sidecar as JSON.")
def build_engine_command(model, output, precision, backend, min_batch, opt_batch, max_batch, workspace, timing_cache,
                         opt_level, tf32, force, io_fp16, calib_dir, method, num_images, calib_cache, val_dir,
                         max_top1_drop, allow_upscale, as_json) -> None:
    """Build a TensorRT engine of MODEL (FP32, or FP16 / INT8 after the precision step)."""
    from rvdeploy.engine.build import BuildSettings, build_engine
    from rvdeploy.precision.quantize import DEFAULT_METHOD, quantize_fp16, quantize_int8_file

    if workspace is not None and workspace <= 0:
        raise RvdeployError(f"--workspace must be a positive number of MB, got {workspace:g}")
    settings = BuildSettings(min_batch, opt_batch, max_batch, None if workspace is None else max(1, round(workspace)),
                             opt_level, tf32, str(timing_cache) if timing_cache else None)
    if not Path(model).is_file():
        raise RvdeployError(f"{model}: no such file")
    source = model
    if precision:
        # The typed graph is kept next to the engine: OUT.onnx, unless that is MODEL itself.
        source = output.with_suffix(".onnx")
        if source.resolve() == Path(model).resolve():
            source = output.with_suffix(f".{precision}.onnx")
    if precision == "fp16":
        quantize_fp16(model, source, io_fp16, calib_dir, num_images, None, allow_upscale)
    elif precision == "int8":
        if calib_dir is None:
            raise RvdeployError("--int8 needs calibration images: --calib DIR")
        quantize_int8_file(model, source, calib_dir, "tensorrt", method or DEFAULT_METHOD, num_images, calib_cache, None,
                           allow_upscale, val_dir, max_top1_drop, show_progress=not as_json)
    result = build_engine(source, output, backend, settings, force)
    if as_json:
        _print_json({"skipped": result.skipped, **result.sidecar})
        return
    side = result.sidecar
    if result.skipped:
        console.print(f"{output} is up to date (identical build recorded in {output.name}.json); --force rebuilds it")
        return
    where = f"on {side['gpu']['name']}" if side["gpu"] else "ahead of time, without a GPU"
    profile = side["profiles"][0]
    console.print(
        f"built {output} ({side['precision']}, {side['backend']} {side['library_version']}, batch "
        f"{profile['min'][0]}..{profile['max'][0]} opt {profile['opt'][0]}, {side['engine_bytes'] / 1e6:.1f} MB) "
        f"{where} in {side['build_seconds']:.2f} s" + (f"; typed graph {source}" if source != model else ""),
        highlight=False,
    )


def _batches(ctx, param, value):
    try:
        batches = tuple(int(b) for b in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of batch sizes") from None
    if not batches or min(batches) < 1:
        raise click.BadParameter(f"{value!r}: batch sizes must be positive")
    return batches


@main.command()
@click.argument("targets", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--backend", type=click.Choice(["torch", "ort", "trt"]),
              help="torch (checkpoint), ort (.onnx) or trt (.engine; on the GPU). Default: by each TARGET's kind.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--batch", "batches", default="1,8,32", show_default=True, callback=_batches, help="Comma-separated batch sizes.")
@click.option("--warmup-s", type=click.FloatRange(min=0), default=1.0, show_default=True)
@click.option("--min-s", type=click.FloatRange(min=0), default=3.0, show_default=True, help="Timed seconds per configuration (at least).")
@click.option("--iters", type=click.IntRange(min=1), default=20, show_default=True, help="Timed iterations per configuration (at least).")
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads (torch and ONNX Runtime).")
@click.option("--input-size", type=SIZE, help="Input size (default: the model's, else 224).")
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="Write the results as JSON here.")
@click.option("--markdown", is_flag=True, help="Print the table as markdown.")
@click.option("--plot", type=click.Path(path_type=Path), help="Write a throughput bar chart (PNG).")
@click.option("--baseline", type=click.Path(path_type=Path), help="Bench JSON to compare p50 latencies against.")
@click.option("--max-regression", type=click.FloatRange(min=0), default=10.0, show_default=True,
              help="With --baseline: fail (exit 5) when a p50 is slower by more than this percentage.")
@click.option("--normalize", type=click.Choice(["auto", "always", "never"]), default="auto", show_default=True,
              help="Compare latencies divided by the reference workload's: auto when the baseline is from another machine.")
def bench(targets, backend, device, batches, warmup_s, min_s, iters, threads, input_size, json_out, markdown, plot,
          baseline, max_regression, normalize) -> None:
    """Latency and throughput of each TARGET, trtexec-style, in one table; optionally gated against a baseline.

    A training checkpoint on torch is timed both multi-branch and fused, with the speed-up.
    """
    from rvdeploy.bench import (REGRESSION_EXIT, BenchError, BenchSettings, backend_for, bench_target, compare,
                                markdown_table, merge_reports, plot_throughput, validate_report)
    from rvdeploy.files import atomic_output

    settings = BenchSettings(batches, warmup_s, min_s, iters, threads, input_size)
    base = None
    if baseline is not None:  # read it first: a malformed baseline should not cost a whole run
        try:
            base = validate_report(json.loads(Path(baseline).read_text()), str(baseline))
        except FileNotFoundError:
            raise BenchError(f"baseline {baseline}: no such file") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BenchError(f"baseline {baseline} is not JSON ({exc})") from None
    err = Console(stderr=True)
    report = merge_reports([
        bench_target(target, backend or backend_for(target), device, settings,
                     progress=lambda what: err.print(f"timing {what}", highlight=False))
        for target in targets
    ])
    if json_out:
        with atomic_output(json_out) as tmp:
            tmp.write_text(json.dumps(report, indent=2) + "\n")
    if plot:
        plot_throughput(report, plot)
    machine = report["machine"]
    console.print(f"machine: {machine.get('gpu') or machine['cpu']}, {machine['cpu_cores']} cores, "
                  f"threads {threads or 'default'}; " + ", ".join(f"{k} {v}" for k, v in machine["versions"].items()), highlight=False)
    if markdown:
        click.echo(markdown_table(report))
    else:
        table = Table(title=f"rvdeploy bench: {', '.join(Path(t).name for t in targets)}")
        gpu = any(r["gpu_compute_ms"] for r in report["results"])
        for heading in ("model", "variant", "backend", "precision", "batch", "min ms", "mean ms", "p50 ms", "p90 ms", "p99 ms", "img/s") + (("GPU p50 ms",) if gpu else ()):
            table.add_column(heading, justify="right" if "ms" in heading or heading in ("batch", "img/s") else "left")
        for r in report["results"]:
            lat = r["latency_ms"]
            table.add_row(r["model"], r["variant"], r["backend"], r["precision"], str(r["batch"]), *(f"{lat[k]:.3f}" for k in ("min", "mean", "p50", "p90", "p99")),
                          f"{r['throughput_ips']:.1f}", *((f"{r['gpu_compute_ms']['p50']:.3f}" if r["gpu_compute_ms"] else "-",) if gpu else ()))
        console.print(table)
    for s in report.get("speedups", []):
        console.print(f"fused vs. multi-branch, batch {s['batch']}: {s['fused_vs_multi_branch']:.2f}x faster", highlight=False)
    if base is None:
        return
    comparison = compare(report, base, max_regression, normalize)
    kind = "normalised p50 (p50 / reference workload p50)" if comparison.normalized else "p50 ms"
    table = Table(title=f"against {baseline}: {kind}, fail above +{max_regression:g}%")
    for heading in ("configuration", "baseline", "now", "change"):
        table.add_column(heading, justify="left" if heading == "configuration" else "right")
    for d in comparison.deltas:
        style = "red" if d in comparison.regressions else ""
        table.add_row(d.name, f"{d.baseline_p50:.4g}", f"{d.current_p50:.4g}", f"[{style}]{d.change_pct:+.1f}%[/{style}]" if style else f"{d.change_pct:+.1f}%")
    console.print(table)
    if comparison.unmatched:
        console.print(f"not in the baseline: {', '.join(comparison.unmatched)}", highlight=False)
    if comparison.regressions:
        worst = max(comparison.regressions, key=lambda d: d.change_pct)
        click.echo(f"error: latency regression: {worst.name} is {worst.change_pct:+.1f}% (limit +{max_regression:g}%)", err=True)
        raise click.exceptions.Exit(REGRESSION_EXIT)


if __name__ == "__main__":
    sys.exit(main())
