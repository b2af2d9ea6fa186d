"""``fuse``, ``info``, ``export`` and ``verify``: the checkpoint and plain-graph stages."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from rvdeploy.backends import artifact_kind
from rvdeploy.cli.options import SIZE, BatchType, bn_eps_option, feature_list, prefix_option
from rvdeploy.cli.render import console, key_value_table, millions, print_json, verdict
from rvdeploy.errors import VERIFY_FAILED_EXIT, RvdeployError

# Above this float32-vs-float64 difference a net's end-to-end comparison says nothing about a fold.
CHAOTIC_NOISE = 1e-3


# What only a checkpoint has: given with an ONNX input they would be silently ignored.
CHECKPOINT_ONLY = ("arch", "num_classes", "key", "bn_eps", "prefix")
FOLD_COUNTED_OPS = ("Conv", "Add", "BatchNormalization")


@click.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="Fused checkpoint to write (.pth, or .safetensors); the plain graph (.onnx) for an ONNX input.")
@click.option("--arch", help="Architecture name (e.g. RepVGG-A0); checked against the tensors. Default: inferred.")
@click.option("--num-classes", type=click.IntRange(min=1), help="Expected class count; checked against the classifier.")
@click.option("--key", help="Entry of a wrapped checkpoint that holds the weights (default: state_dict, model, ema...).")
@prefix_option
@bn_eps_option
@click.option("--probe-size", type=click.IntRange(min=8),
              help="Height and width of the self-check's probe images [default: 32 for a checkpoint; for an ONNX "
                   "input 64, where its size is dynamic].")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_context
def fuse(ctx: click.Context, checkpoint: Path, output: Path, arch, num_classes, key, prefix, bn_eps, probe_size, as_json) -> None:
    """Fold a multi-branch CHECKPOINT into plain 3x3 convs, prove the fold block by block, write OUTPUT.

    An ONNX CHECKPOINT (MODEL.onnx, from any framework) is folded in the graph: every group of
    parallel conv/BN/identity branches that are summed becomes one Conv, each group proven on its own.
    """
    from rvdeploy import pipeline
    if artifact_kind(checkpoint) == "onnx":
        given = [f"--{name.replace('_', '-')}" for name in CHECKPOINT_ONLY
                 if ctx.get_parameter_source(name) != click.core.ParameterSource.DEFAULT]
        if given:
            verb = "applies" if len(given) == 1 else "apply"
            raise RvdeployError(f"{', '.join(given)} only {verb} to checkpoints; {checkpoint.name} is an ONNX graph")
        _fuse_graph(checkpoint, output, probe_size, as_json)
        return
    load = pipeline.LoadOptions(arch, num_classes, key, bn_eps, prefix)
    result = pipeline.fuse_checkpoint(checkpoint, output, load, probe_size or pipeline.PROBE_SIZE)
    spec, report = result.train.spec, result.report
    if as_json:
        print_json({
            "input": str(checkpoint),
            "output": str(output),
            "layout": result.train.source.layout,
            "wrapper": result.train.source.wrapper,
            "prefix": prefix,
            "arch": spec.name,
            "num_classes": spec.num_classes,
            "bn_eps": bn_eps,
            "params_train": spec.param_count(deploy=False),
            "params_deploy": spec.param_count(deploy=True),
            "fold": report.to_dict(),
            "seconds": result.seconds,
        })
        return
    source = result.train.source
    console.print(key_value_table(f"rvdeploy fuse: {checkpoint.name} → {output.name}", [
        ("layout", source.layout + (f" (under '{source.wrapper}')" if source.wrapper else "")
                   + (f", backbone under '{prefix}'" if prefix else "")),
        ("architecture", f"{spec.name}, {_classes(spec.num_classes)}, {len(spec.blocks)} conv layers, BN eps {bn_eps:g}"),
        ("parameters", f"{millions(spec.param_count(False))} → {millions(spec.param_count(True))}"),
        ("probe", "x".join(map(str, report.probe_shape))),
        ("blocks proven", f"{len(report.blocks)}, float64, each on its own input; worst {report.worst_block}: "
                          f"error {report.worst_block_ratio:.2g} of its budget"),
        ("end to end", f"max abs {report.max_abs_error:.3g}, max rel {report.max_rel_error:.3g} "
                       f"(the multi-branch net's own float32 noise: {report.float32_noise_rel:.3g})"
                       + (": this net amplifies rounding on the probe, so the blocks decide"
                          if report.float32_noise_rel > CHAOTIC_NOISE else "")),
        ("self-check", verdict(report.passed)),
        ("time", f"{result.seconds:.2f} s"),
    ]))


def _classes(num_classes: int | None) -> str:
    return "no classifier (headless backbone)" if num_classes is None else f"{num_classes} classes"


def _fuse_graph(model: Path, output: Path, probe_size: int | None, as_json: bool) -> None:
    """``fuse MODEL.onnx``: the graph-level fold and its summary."""
    from rvdeploy import pipeline
    options = pipeline.GraphFoldOptions(probe_size=probe_size) if probe_size else pipeline.GraphFoldOptions()
    report = pipeline.fuse_graph(model, output, options)
    if as_json:
        print_json({"input": str(model), "output": str(output), **report.to_dict()})
        return
    if report.nothing_to_fold:
        console.print(f"{model.name}: nothing to fold (no parallel branches, norms or linear chains to merge, no values "
                      f"computed from constants alone); wrote it unchanged to {output}", highlight=False)
        return
    proof = report.proof
    rows = [
        ("groups folded", ", ".join(f"{n} {kind}" for kind, n in sorted(report.folded.items()))),
        *((op, f"{report.ops_before.get(op, 0)} → {report.ops_after.get(op, 0)}") for op in FOLD_COUNTED_OPS),
        ("left alone", str(len(report.left_alone)) if report.left_alone else "none"),
    ]
    if proof is not None:
        e2e = proof.end_to_end
        rows += [
            ("folded nodes proven", f"{len(proof.groups)} check{'s' if len(proof.groups) != 1 else ''}, against their original nodes in float64, each on its own input; "
                                    f"worst {proof.worst_group}: "
                              f"error {proof.worst_ratio:.2g} of its budget"),
            ("end to end", f"max abs {e2e.max_abs_error:.3g}, max rel {e2e.max_rel_error:.3g} (reported, not judged)"),
            ("self-check", verdict(proof.passed)),
        ]
    rows.append(("time", f"{report.total_seconds:.2f} s (the fold itself {report.seconds:.2f} s; load, proof and save the rest)"))
    console.print(key_value_table(f"rvdeploy fuse: {model.name} → {output.name}", rows))
    for left in report.left_alone:
        console.print(f"  left alone: {left.node}: {left.reason}", highlight=False)


@click.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--input-size", type=SIZE, help="Input size for MACs: S or HxW (default: the model's, else 224).")
@click.option("--key", help="Entry of a wrapped checkpoint that holds the weights.")
@prefix_option
@bn_eps_option
@click.option("--json", "as_json", is_flag=True, help="Print the description as JSON.")
def info(checkpoint: Path, input_size, key, prefix, bn_eps, as_json) -> None:
    """Describe a CHECKPOINT: layout, architecture, parameters, MACs and each block's branches."""
    from rvdeploy import pipeline
    data = pipeline.describe_checkpoint(checkpoint, input_size, pipeline.LoadOptions(key=key, bn_eps=bn_eps, prefix=prefix))
    if as_json:
        print_json(data)
        return
    spec = data["arch_spec"]
    h, w = data["input_size"]
    console.print(key_value_table(f"{checkpoint.name}: {data['arch']} ({data['form']} form, {data['layout']} layout)", [
        ("classes", _classes(data["num_classes"])),
        ("stages", f"depths {spec['depths']}, widths {spec['widths']}, stem {spec['stem_width']}"),
        ("parameters", f"train {millions(data['params']['train'])}, deploy {millions(data['params']['deploy'])}"),
        (f"GMACs @ {h}x{w}", f"train {data['macs']['train'] / 1e9:.3f}, deploy {data['macs']['deploy'] / 1e9:.3f}"),
    ]))
    blocks = Table("block", "channels", "stride", "groups",
                   "branches (train form)" if data["form"] == "train" else "branches (before fusing)")
    for b in data["blocks"]:
        blocks.add_row(b["name"], b["channels"], b["stride"], b["groups"], b["branches"])
    console.print(blocks)


