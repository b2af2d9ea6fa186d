"""Each command's recipe as one library call: what the CLI runs, and what a Python user calls.

    from rvdeploy import pipeline
    fused = pipeline.fuse_checkpoint("train.pth", "fused.pth", pipeline.LoadOptions(bn_eps=1e-3))
    plain = pipeline.fuse_graph("unfolded.onnx", "plain.onnx")       # any framework's multi-branch graph
    pipeline.export_model("train.pth", "model.onnx", pipeline.ExportOptions(input_size=(224, 224)))
    pipeline.quantize_model("model.onnx", "int8.onnx", pipeline.Int8Options(calib_dir="calib/"))
    pipeline.build("model.onnx", "model.engine", pipeline.BuildOptions(precision=pipeline.Fp16Options()))
    pipeline.evaluate_models(["model.onnx", "int8.onnx"], "val/", pipeline.EvalOptions(compare=True))
    pipeline.bench(["model.onnx"], pipeline.BenchOptions(settings=pipeline.BenchSettings(batches=(1, 8))))

Every function takes paths and a small options dataclass and returns a result object; user errors
are :class:`rvdeploy.errors.RvdeployError` subclasses carrying their exit code.
"""

from __future__ import annotations

import importlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from rvdeploy.arch import DEFAULT_BN_EPS
from rvdeploy.errors import RvdeployError
from rvdeploy.files import atomic_output
from rvdeploy.preprocess import Preprocess

if TYPE_CHECKING:
    from rvdeploy.bench import BenchSettings
    from rvdeploy.compare import Comparison
    from rvdeploy.engine.build import BuildResult, BuildSettings
    from rvdeploy.eval import Evaluation
    from rvdeploy.export import ExportOptions
    from rvdeploy.gate import GateResult
    from rvdeploy.graphfold import GraphFoldOptions, GraphFoldReport
    from rvdeploy.precision.fp16 import Fp16Report
    from rvdeploy.precision.fp16_file import Fp16Options
    from rvdeploy.precision.quantize import Int8Options, Int8Report
    from rvdeploy.reparam import PROBE_SIZE, FoldReport
    from rvdeploy.verify import VerifyReport
    from rvdeploy.weights import DeployWeights, TrainWeights

# Each stage is imported when its function runs: a graph fold never loads torch, and `rvdeploy --help`
# loads nothing heavy. The stages' option types are this module's attributes all the same (PEP 562).
_LAZY = {
    "BenchSettings": "rvdeploy.bench", "BuildSettings": "rvdeploy.engine.build", "ExportOptions": "rvdeploy.export",
    "Fp16Options": "rvdeploy.precision.fp16_file", "Int8Options": "rvdeploy.precision.quantize",
    "Int8Report": "rvdeploy.precision.quantize", "Fp16Report": "rvdeploy.precision.fp16",
    "GraphFoldOptions": "rvdeploy.graphfold", "GraphFoldReport": "rvdeploy.graphfold", "PROBE_SIZE": "rvdeploy.reparam",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BenchOptions", "BenchSettings", "BuildOptions", "BuildSettings", "EvalOptions", "ExportOptions", "Fp16Options", "Fp16Report",
    "GraphFoldOptions", "GraphFoldReport", "Int8Report",
    "Int8Options", "LoadOptions", "PROBE_SIZE", "bench", "build", "describe_checkpoint", "evaluate_models", "export_model",
    "fuse_checkpoint", "fuse_graph", "quantize_model", "verify_model",
]


@dataclass(frozen=True)
class LoadOptions:
    """How a checkpoint is read: what to check it against, and the BN epsilon it was trained with."""

    arch: str | None = None  # checked against the tensors; default inferred
    num_classes: int | None = None
    key: str | None = None  # the entry of a wrapped checkpoint that holds the weights
    bn_eps: float = DEFAULT_BN_EPS
    prefix: str | None = None  # a detector's backbone.: only the tensors under it, headless

    def load(self, path: str | os.PathLike) -> TrainWeights | DeployWeights:
        from rvdeploy.checkpoint import load_weights

        return load_weights(path, self.arch, self.num_classes, self.key, self.bn_eps, self.prefix)


# -- fuse, info, export, verify --------------------------------------------------------------
@dataclass
class FuseResult:
    train: TrainWeights
    deploy: DeployWeights
    report: FoldReport
    output: Path
    seconds: float


def fuse_checkpoint(checkpoint: str | os.PathLike, output: str | os.PathLike, load: LoadOptions = LoadOptions(),
                    probe_size: int | None = None) -> FuseResult:
    """Fold a training checkpoint, prove the fold block by block (on probes ``probe_size`` pixels
    wide, default :data:`rvdeploy.reparam.PROBE_SIZE`), write the fused checkpoint."""
    from rvdeploy.checkpoint import load_train_weights, save_deploy_weights
    from rvdeploy.reparam import PROBE_SIZE, fuse

    start = time.perf_counter()
    train = load_train_weights(checkpoint, load.arch, load.num_classes, load.key, load.bn_eps, load.prefix)
    deploy, report = fuse(train, probe_size=probe_size or PROBE_SIZE)
    save_deploy_weights(deploy, output)
    return FuseResult(train, deploy, report, Path(output), time.perf_counter() - start)


