"""Explicit-quantization INT8 graphs (QuantizeLinear/DequantizeLinear) from calibrated ranges.

onnxruntime's static quantizer places the Q/DQ nodes; these options make its output fit a target:

- ``tensorrt``: what TensorRT's explicit quantization accepts and fuses: symmetric int8 with zero
  point 0, per-channel weight scales on the output-channel axis, per-tensor activation scales, Q/DQ
  only on the inputs of Conv and Gemm (not their outputs), the bias left in float (the parser
  rejects an int32 DequantizeLinear).
- ``onnxruntime``: what ONNX Runtime on x86 CPUs runs fastest: uint8 activations (asymmetric), int8
  per-channel weights, Relu quantized too so that it folds into the Q/DQ between layers: each layer
  becomes one QLinearConv with no dequantize/requantize in between.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import onnx

from rvdeploy.errors import QuantizeError
from rvdeploy.precision.calib import CALIBRATED_OPS, QUANTIZED_OPS, Calibration, method_enum, quiet_onnxruntime_tools

TARGETS = ("tensorrt", "onnxruntime")


@dataclass(frozen=True)
class TargetOptions:
    activation_type: str  # onnxruntime QuantType name
    weight_type: str
    op_types: tuple[str, ...]
    extra_options: dict


def target_options(target: str) -> TargetOptions:
    if target == "tensorrt":
        return TargetOptions("QInt8", "QInt8", QUANTIZED_OPS, {
            "ActivationSymmetric": True,
            "WeightSymmetric": True,
            "QuantizeBias": False,
            "OpTypesToExcludeOutputQuantization": list(QUANTIZED_OPS),
            # Keep Relu as a real node: TensorRT fuses Conv + bias + ReLU itself.
            "QDQKeepRemovableActivations": True,
        })
    if target == "onnxruntime":
        return TargetOptions("QUInt8", "QInt8", CALIBRATED_OPS, {"ActivationSymmetric": False, "WeightSymmetric": True})
    raise QuantizeError(f"unknown INT8 target {target!r}; choose {', '.join(TARGETS)}")


def quantizable_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes an INT8 graph quantizes (Conv and Gemm), in graph order."""
    return [n.name for n in model.graph.node if n.op_type in QUANTIZED_OPS]


def quantize_int8(
    model_path: str | Path,
    calibration: Calibration,
    target: str,
    nodes_to_exclude: tuple[str, ...] = (),
    nodes_to_quantize: tuple[str, ...] = (),
) -> onnx.ModelProto:
    """The Q/DQ graph of ``model_path`` for ``target``; excluded nodes stay float."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    options = target_options(target)
    with tempfile.TemporaryDirectory(prefix="rvdeploy-int8-") as tmp, quiet_onnxruntime_tools():
        ranges = Path(tmp) / "ranges.json"
        ranges.write_text(json.dumps(calibration.ranges))
        out = Path(tmp) / "int8.onnx"
        quantize_static(
            str(model_path),
            str(out),
            calibration_data_reader=None,
            calibration_cache_path=str(ranges),  # ranges measured (or cached) by rvdeploy.precision.calib
            calibrate_method=method_enum(calibration.method),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(options.op_types),
            per_channel=True,
            reduce_range=False,
            activation_type=QuantType[options.activation_type],
            weight_type=QuantType[options.weight_type],
            nodes_to_exclude=list(nodes_to_exclude),
            nodes_to_quantize=list(nodes_to_quantize),
            extra_options=options.extra_options,
        )
        return onnx.load(str(out))