@click.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--onnx", "onnx_path", type=click.Path(path_type=Path), required=True, help="ONNX file to write.")
@click.option("--input-size", type=SIZE, help="S, HxW or 'H W' (default: the model's recipe, else 224).")
@click.option("--batch", type=BatchType(), default="dynamic", show_default=True, help="'dynamic' or a fixed batch size.")
@click.option("--opset", type=int, default=17, show_default=True, help="ONNX opset (13-20).")
@click.option("--no-fuse", is_flag=True, help="Export the multi-branch training graph (to measure the fold's speed-up).")
@click.option("--features", callback=feature_list,
              help="Backbone export: these stages' outputs (e.g. 1,2,3,4; 0 is the stem) as graph outputs stage1.., no classifier.")
@click.option("--arch", help="Architecture name, checked against the tensors (training checkpoints).")
@click.option("--key", help="Entry of a wrapped checkpoint that holds the weights.")
@prefix_option
@bn_eps_option
def export(checkpoint: Path, onnx_path: Path, input_size, batch, opset, no_fuse, features, arch, key, prefix, bn_eps) -> None:
    """Export CHECKPOINT (training form, fused on the way, or already fused) to a plain ONNX graph."""
    from rvdeploy import pipeline
    # checked before any loading
    options = pipeline.ExportOptions(input_size=input_size, batch=batch, opset=opset, features=features)
    load = pipeline.LoadOptions(arch=arch, key=key, bn_eps=bn_eps, prefix=prefix)
    result = pipeline.export_model(checkpoint, onnx_path, options, load, fold=not no_fuse)
    if result.fold is not None:
        console.print(f"fused {result.weights.spec.name}: {len(result.fold.blocks)} blocks proven, end-to-end max rel "
                      f"error {result.fold.max_rel_error:.3g} (self-check passed)")
    outputs = f"outputs {', '.join(f'stage{s}' for s in sorted(features))}" if features else "logits"
    console.print(
        f"wrote {onnx_path} ({result.weights.form} {result.weights.spec.name}, {outputs}, opset {opset}, "
        f"batch {batch or 'dynamic'}, {onnx_path.stat().st_size / 1e6:.1f} MB) in {result.seconds:.2f} s"
    )


