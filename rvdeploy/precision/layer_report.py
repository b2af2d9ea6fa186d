"""What INT8 did to each layer: its block, weight spread before and after equalization, calibrated
input range, SQNR alone in INT8, and the precision it ended in; as rows, and as a figure.

TensorRT names its layers after the ONNX node names, so a row's ``node`` also maps an engine's
layer (in a profile or a build log) back to its block.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from rvdeploy.compare import json_safe
from rvdeploy.files import atomic_output
from rvdeploy.precision.calib import QUANTIZED_OPS
from rvdeploy.precision.equalize import EqualizeReport, weight_spread
from rvdeploy.precision.rounding import Rounding

# rvdeploy's export names nodes after modules: /stage2/stage2.3/rbr_reparam/Conv, /stage0/rbr_reparam/Conv,
# /stage1/stage1.0/se/down/Conv (D2se), /linear/Gemm.
_STAGE_NODE = re.compile(r"/(stage\d+)(?:/(stage\d+\.\d+))?/(.+)/(?:Conv|Gemm)")
PRECISION_COLOURS = {"int8": "#4c72b0", "fp16": "#dd8452", "fp32": "#c44e52"}
SLOT_IN = 0.42  # inches per layer: room for a rotated block name under each pair of bars
LEGEND_IN = 3.0  # the y labels on the left and the legends on the right


def block_name(node: str) -> str:
    """The block a node belongs to (``stage2.3``, ``stage0``, ``stage1.0.se.down``, ``linear``); for a
    graph from elsewhere, the node name itself."""
    if node == "/linear/Gemm":
        return "linear"
    match = _STAGE_NODE.fullmatch(node)
    if not match:
        return node
    block = match.group(2) or match.group(1)
    module = match.group(3)
    return block if module == "rbr_reparam" else f"{block}.{module.replace('/', '.')}"


@dataclass(frozen=True)
class LayerRow:
    block: str
    node: str
    op: str
    weight_spread_before: float | None  # max/min over output channels of the channel's weight range, before equalization
    weight_spread_after: float | None  # after equalization (the same when the layer was not equalized)
    scale_min: float | None  # the range of the equalization scales its output channels were divided by
    scale_max: float | None  # (None: not equalized with a next layer)
    input_min: float | None  # the calibrated range of the layer's activation input
    input_max: float | None
    sqnr_db: float | None  # output SQNR against FP32 with only this layer in INT8 (None: not measured, or exact)
    precision: str  # int8, fp16 or fp32
    nearest_sqnr_db: float | None = None  # the layer's output SQNR against FP32 on sampled rows, weights rounded to nearest...
    adaptive_sqnr_db: float | None = None  # ... and by adaptive rounding fitted on other images (None: not rounded adaptively)

    def to_dict(self) -> dict:
        """JSON-ready: an infinite or NaN number (identical outputs, a channel of zeros) becomes None."""
        return json_safe(asdict(self))


def _input_ranges(ranges: dict) -> dict[str, tuple[float, float]]:
    """tensor → (lowest, highest) from the calibration's serialized form (its layout differs by method)."""
    from onnxruntime.quantization.calibrate import TensorsData

    return {name: (float(np.min(data.lowest)), float(np.max(data.highest)))
            for name, data in TensorsData.from_dict(ranges).items()}


def _scales(equalize_report: EqualizeReport | None, node: str) -> tuple[float | None, float | None]:
    """The range of the scales equalization divided ``node``'s output channels by (None: not a first layer)."""
    pair = next((p for p in equalize_report.pairs if p.first == node), None) if equalize_report else None
    return (pair.scale_min, pair.scale_max) if pair else (None, None)


def _weight_spread(weights: dict[str, onnx.TensorProto], node: onnx.NodeProto) -> float | None:
    if len(node.input) < 2 or node.input[1] not in weights:
        return None  # weights computed at run time
    values = numpy_helper.to_array(weights[node.input[1]])
    transposed = node.op_type == "Gemm" and not any(a.name == "transB" and a.i for a in node.attribute)
    return weight_spread(values.T if transposed else values)


