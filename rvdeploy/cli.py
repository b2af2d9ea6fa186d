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

console = Console()
INTERNAL_ERROR_EXIT = 70


class RvdeployGroup(click.Group):
    """Turns every failure into one line on stderr and a non-zero exit status."""

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
@click.option("--input-size", type=click.IntRange(min=1), help="Input size for FLOPs (default: the model's, else 224).")
@click.option("--key", help="Entry of a wrapped checkpoint that holds the weights.")
@click.option("--json", "as_json", is_flag=True, help="Print the description as JSON.")
def info(checkpoint: Path, input_size, key, as_json) -> None:
    """Describe a CHECKPOINT: layout, architecture, parameters, FLOPs and each block's branches."""
    from rvdeploy.checkpoint import load_weights
    from rvdeploy.weights import TrainWeights

    weights = load_weights(checkpoint, key=key)
    spec = weights.spec
    fused = not isinstance(weights, TrainWeights)
    layout = "rvdeploy fused" if fused and "fold_error" in weights.meta else (
        "official deploy" if fused else weights.source.layout
    )
    size = input_size or (weights.preprocess.input_size if weights.preprocess else 224)
    data = {
        "path": str(checkpoint),
        "layout": layout,
        "form": "deploy" if fused else "train",
        "arch": spec.name,
        "arch_spec": spec.to_dict(),
        "num_classes": spec.num_classes,
        "input_size": size,
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
    table.add_row(f"GMACs @ {size}", f"train {data['macs']['train'] / 1e9:.3f}, deploy {data['macs']['deploy'] / 1e9:.3f}")
    console.print(table)
    blocks = Table("block", "channels", "stride", "groups", "branches (train form)" if not fused else "branches (before fusing)")
    for row in _block_rows(spec):
        blocks.add_row(*row)
    console.print(blocks)


if __name__ == "__main__":
    sys.exit(main())
