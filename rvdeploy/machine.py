"""What a measurement ran on: CPU or GPU, core and thread counts, library versions."""

from __future__ import annotations

import functools
import os
import platform
from importlib import metadata


# The instruction sets ONNX Runtime's INT8 kernels gain most from: VNNI dot products (3.4x FP32 for
# A0 on a Zen 4) against AVX2 alone (about 2x). Every INT8 speed figure should say which are there.
INT8_FLAGS = ("avx2", "avx512_vnni", "avx_vnni")


def _cpu_info() -> tuple[str, list[str]]:
    """The CPU's model name and which of :data:`INT8_FLAGS` it has (from /proc/cpuinfo, where there is one)."""
    model, flags = None, set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model is None:
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return model or platform.processor() or platform.machine(), [f for f in INT8_FLAGS if f in flags]


# How ONNX Runtime's uint8 x int8 (u8s8) kernels add up on a CPU. "vnni": exactly (VNNI dot products on
# x86, dot-product instructions elsewhere). "avx2": through 16-bit sums of adjacent products that
# saturate (x86 without VNNI: AVX2, or AVX-512 without VNNI); uint8 x uint8 kernels do not saturate there.
CPU_CLASSES = ("vnni", "avx2")


@functools.cache
def cpu_int8_class() -> str:
    """This CPU's class (:data:`CPU_CLASSES`) as ONNX Runtime's kernels show it: one u8s8 product whose
    16-bit pair sums overflow (255*127 + 255*127 > 32767), run by ONNX Runtime. Measured rather than read
    from the flags, since what matters is the kernel ONNX Runtime picks (an emulator or a new build may differ)."""
    import numpy as np
    import onnx
    import onnxruntime
    from onnx import TensorProto, helper, numpy_helper

    depth = 64
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b", "a_zero", "b_zero"], ["y"])], "u8s8_probe",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [4, depth])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [4, 16])],
        [numpy_helper.from_array(np.full((depth, 16), 127, np.int8), "b"),
         numpy_helper.from_array(np.array(0, np.uint8), "a_zero"), numpy_helper.from_array(np.array(0, np.int8), "b_zero")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(model)
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    product = session.run(None, {"a": np.full((4, depth), 255, np.uint8)})[0]
    return "vnni" if (product == 255 * 127 * depth).all() else "avx2"


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def describe_machine() -> dict:
    import torch

    cpu, int8_flags = _cpu_info()
    info = {
        "cpu": cpu,
        "cpu_int8_flags": int8_flags,
        "cpu_int8_class": cpu_int8_class(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {
            name: version
            for name in ("rvdeploy", "torch", "onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt", "tensorrt-rtx-cu13")
            if (version := _version(name))
        },
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    return info
