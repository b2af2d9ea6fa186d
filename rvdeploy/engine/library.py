"""The TensorRT libraries: TensorRT 11 and TensorRT for RTX share one Python API.

What differs between them (the strongly-typed flag, timing caches) lives in :class:`Library`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

from rvdeploy.backends import INSTALL_HINT, TENSORRT_BACKENDS, TENSORRT_MODULES, canonical_backend
from rvdeploy.errors import RvdeployError


class LibraryError(RvdeployError):
    """No TensorRT library, or not the one asked for."""


@dataclass(frozen=True)
class Library:
    name: str  # "tensorrt" or "tensorrt-rtx"
    trt: ModuleType

    @property
    def version(self) -> str:
        return self.trt.__version__

    @property
    def strongly_typed_flag(self) -> int:
        # TensorRT-RTX networks are always strongly typed; TensorRT 11 takes the flag explicitly.
        if self.name == "tensorrt-rtx":
            return 0
        return 1 << int(self.trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)

    @property
    def uses_timing_cache(self) -> bool:
        return self.name == "tensorrt"  # TensorRT-RTX's timing-cache calls are no-ops


def load_library(name: str = "auto") -> Library:
    """``auto`` prefers TensorRT when it imports, else TensorRT-RTX; aliases (``trt``, ``rtx``) accepted."""
    candidates = list(TENSORRT_BACKENDS) if name == "auto" else [canonical_backend(name)]
    if any(c not in TENSORRT_BACKENDS for c in candidates):
        raise LibraryError(f"{name!r} is not a TensorRT backend; choose auto, {', '.join(TENSORRT_BACKENDS)}")
    for candidate in candidates:
        try:
            return Library(candidate, importlib.import_module(TENSORRT_MODULES[candidate]))
        except ImportError:
            continue
    hints = "; or ".join(INSTALL_HINT[c] for c in candidates)
    raise LibraryError(f"no TensorRT builder is installed ({' or '.join(candidates)}): {hints}")


def collecting_logger(trt: ModuleType):
    """A logger that keeps TensorRT's messages instead of printing them: errors reach the user as one line."""

    class CollectingLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.messages: list[tuple[object, str]] = []

        def log(self, severity, msg) -> None:
            self.messages.append((severity, msg))

    return CollectingLogger()