def layer_rows(graph: onnx.ModelProto, ranges: dict, equalize_report: EqualizeReport | None,
               sqnr: dict[str, float], precisions: dict[str, str], rounding: Rounding | None = None) -> list[LayerRow]:
    """One row per Conv/Gemm of ``graph`` (the graph calibrated: equalized, or not), in graph order.

    ``ranges``: the calibration in onnxruntime's serialized form; ``equalize_report``: None when not
    equalized; ``sqnr``: each layer's SQNR alone (empty: not measured); ``precisions``: node → precision;
    ``rounding``: what adaptive rounding measured (None: rounded to nearest).
    """
    rounded = {layer.node: layer for layer in rounding.layers} if rounding else {}
    spreads = equalize_report.node_spreads if equalize_report else {}
    calibrated = _input_ranges(ranges)
    weights = {init.name: init for init in graph.graph.initializer}
    rows = []
    for node in graph.graph.node:
        if node.op_type not in QUANTIZED_OPS:
            continue
        if node.name in spreads:
            before, after = spreads[node.name]
        else:  # a layer equalization did not touch has one spread
            before = after = _weight_spread(weights, node)
        (scale_min, scale_max), (input_min, input_max) = _scales(equalize_report, node.name), calibrated.get(node.input[0], (None, None))
        rows.append(LayerRow(
            block=block_name(node.name), node=node.name, op=node.op_type, weight_spread_before=before,
            weight_spread_after=after, scale_min=scale_min, scale_max=scale_max, input_min=input_min,
            input_max=input_max, sqnr_db=sqnr.get(node.name), precision=precisions.get(node.name, "int8"),
            nearest_sqnr_db=rounded[node.name].nearest_sqnr_db if node.name in rounded else None,
            adaptive_sqnr_db=rounded[node.name].adaptive_sqnr_db if node.name in rounded else None,
        ))
    return rows


def build_layer_figure(rows: list[LayerRow], title: str):
    """Two panels over the layers: weight spread before/after equalization (log scale), and each
    layer's SQNR alone in INT8, coloured by the precision it ended in. Legends sit right of the panels
    and block names are rotated, so no text overlaps another."""
    # a bare Figure on an Agg canvas: no pyplot global state, so nothing leaks or needs closing
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    names = [r.block for r in rows]
    positions = range(len(rows))
    longest = max((len(n) for n in names), default=4)
    figure = Figure(figsize=(max(7.0, SLOT_IN * len(rows) + LEGEND_IN), 6.0 + 0.07 * longest), layout="constrained")
    spread_axes, sqnr_axes = figure.subplots(2, 1, sharex=True)
    width = 0.4
    spread_axes.bar([p - width / 2 for p in positions], [r.weight_spread_before or math.nan for r in rows], width,
                    color="#999999", label="before equalization")
    spread_axes.bar([p + width / 2 for p in positions], [r.weight_spread_after or math.nan for r in rows], width,
                    color="#55a868", label="after equalization")
    spread_axes.set_yscale("log")
    spread_axes.set_ylabel("weight range spread\n(max / min channel)")
    spread_axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    measured = [r.sqnr_db if r.sqnr_db is not None and math.isfinite(r.sqnr_db) else math.nan for r in rows]
    sqnr_axes.bar(positions, measured, 0.7, color=[PRECISION_COLOURS[r.precision] for r in rows])
    sqnr_axes.set_ylabel("output SQNR with only\nthis layer in INT8 (dB)")
    used = [p for p in PRECISION_COLOURS if any(r.precision == p for r in rows)]
    sqnr_axes.legend(handles=[Patch(color=PRECISION_COLOURS[p], label=f"runs in {p}") for p in used],
                     loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    sqnr_axes.set_xticks(list(positions), names, rotation=90, fontsize=8)
    sqnr_axes.set_xlim(-0.6, len(rows) - 0.4)
    spread_axes.set_title(title, fontsize=10)
    FigureCanvasAgg(figure)
    return figure


def plot_layers(rows: list[LayerRow], path: str | os.PathLike, title: str) -> None:
    """Render :func:`build_layer_figure` and write it atomically as PNG."""
    figure = build_layer_figure(rows, title)
    with atomic_output(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120)
    figure.clear()
