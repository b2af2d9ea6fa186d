"""Explicit-quantization INT8 graphs (QuantizeLinear/DequantizeLinear) from calibrated ranges.

onnxruntime's static quantizer places the Q/DQ nodes; these options make its output fit a target:

- ``tensorrt``: what TensorRT's explicit quantization accepts and fuses: symmetric int8 with zero
  point 0, per-channel weight scales on the output-channel axis, per-tensor activation scales, Q/DQ
  only on the inputs of Conv and Gemm (not their outputs), the bias left in float (the parser
  rejects an int32 DequantizeLinear).
- ``onnxruntime``: what ONNX Runtime on x86 CPUs runs fastest: uint8 activations (asymmetric), int8
  per-channel weights, Relu quantized too so that it folds into the Q/DQ between layers: each layer
  becomes one QLinearConv with no dequantize/requantize in between.

A layer's int8 weights can also be stored as uint8 with zero point 128 (:func:`encode_weights`):
the same grid, so the same products, but run by ONNX Runtime's uint8 x uint8 kernels, which do not
saturate on CPUs without VNNI (:data:`rvdeploy.machine.CPU_CLASSES`).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from rvdeploy.errors import QuantizeError
from rvdeploy.precision.choices import TARGETS
from rvdeploy.precision.calib import CALIBRATED_OPS, QUANTIZED_OPS, Calibration, method_enum, quiet_onnxruntime_tools



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
    unsigned_weights: frozenset[str] = frozenset(),
) -> onnx.ModelProto:
    """The Q/DQ graph of ``model_path`` for ``target``; excluded nodes stay float; the layers named in
    ``unsigned_weights`` store their weights as uint8 (onnxruntime layout only: :func:`encode_weights`)."""
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
        quantized = onnx.load(str(out))
    return encode_weights(quantized, unsigned_weights) if unsigned_weights else quantized


def encode_weights(model: onnx.ModelProto, unsigned: frozenset[str]) -> onnx.ModelProto:
    """A copy of the onnxruntime-layout ``model`` with the weights of the INT8 layers in ``unsigned``
    stored as uint8 with zero point 128 (q + 128), and those of every other INT8 layer as int8 with zero
    point 0. Exact both ways: the dequantized weights, and so the products, do not change."""
    encoded = onnx.ModelProto()
    encoded.CopyFrom(model)
    initializers = {init.name: init for init in encoded.graph.initializer}
    producers = {out: node for node in encoded.graph.node for out in node.output}
    wanted: dict[str, bool] = {}  # weight DequantizeLinear output → uint8; a shared weight goes uint8 if any reader does
    for node in encoded.graph.node:
        dq = producers.get(node.input[1]) if node.op_type in QUANTIZED_OPS and len(node.input) > 1 else None
        if dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] in initializers and len(dq.input) > 2:
            wanted[dq.output[0]] = wanted.get(dq.output[0], False) or node.name in unsigned
    shifted: set[str] = set()  # initializers re-encoded (each once: a zero point may be shared)
    for output, to_unsigned in wanted.items():
        dq = producers[output]
        values, zero = (numpy_helper.to_array(initializers[name]) for name in (dq.input[0], dq.input[2]))
        if to_unsigned and values.dtype == np.int8:
            shift, dtype = 128, np.uint8
        elif not to_unsigned and values.dtype == np.uint8 and (zero == 128).all():
            shift, dtype = -128, np.int8
        else:
            continue
        for name, array in ((dq.input[0], values), (dq.input[2], zero)):
            if name not in shifted:
                initializers[name].CopyFrom(numpy_helper.from_array((array.astype(np.int16) + shift).astype(dtype), name))
                shifted.add(name)
    return encoded
