"""ONNX export: the deploy network as a plain chain of 3x3 Conv + Relu, and its metadata.

The head is GlobalAveragePool → Flatten → Gemm; a backbone export (``features``) has no head and
gives the stage outputs ``stage1``..``stage4`` (``stage0``: the stem) as graph outputs instead. The
graph carries ``metadata_props`` (arch, class count, input size, preprocessing, provenance) that
later stages read instead of asking again.
The same weights and options give byte-identical files.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import onnx
import torch

from rvdeploy import __version__
from rvdeploy.arch import ArchSpec
from rvdeploy.errors import RvdeployError
from rvdeploy.onnx_io import save_onnx, with_min_ir_version, write_metadata
from rvdeploy.preprocess import Preprocess, imagenet_recipe
from rvdeploy.weights import DeployWeights, TrainWeights

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
BATCH_DIM = "batch"
DEFAULT_OPSET = 17  # TensorRT 11, TensorRT-RTX and onnxruntime all take it; Q/DQ per-channel needs >= 13
MIN_OPSET = 13
# torch's TorchScript exporter writes the canonical Conv/GlobalAveragePool/Flatten/Gemm graph up to here.
MAX_OPSET = 20


class ExportError(RvdeployError):
    """Export options or weights that cannot give a valid graph."""


@dataclass(frozen=True)
class ExportOptions:
    input_size: tuple[int, int] | None = None  # default: the recipe's, else 224x224
    batch: int | None = None  # None: a dynamic batch dimension
    opset: int = DEFAULT_OPSET
    features: tuple[int, ...] | None = None  # stages whose outputs the graph gives, no classifier

    def __post_init__(self) -> None:
        if not MIN_OPSET <= self.opset <= MAX_OPSET:
            raise ExportError(f"opset {self.opset} is not supported: choose {MIN_OPSET} to {MAX_OPSET} (default {DEFAULT_OPSET})")
        if self.batch is not None and self.batch < 1:
            raise ExportError(f"batch {self.batch} must be positive (or dynamic)")
        if self.input_size is not None and min(self.input_size) < 1:
            raise ExportError(f"input size {self.input_size} must be positive")
        if self.features is not None:
            if not self.features:
                raise ExportError("--features needs at least one stage, e.g. 1,2,3,4")
            if len(set(self.features)) != len(self.features):
                raise ExportError(f"--features {','.join(map(str, self.features))} names a stage twice")
            if min(self.features) < 0:
                raise ExportError(f"--features {','.join(map(str, self.features))}: stages are numbered from 0 (the stem)")


def feature_name(stage: int) -> str:
    return f"stage{stage}"


def feature_stages(spec: ArchSpec, options: ExportOptions) -> tuple[int, ...] | None:
    """The stages a backbone export of ``spec`` gives, sorted; None for a classifier export."""
    if options.features is None:
        if spec.headless:
            raise ExportError(f"{spec.name} is a headless backbone (no classifier): export its stage outputs with --features, e.g. 1,2,3,4")
        return None
    last = spec.num_stages - 1
    if max(options.features) > last:
        raise ExportError(f"--features {','.join(map(str, options.features))}: {spec.name} has stages 0 (the stem) to {last}")
    return tuple(sorted(options.features))


def _recipe(weights: TrainWeights | DeployWeights, size: tuple[int, int] | None) -> Preprocess:
    recipe = weights.preprocess or imagenet_recipe()
    return recipe if size is None or size == recipe.input_size else recipe.with_input_size(size)


def export_onnx(
    weights: TrainWeights | DeployWeights,
    path: str | os.PathLike,
    options: ExportOptions = ExportOptions(),
) -> Path:
    """Write ``weights`` as ONNX: the plain deploy graph, or the multi-branch one for training weights.

    The write is atomic; an existing file at ``path`` is replaced only by a complete graph.
    """
    fused = isinstance(weights, DeployWeights)
    spec = weights.spec
    recipe = _recipe(weights, options.input_size)
    height, width = recipe.input_size
    stages = feature_stages(spec, options)
    model = weights.to_module()  # the multi-branch one keeps the checkpoint's BN epsilon
    outputs = [feature_name(s) for s in stages] if stages else [OUTPUT_NAME]
    if stages:
        model.as_backbone(stages)
    example = torch.zeros(options.batch or 1, spec.in_channels, height, width)
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # the TorchScript exporter announces its deprecation
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            buffer,
            input_names=[INPUT_NAME],
            output_names=outputs,
            opset_version=options.opset,
            dynamic_axes=None if options.batch else {name: {0: BATCH_DIM} for name in [INPUT_NAME, *outputs]},
            do_constant_folding=True,
            dynamo=False,
        )
    graph = with_min_ir_version(onnx.load_from_string(buffer.getvalue()))
    graph.producer_name, graph.producer_version = "rvdeploy", __version__
    meta = {
        "arch": spec.name,
        "arch_spec": (replace(spec, num_classes=None) if stages else spec).to_dict(),
        "input_size": [height, width],
        "form": "fused" if fused else "multi-branch",
        "layers": spec.blocks_through(max(stages)) if stages else len(spec.blocks),
        "preprocess": recipe.to_dict(),
        "source_sha256": None,
        "rvdeploy_version": __version__,
    }
    # source: the file these weights were read from; for weights fused in memory, their training checkpoint.
    train_sha = weights.meta.get("source_sha256") if fused else None
    if weights.source is not None:
        meta["source_sha256"] = weights.source.sha256
        if train_sha and train_sha != weights.source.sha256:
            meta["train_source_sha256"] = train_sha
    else:
        meta["source_sha256"] = train_sha
    if stages:  # a backbone: no classifier, so no class count
        meta.update(features=list(stages), outputs=outputs)
    else:
        meta["num_classes"] = spec.num_classes
    if not fused:
        meta["bn_eps"] = weights.bn_eps
    write_metadata(graph, meta)
    return save_onnx(graph, path, full_check=True)