def fuse_graph(model: str | os.PathLike, output: str | os.PathLike, options: GraphFoldOptions | None = None) -> GraphFoldReport:
    """Fold the re-parameterizable branch groups of any ONNX graph, prove each group, write the plain graph."""
    from rvdeploy.graphfold import GraphFoldOptions, fold_onnx_file

    return fold_onnx_file(model, output, options or GraphFoldOptions())


def describe_checkpoint(checkpoint: str | os.PathLike, input_size: tuple[int, int] | None = None,
                        load: LoadOptions = LoadOptions()) -> dict:
    """Layout, architecture, parameters, MACs and each block's branches, as JSON-ready data."""
    from rvdeploy.weights import TrainWeights

    weights = load.load(checkpoint)
    spec = weights.spec
    size = input_size or (weights.preprocess.input_size if weights.preprocess else (224, 224))
    blocks = []
    for b in spec.blocks:
        branches = " + ".join(["3x3", "1x1"] + (["identity"] if b.has_identity else []))
        blocks.append({
            "name": b.name,
            "channels": f"{b.in_channels}→{b.out_channels}",
            "stride": str(b.stride),
            "groups": str(b.groups),
            "branches": branches + (f", SE {b.se_channels}" if b.se_channels else ""),
        })
    return {
        "path": str(checkpoint),
        "layout": weights.source.layout,
        "form": "train" if isinstance(weights, TrainWeights) else "deploy",
        "arch": spec.name,
        "arch_spec": spec.to_dict(),
        "num_classes": spec.num_classes,
        "input_size": list(size),
        "bn_eps": weights.bn_eps if isinstance(weights, TrainWeights) else None,
        "params": {"train": spec.param_count(False), "deploy": spec.param_count(True)},
        "macs": {"train": spec.macs(size, False), "deploy": spec.macs(size, True)},
        "blocks": blocks,
    }


@dataclass
class ExportResult:
    weights: TrainWeights | DeployWeights  # what was exported
    fold: FoldReport | None  # the fold done on the way, if any
    output: Path
    seconds: float


def export_model(checkpoint: str | os.PathLike, onnx_path: str | os.PathLike, options: ExportOptions | None = None,
                 load: LoadOptions = LoadOptions(), fold: bool = True) -> ExportResult:
    """Write the plain ONNX graph of a training (folded on the way) or fused checkpoint;
    ``fold=False`` writes a training checkpoint's multi-branch graph. ``options``: default ExportOptions()."""
    from rvdeploy.export import ExportOptions, export_onnx, feature_stages
    from rvdeploy.reparam import fuse
    from rvdeploy.weights import TrainWeights

    options = options or ExportOptions()
    start = time.perf_counter()
    weights = load.load(checkpoint)
    trained = isinstance(weights, TrainWeights)
    if not fold and not trained:
        raise RvdeployError(f"{checkpoint} is already fused: --no-fuse needs a training checkpoint")
    feature_stages(weights.spec, options)  # a headless net without --features: say so before the fold
    report = None
    if trained and fold:
        weights, report = fuse(weights)
    export_onnx(weights, onnx_path, options)
    return ExportResult(weights, report, Path(onnx_path), time.perf_counter() - start)


def verify_model(model: str | os.PathLike, checkpoint: str | os.PathLike | None = None,
                 load: LoadOptions = LoadOptions()) -> VerifyReport:
    """The graph checks, and with ``checkpoint`` ONNX Runtime against its torch net."""
    from rvdeploy.verify import verify

    return verify(model, load.load(checkpoint) if checkpoint else None)


# -- quantize, build -------------------------------------------------------------------------
def quantize_model(model: str | os.PathLike, output: str | os.PathLike,
                   options: Fp16Options | Int8Options) -> Fp16Report | Int8Report:
    """Write the FP16 or INT8 graph of the FP32 graph ``model``."""
    from rvdeploy.precision.fp16_file import quantize_fp16
    from rvdeploy.precision.quantize import Int8Options, quantize_int8_file

    if isinstance(options, Int8Options):
        return quantize_int8_file(model, output, options)
    return quantize_fp16(model, output, options)


@dataclass(frozen=True)
class BuildOptions:
    backend: str = "auto"  # tensorrt, tensorrt-rtx (or trt, rtx); auto prefers TensorRT
    settings: BuildSettings = field(default_factory=lambda: importlib.import_module("rvdeploy.engine.build").BuildSettings())
    force: bool = False  # rebuild even when the sidecar records an identical build
    precision: Fp16Options | Int8Options | None = None  # None: FP32


@dataclass
class BuildOutcome:
    build: BuildResult
    typed_graph: Path | None  # the FP16/INT8 graph compiled, kept next to the engine
    precision_report: Fp16Report | Int8Report | None


