"""What a measurement ran on: CPU or GPU, core and thread counts, library versions."""

from __future__ import annotations

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
