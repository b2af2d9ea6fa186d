"""The accuracy guard: take the layers INT8 hurts most out of INT8, one at a time, until the graph is good enough.

Two limits, each usable alone or both together: ``min_sqnr_db``, the SQNR of the model outputs
against FP32 on held-out calibration images (no labels needed: :func:`held_out_split`), and
``max_top1_drop``, the top-1 drop in points on a labelled validation folder. Both rank layers the
same way, by their SQNR alone (:mod:`rvdeploy.precision.sensitivity`); labels only judge the
candidate graphs.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from rvdeploy.compare import json_safe
from rvdeploy.data import ImageSet, batches, pad_batch
from rvdeploy.errors import QuantizeError
from rvdeploy.precision.choices import HELD_OUT_SHARE, MAX_HELD_OUT, MIN_IMAGES_TO_HOLD_OUT
from rvdeploy.onnx_io import fixed_batch, ort_session, run_session
from rvdeploy.precision.mixed import MixedGraph
from rvdeploy.precision.sensitivity import FEED_BATCH, OutputProbe
from rvdeploy.preprocess import Preprocess

# FP32 recomputed in another order stays near 140 dB; FP16 alone reaches about 60-80 dB. A limit
# beyond this is no INT8 graph's, and a limit below 0 dB lets noise larger than the signal pass.
MAX_MIN_SQNR_DB = 100.0
# The label-free floor judges images that nothing was fitted on: a quarter of the calibration images
# (at most 32), where there are at least 8, picked at random with a fixed seed (a stride aliases with a
# folder whose images alternate in kind). Judged on the images the ranges, rounding and bias correction
# were fitted to, a graph scores what it learned by heart (YOLOv10n, 160 px, 16 crops: 29.2 dB there).


def held_out_split(images: ImageSet) -> tuple[ImageSet, ImageSet | None]:
    """The calibration images to fit on and those to judge on (:data:`rvdeploy.precision.choices.HELD_OUT_SHARE`), each in folder
    order; None to judge on: too few images to hold any out, so the fitted ones are judged."""
    if len(images) < MIN_IMAGES_TO_HOLD_OUT:
        return images, None
    count = min(MAX_HELD_OUT, round(len(images) * HELD_OUT_SHARE))
    held = set(np.random.default_rng(0).choice(len(images), count, replace=False).tolist())
    fitted = ImageSet([p for i, p in enumerate(images.paths) if i not in held], skipped=images.skipped)
    return fitted, ImageSet([p for i, p in enumerate(images.paths) if i in held])


def check_min_sqnr(value: float | None) -> None:
    """Refuse a label-free limit that is not a finite number of dB in [0, MAX_MIN_SQNR_DB] (0: no floor)."""
    if value is None:
        return
    if not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 <= value <= MAX_MIN_SQNR_DB:
        raise QuantizeError(f"--min-sqnr must be a number of dB from 0 (no floor) to {MAX_MIN_SQNR_DB:g} "
                            f"(FP16 alone reaches about 60-80 dB), got {value}")


class Top1Scorer:
    """Top-1 (percent) of graphs on labelled images (preprocessed once), with ONNX Runtime; the first
    output must be the logits."""

    def __init__(self, model: onnx.ModelProto, images: ImageSet, recipe: Preprocess, what: str | os.PathLike) -> None:
        fixed = fixed_batch(model)
        self.feeds, labels, self.rows = [], [], []
        for pixels, indices in batches(images, recipe, fixed or FEED_BATCH):
            self.feeds.append({model.graph.input[0].name: pad_batch(pixels, fixed) if fixed else pixels})
            self.rows.append(len(pixels))
            labels += [images.labels[i] for i in indices]
        self.labels, self.what = np.asarray(labels), what

    def top1(self, model: onnx.ModelProto) -> float:
        session = ort_session(model.SerializeToString(), name=f"a quantized graph of {self.what}")
        logits = np.concatenate([run_session(session, feed, self.what)[0][:rows] for feed, rows in zip(self.feeds, self.rows)])
        if logits.ndim != 2:
            raise QuantizeError(f"{self.what}: its first output has shape {logits.shape[1:]} per image, not logits: "
                                "the --val guard needs a classifier (use --min-sqnr)")
        return float((logits.argmax(1) == self.labels).mean() * 100)


@dataclass
class GuardReport:
    min_sqnr_db: float | None
    max_top1_drop: float | None
    int8_sqnr_db: float  # every layer in INT8
    final_sqnr_db: float
    fp32_top1: float | None = None  # with labels only
    int8_top1: float | None = None
    final_top1: float | None = None
    fallback: list[str] = field(default_factory=list)  # layers taken out of INT8, most sensitive first
    # with every layer out of INT8: the most the guard can reach (measured where all-INT8 missed a limit)
    ceiling_sqnr_db: float | None = None
    ceiling_top1: float | None = None
    out_of_reach: bool = False  # even that missed a limit: it is what is written
    steps: list[dict] = field(default_factory=list)  # each candidate measured: layers out, the last of them, sqnr_db, top1

    @property
    def met(self) -> bool:
        return _met(self.min_sqnr_db, self.max_top1_drop, self.final_sqnr_db, self.fp32_top1, self.final_top1)

    def to_dict(self) -> dict:
        return json_safe({**asdict(self), "met": self.met})


def _met(min_sqnr_db, max_top1_drop, sqnr, fp32_top1, top1) -> bool:
    sqnr_ok = min_sqnr_db is None or sqnr >= min_sqnr_db  # NaN fails
    top1_ok = max_top1_drop is None or fp32_top1 - top1 <= max_top1_drop
    return sqnr_ok and top1_ok


def fall_back_until_met(
    fp32: onnx.ModelProto,
    first: MixedGraph,
    ranking: Callable[[], list[str]],
    build: Callable[[tuple[str, ...]], MixedGraph],
    probe: OutputProbe,
    min_sqnr_db: float | None,
    max_top1_drop: float | None = None,
    scorer: Top1Scorer | None = None,
) -> tuple[MixedGraph, GuardReport]:
    """From ``first`` (every layer in INT8), ``build(fallback)`` for the shortest prefix ``fallback`` of
    ``ranking()`` (most sensitive layer first; asked for only when ``first`` misses a limit) that meets
    every limit given, and the guard's report. Every candidate is measured whole: the limits hold for
    the graph that is written, not an estimate.

    The prefix is found by doubling its length until a candidate meets the limits, then bisecting
    between the longest that missed and the shortest that met: about 2 log2(n) candidates instead of
    n. Taking a layer out of INT8 nearly always raises the output SQNR, so this finds the shortest
    prefix (or one a layer or two longer where the rise is not monotone); every candidate is in
    ``steps``. Before any of it, the candidate with every layer out: where even that misses a limit, it
    is returned at once (``out_of_reach``), without ranking the layers."""
    if (max_top1_drop is None) != (scorer is None):
        raise QuantizeError("the accuracy guard needs both --val and --max-top1-drop")
    report = GuardReport(min_sqnr_db, max_top1_drop, first.output_sqnr(probe), math.nan)
    report.final_sqnr_db = report.int8_sqnr_db
    if scorer is not None:
        report.fp32_top1 = scorer.top1(fp32)
        report.int8_top1 = report.final_top1 = scorer.top1(first.model)
    if report.met or not first.precisions:
        return first, report
    # First whether the limits can be met at all: where every layer out of INT8 misses them too (a graph that
    # amplifies FP16 rounding: RT-DETR-L with random weights, 17 dB), that graph is the answer, without the
    # sensitivity pass (a run of the graph per layer) or the search
    everything = build(tuple(first.precisions))
    report.ceiling_sqnr_db = everything.output_sqnr(probe)
    report.ceiling_top1 = scorer.top1(everything.model) if scorer else None
    if not _met(min_sqnr_db, max_top1_drop, report.ceiling_sqnr_db, report.fp32_top1, report.ceiling_top1):
        report.final_sqnr_db, report.final_top1 = report.ceiling_sqnr_db, report.ceiling_top1
        report.fallback = list(first.precisions)  # every layer, in graph order: none was ranked
        report.out_of_reach = True
        return everything, report
    order = ranking()
    shortest: list = []  # [layers out, candidate, sqnr, top1] of the shortest prefix that met (or of all layers out)

    def attempt(length: int) -> bool:
        candidate = everything if set(order[:length]) == set(first.precisions) else build(tuple(order[:length]))
        sqnr = candidate.output_sqnr(probe)
        top1 = (report.ceiling_top1 if candidate is everything else scorer.top1(candidate.model)) if scorer else None
        report.steps.append({"layers": length, "node": order[length - 1], "sqnr_db": sqnr, "top1": top1})
        if _met(min_sqnr_db, max_top1_drop, sqnr, report.fp32_top1, top1) or length == len(order):
            shortest[:] = [length, candidate, sqnr, top1]  # only shorter prefixes are tried after one that met
            return True
        return False

    missed, length = 0, 1  # the longest prefix known to miss (0: none out), the next to try
    while not attempt(min(length, len(order))):
        missed, length = length, 2 * length
    everything_misses = not _met(min_sqnr_db, max_top1_drop, shortest[2], report.fp32_top1, shortest[3])
    while shortest[0] - missed > 1 and not everything_misses:
        middle = (missed + shortest[0]) // 2
        if not attempt(middle):
            missed = middle
    length, candidate, report.final_sqnr_db, report.final_top1 = shortest
    report.fallback = list(order[:length])
    return candidate, report
