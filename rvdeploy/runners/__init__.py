"""Runners: one life cycle over torch, ONNX Runtime and TensorRT.

``with open_runner(path, ...) as r:`` picks the runner for the artifact's kind from one registry
(a checkpoint → torch, ``.onnx`` → ONNX Runtime, ``.engine`` → TensorRT), acquires it on entry and
releases it on exit.
"""

from __future__ import annotations

import os
from pathlib import Path

from rvdeploy.backends import backend_for
from rvdeploy.runners.base import Runner, RunnerError, RunnerOptions
from rvdeploy.runners.ort_runner import OrtRunner
from rvdeploy.runners.tensorrt_runner import TensorRTRunner
from rvdeploy.runners.torch_runner import TorchRunner

RUNNERS: dict[str, type[Runner]] = {
    "torch": TorchRunner,
    "onnxruntime": OrtRunner,
    "tensorrt": TensorRTRunner,
    "tensorrt-rtx": TensorRTRunner,
}

__all__ = ["RUNNERS", "OrtRunner", "Runner", "RunnerError", "RunnerOptions", "TensorRTRunner", "TorchRunner", "open_runner"]


def open_runner(path: str | os.PathLike, backend: str | None = None, **options) -> Runner:
    """The (not yet active) runner for ``path``; ``backend`` defaults to the artifact's kind.

    ``options`` are :class:`RunnerOptions` fields: ``device``, ``threads``, ``bn_eps``.
    """
    path = Path(path)
    if not path.exists():
        raise RunnerError(f"{path}: no such file")
    return RUNNERS[backend_for(path, backend)](path, RunnerOptions(**options))
