"""One vocabulary for the backends that run or build a model, and the artifact kinds that imply them.

Canonical names: ``torch``, ``onnxruntime``, ``tensorrt``, ``tensorrt-rtx``. The command line also
takes the short aliases ``ort``, ``trt`` and ``rtx``.
"""

from __future__ import annotations

import os
from pathlib import Path

from rvdeploy.errors import RvdeployError

BACKENDS = ("torch", "onnxruntime", "tensorrt", "tensorrt-rtx")
ALIASES = {"ort": "onnxruntime", "trt": "tensorrt", "rtx": "tensorrt-rtx"}
TENSORRT_BACKENDS = ("tensorrt", "tensorrt-rtx")
# The Python module each TensorRT flavour installs.
TENSORRT_MODULES = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx"}
INSTALL_HINT = {
    "tensorrt": "pip install 'rvdeploy[gpu]' (TensorRT 11, for data-center GPUs and Jetson)",
    "tensorrt-rtx": "pip install tensorrt-rtx-cu13 (TensorRT for RTX; builds ahead of time without a GPU)",
}
ONNX_SUFFIXES = (".onnx",)
ENGINE_SUFFIXES = (".engine", ".plan")


class BackendError(RvdeployError):
    """An unknown backend, or one that cannot take the given artifact."""


def canonical_backend(name: str) -> str:
    """``name`` in the canonical vocabulary; aliases accepted."""
    canonical = ALIASES.get(name, name)
    if canonical not in BACKENDS:
        choices = ", ".join(BACKENDS) + " (or " + ", ".join(ALIASES) + ")"
        raise BackendError(f"unknown backend {name!r}; choose {choices}")
    return canonical


def artifact_kind(path: str | os.PathLike) -> str:
    """``onnx``, ``engine`` or ``checkpoint``, by the file's suffix."""
    suffix = Path(path).suffix.lower()
    if suffix in ONNX_SUFFIXES:
        return "onnx"
    if suffix in ENGINE_SUFFIXES:
        return "engine"
    return "checkpoint"


# The backend each kind of artifact runs on by default (an engine's sidecar names its exact library).
DEFAULT_BACKEND = {"checkpoint": "torch", "onnx": "onnxruntime", "engine": "tensorrt"}
# What each backend runs.
RUNS = {"torch": "checkpoint", "onnxruntime": "onnx", "tensorrt": "engine", "tensorrt-rtx": "engine"}


def backend_for(path: str | os.PathLike, requested: str | None = None) -> str:
    """The backend that runs ``path``: ``requested`` (checked against the artifact), else the kind's default."""
    kind = artifact_kind(path)
    if requested is None:
        return DEFAULT_BACKEND[kind]
    backend = canonical_backend(requested)
    if RUNS[backend] != kind:
        needs = {"checkpoint": "a checkpoint", "onnx": "an .onnx graph", "engine": "an .engine file"}[RUNS[backend]]
        raise BackendError(f"backend {backend} needs {needs}, got {Path(path).name}")
    return backend