@click.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--checkpoint", type=click.Path(path_type=Path),
              help="Also run ONNX Runtime against this checkpoint's torch model (multi-branch when training form).")
@prefix_option
@bn_eps_option
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def verify(model: Path, checkpoint, prefix, bn_eps, as_json) -> None:
    """Check that MODEL is a plain RepVGG graph (exit 4 when it is not).

    A graph rvdeploy did not write gets the ONNX checker, an ONNX Runtime load and a lint: any
    re-parameterizable branch group left in it fails (exit 4) with the command that folds it.
    """
    from rvdeploy import pipeline
    report = pipeline.verify_model(model, checkpoint, pipeline.LoadOptions(bn_eps=bn_eps, prefix=prefix))
    if as_json:
        print_json(report.to_dict())
    else:
        if report.foreign:
            rows = [
                ("architecture", "unknown: not an rvdeploy export (no rvdeploy metadata)"),
                ("checks", "ONNX checker and ONNX Runtime load passed"),
                ("foldable structures left", str(report.foldable_groups) if report.foldable_groups else "[green]none[/green]"),
            ]
        else:
            rows = [
                ("architecture", report.arch or "unknown (no rvdeploy metadata)"),
                ("conv layers on the chain", f"{report.conv_layers}" + (f" of {report.expected_layers}" if report.expected_layers else "")),
                ("violations", str(len(report.violations)) if report.violations else "[green]none[/green]"),
            ]
        if len(report.outputs) > 1:
            rows.append(("outputs", ", ".join(report.outputs)))
        if report.parity:
            p = report.parity
            compared = f", {len(p.outputs)} outputs, worst {p.worst_output}" if len(p.outputs) > 1 else ""
            rows.append(("ONNX Runtime vs. torch", f"max abs {p.max_abs_error:.3g}, max rel {p.max_rel_error:.3g} "
                         f"(≤ {p.tolerance_rel:g}, batches {list(p.batches)}{compared}, vs. {p.reference}) {verdict(p.passed)}"))
        rows.append(("result", "[green]OK[/green]" if report.ok else "[red]FAILED[/red]"))
        console.print(key_value_table(f"rvdeploy verify: {model.name}", rows))
        for violation in report.violations:
            console.print(f"  [red]✗[/red] {violation}", highlight=False)
        if report.foreign and report.ok:
            console.print("not an rvdeploy export: checker + ONNX Runtime load passed, nothing left to fold", highlight=False)
    if not report.ok:
        raise click.exceptions.Exit(VERIFY_FAILED_EXIT)
