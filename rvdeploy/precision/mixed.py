"""The deployable INT8 graph with some layers taken out of INT8, in the precision the target runs them.

TensorRT runs a layer without Q/DQ in FP16 (in a strongly typed network: because its tensors are
FP16), so for the ``tensorrt`` target a fallback layer is typed FP16 in the graph: FP16 weights,
Cast nodes around it, its ReLU with it. It stays FP32 only where the FP32 graph's FP16 plan keeps it
FP32 (fp16.py: values beyond FP16's range or below its normal range on the calibration images, or in
the run of nodes its output SQNR floor keeps). ONNX Runtime on
CPUs has no FP16 kernels worth having: for the ``onnxruntime`` target a fallback layer is FP32.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import onnx
import onnx_graphsurgeon as gs

from rvdeploy.precision.calib import Calibration
from rvdeploy.precision.fp16 import convert_fp16
from rvdeploy.precision.int8 import quantizable_nodes, quantize_int8
from rvdeploy.precision.rounding import Rounding

if TYPE_CHECKING:
    from rvdeploy.precision.sensitivity import OutputProbe

PRECISIONS = ("int8", "fp16", "fp32")


@dataclass
class MixedGraph:
    model: onnx.ModelProto
    precisions: dict[str, str]  # Conv/Gemm node → "int8", "fp16" or "fp32"
    sqnr_db: float | None = None  # its output SQNR against FP32 on the calibration images, once measured

    def output_sqnr(self, probe: OutputProbe) -> float:
        """The output SQNR on ``probe``'s images: one pass over them, the first time only."""
        if self.sqnr_db is None:
            self.sqnr_db = probe.sqnr(self.model)
        return self.sqnr_db


def _with_activation(graph: gs.Graph, layers: set[str]) -> set[str]:
    """``layers`` and the Relu each feeds alone: TensorRT fuses Conv + bias + ReLU, so they share a precision."""
    names = set(layers)
    for node in graph.nodes:
        consumers = node.outputs[0].outputs if node.name in layers and node.outputs else []
        if len(consumers) == 1 and consumers[0].op == "Relu" and consumers[0].name:
            names.add(consumers[0].name)
    return names


def fallback_graph(graph_path: str | os.PathLike, calibration: Calibration, target: str, fallback: tuple[str, ...],
                   fp16_fp32: Callable[[], set[str]],
                   unsigned_weights: frozenset[str] = frozenset(), rounding: Rounding | None = None) -> MixedGraph:
    """The Q/DQ graph of ``graph_path`` with the ``fallback`` layers out of INT8, and each Conv/Gemm's
    precision ("int8", "fp16" or "fp32"). ``fp16_fp32`` gives the nodes the FP32 graph's FP16 plan
    keeps FP32 (:func:`rvdeploy.precision.fp16.plan_fp16`); it is called only when a layer falls back to FP16.
    ``unsigned_weights``: the INT8 layers whose weights are uint8 (onnxruntime layout); ``rounding``: the
    integers and biases adaptive rounding chose for the INT8 layers before any fallback layer (None: rounded to nearest)."""
    quantized = quantize_int8(graph_path, calibration, target, nodes_to_exclude=fallback, unsigned_weights=unsigned_weights)
    if rounding is not None:
        quantized = rounding.apply(quantized, fallback)
    precisions = {node: "fp32" if node in fallback else "int8" for node in quantizable_nodes(quantized)}
    if not fallback or target != "tensorrt":
        return MixedGraph(quantized, precisions)
    graph = gs.import_onnx(quantized)
    fp32 = fp16_fp32()
    fp16 = _with_activation(graph, set(fallback) - fp32) - fp32
    precisions.update({node: "fp16" for node in fallback if node in fp16})
    typed = convert_fp16(quantized, keep_fp32={n.name for n in graph.nodes} - fp16)
    return MixedGraph(typed, precisions)
