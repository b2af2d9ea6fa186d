"""The accuracy guard: find the layers INT8 hurts most and leave them in FP32 until the drop is acceptable.

Each quantizable layer is quantized alone and measured on the validation images (top-1, and the
relative error of its logits against FP32, which ranks layers the top-1 cannot tell apart). Then
the most sensitive layers fall back to FP32 one at a time until the fully quantized rest is within
the allowed top-1 drop.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx

from rvdeploy.compare import relative_error
from rvdeploy.data import ImageSet
from rvdeploy.eval import predictions
from rvdeploy.precision.calib import Calibration
from rvdeploy.precision.int8 import quantizable_nodes, quantize_int8
from rvdeploy.preprocess import Preprocess
from rvdeploy.progress import progress_bar
from rvdeploy.runners import OrtRunner


@dataclass(frozen=True)
class LayerSensitivity:
    node: str
    top1: float  # percent, with only this layer quantized
    logit_error: float  # max |logits - FP32 logits| / max |FP32 logits|


@dataclass
class GuardReport:
    max_top1_drop: float
    fp32_top1: float
    int8_top1: float  # every layer quantized
    final_top1: float
    fallback: list[str] = field(default_factory=list)  # layers left in FP32, most sensitive first
    steps: list[dict] = field(default_factory=list)  # top-1 after each fallback
    sensitivities: list[LayerSensitivity] = field(default_factory=list)

    @property
    def met(self) -> bool:
        return self.fp32_top1 - self.final_top1 <= self.max_top1_drop

    def to_dict(self) -> dict:
        data = asdict(self)
        data["met"] = self.met
        return data


class _Scorer:
    """Top-1 and logits of graphs on the validation images, against the FP32 graph's logits."""

    def __init__(self, images: ImageSet, recipe: Preprocess, tmp: Path) -> None:
        self.images, self.recipe, self.tmp = images, recipe, tmp
        self.reference: np.ndarray | None = None
        self.labels: np.ndarray | None = None

    def logits(self, model: onnx.ModelProto | Path) -> np.ndarray:
        path = model if isinstance(model, Path) else self.tmp / "candidate.onnx"
        if not isinstance(model, Path):
            path.write_bytes(model.SerializeToString())
        with OrtRunner(path) as runner:
            logits, kept = predictions(runner, self.images, self.recipe)
        if self.labels is None:
            self.labels = np.asarray([self.images.labels[i] for i in kept])
        return logits

    def top1(self, logits: np.ndarray) -> float:
        return float((logits.argmax(1) == self.labels).mean() * 100)

    def logit_error(self, logits: np.ndarray) -> float:
        return relative_error(logits, self.reference)


def guard(model_path: Path, calibration: Calibration, target: str, images: ImageSet, recipe: Preprocess,
          max_top1_drop: float, show_progress: bool = True) -> tuple[tuple[str, ...], GuardReport]:
    """The nodes to keep in FP32 so that INT8 loses at most ``max_top1_drop`` top-1 points on ``images``."""
    with tempfile.TemporaryDirectory(prefix="rvdeploy-guard-") as tmp:
        scorer = _Scorer(images, recipe, Path(tmp))
        scorer.reference = scorer.logits(model_path)
        fp32_top1 = scorer.top1(scorer.reference)
        int8_top1 = scorer.top1(scorer.logits(quantize_int8(model_path, calibration, target)))
        report = GuardReport(max_top1_drop, fp32_top1, int8_top1, int8_top1)
        if report.met:
            return (), report
        nodes = quantizable_nodes(onnx.load(str(model_path), load_external_data=False))
        with progress_bar(show_progress) as progress:
            task = progress.add_task("layer sensitivity", total=len(nodes))
            for node in nodes:
                logits = scorer.logits(quantize_int8(model_path, calibration, target, nodes_to_quantize=(node,)))
                report.sensitivities.append(LayerSensitivity(node, scorer.top1(logits), scorer.logit_error(logits)))
                progress.advance(task)
        ranked = sorted(report.sensitivities, key=lambda s: (s.top1, -s.logit_error))
        for layer in ranked:
            report.fallback.append(layer.node)
            candidate = quantize_int8(model_path, calibration, target, nodes_to_exclude=tuple(report.fallback))
            report.final_top1 = scorer.top1(scorer.logits(candidate))
            report.steps.append({"fp32_layers": len(report.fallback), "node": layer.node, "top1": report.final_top1})
            if report.met:
                break
        return tuple(report.fallback), report