def build(model: str | os.PathLike, output: str | os.PathLike, options: BuildOptions | None = None) -> BuildOutcome:
    """Compile ``model`` to a TensorRT engine, after the precision step when one is asked for
    (``options``: default BuildOptions())."""
    from rvdeploy.engine.build import build_engine
    from rvdeploy.precision.quantize import Int8Options

    options = options or BuildOptions()
    model, output = Path(model), Path(output)
    if not model.is_file():
        raise RvdeployError(f"{model}: no such file")
    source, report = model, None
    if options.precision is not None:
        precision = "int8" if isinstance(options.precision, Int8Options) else "fp16"
        # The typed graph is kept next to the engine: OUT.onnx, unless that is MODEL itself.
        source = output.with_suffix(".onnx")
        if source.resolve() == model.resolve():
            source = output.with_suffix(f".{precision}.onnx")
        report = quantize_model(model, source, options.precision)
    result = build_engine(source, output, options.backend, options.settings, options.force)
    return BuildOutcome(result, source if source != model else None, report)


# -- eval, bench -----------------------------------------------------------------------------
@dataclass(frozen=True)
class EvalOptions:
    device: str = "cpu"
    batch: int = 64
    recipe: Preprocess | None = None  # overrides every model's own recipe
    allow_upscale: bool = False
    compare: bool = False  # also compare every model's logits with the first's
    bn_eps: float = DEFAULT_BN_EPS  # of training checkpoints
    show_progress: bool = False


@dataclass
class EvalResult:
    evaluations: list[Evaluation]
    agreements: list[Comparison | None] = field(default_factory=list)  # with --compare: each vs. the first

    def to_dict(self, data_dir: str) -> dict:
        results = []
        for i, e in enumerate(self.evaluations):
            row = e.accuracy.to_dict()
            if self.agreements:
                row["vs_first"] = self.agreements[i].to_dict() if self.agreements[i] else None
            results.append(row)
        return {"data": data_dir, "results": results}


def evaluate_models(models: list[str | os.PathLike], data_dir: str | os.PathLike,
                    options: EvalOptions = EvalOptions()) -> EvalResult:
    """Top-1 (and top-5) of each model on the labelled folder ``data_dir``."""
    from rvdeploy.data import labelled_folder
    from rvdeploy.eval import require_classifier, run_evaluation
    from rvdeploy.runners import open_runner

    if options.compare and len(models) < 2:
        raise RvdeployError("--compare needs two or more models")
    evaluations = []
    for path in models:
        with open_runner(path, device=options.device, bn_eps=options.bn_eps) as runner:
            require_classifier(runner)
            recipe = options.recipe or runner.preprocess
            if recipe is None:
                raise RvdeployError(f"{path} carries no preprocessing recipe: give --mean, --std and --input-size")
            images = labelled_folder(data_dir, recipe, options.allow_upscale)
            evaluations.append(run_evaluation(runner, images, recipe, options.batch, options.show_progress))
    agreements = [None] + [e.agreement(evaluations[0]) for e in evaluations[1:]] if options.compare else []
    return EvalResult(evaluations, agreements)


@dataclass(frozen=True)
class BenchOptions:
    backend: str | None = None  # default: by each target's kind
    settings: BenchSettings = field(default_factory=lambda: importlib.import_module("rvdeploy.bench").BenchSettings())
    json_out: str | os.PathLike | None = None
    plot: str | os.PathLike | None = None
    baseline: str | os.PathLike | None = None
    max_regression: float = 10.0  # percent, with a baseline
    normalize: str = "auto"  # auto | always | never
    progress: Callable[[str], None] | None = None


@dataclass
class BenchOutcome:
    report: dict
    gate: GateResult | None  # with a baseline

    @property
    def regressed(self) -> bool:
        return bool(self.gate and self.gate.regressions)


def bench(targets: list[str | os.PathLike], options: BenchOptions | None = None) -> BenchOutcome:
    """Time every target, write the JSON and plot asked for, and gate against the baseline
    (``options``: default BenchOptions())."""
    from rvdeploy.bench import bench_target, merge_reports
    from rvdeploy.gate import check_regression, load_baseline
    from rvdeploy.report import plot_latency

    options = options or BenchOptions()
    # Read the baseline first: a malformed one should not cost a whole run.
    baseline = load_baseline(options.baseline) if options.baseline is not None else None
    report = merge_reports([bench_target(t, options.backend, options.settings, options.progress) for t in targets])
    # Compared before anything is written: a baseline that matches nothing fails the command, outputs untouched
    # (a regression is a result: the report is written and the CLI exits 5).
    gate = check_regression(report, baseline, options.max_regression, options.normalize) if baseline else None
    if options.json_out:
        with atomic_output(options.json_out) as tmp:
            tmp.write_text(json.dumps(report, indent=2) + "\n")
    if options.plot:
        plot_latency(report, options.plot)
    return BenchOutcome(report, gate)
