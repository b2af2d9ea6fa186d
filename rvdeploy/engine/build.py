"""TensorRT engine building: strongly typed networks from ONNX, with the TensorRT or TensorRT-RTX builder.

TensorRT 11 has no precision flags: the ONNX graph's types (FP16 tensors, Q/DQ nodes) decide.
Both libraries share one API; the differences are isolated in :class:`Backend`.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from rvdeploy.errors import RvdeployError

BACKENDS = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx"}
INSTALL_HINT = {
    "tensorrt": "pip install 'rvdeploy[gpu]' (TensorRT 11 for data-center GPUs and Jetson)",
    "tensorrt-rtx": "pip install tensorrt-rtx-cu13 (TensorRT for RTX; builds ahead of time without a GPU)",
}


class EngineBuildError(RvdeployError):
    """A graph the builder rejects, or no builder at all."""


@dataclass(frozen=True)
class Backend:
    name: str
    trt: ModuleType

    @property
    def version(self) -> str:
        return self.trt.__version__

    def network_flags(self) -> int:
        # TensorRT-RTX networks are always strongly typed; TensorRT 11 takes the flag explicitly.
        flag = getattr(self.trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
        return 1 << int(flag) if flag is not None and self.name == "tensorrt" else 0


def load_backend(name: str = "auto") -> Backend:
    """``auto`` prefers TensorRT when it imports, else TensorRT-RTX."""
    candidates = ["tensorrt", "tensorrt-rtx"] if name == "auto" else [name]
    if any(c not in BACKENDS for c in candidates):
        raise EngineBuildError(f"unknown backend {name!r}; choose auto, {', '.join(BACKENDS)}")
    for candidate in candidates:
        try:
            return Backend(candidate, importlib.import_module(BACKENDS[candidate]))
        except ImportError:
            continue
    hints = "; or ".join(INSTALL_HINT[c] for c in candidates)
    raise EngineBuildError(f"no TensorRT builder is installed ({' or '.join(candidates)}): {hints}")


def _collecting_logger(trt: ModuleType):
    """A logger that keeps TensorRT's messages instead of printing them: errors reach the user as one line."""

    class CollectingLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.messages: list[tuple[object, str]] = []

        def log(self, severity, msg) -> None:
            self.messages.append((severity, msg))

    return CollectingLogger()


def _parse(backend: Backend, onnx_path: Path):
    trt = backend.trt
    logger = _collecting_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(backend.network_flags())
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes(), str(onnx_path)):
        errors = [parser.get_error(i) for i in range(parser.num_errors)]
        first = errors[0]
        raise EngineBuildError(
            f"{backend.name} cannot parse {onnx_path}: node {first.node_name() or first.node()} "
            f"({first.node_operator()}): {first.desc()}" + (f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else "")
        )
    return builder, network, parser, logger


def compile_onnx(onnx_path: str | os.PathLike, backend: Backend, batches: tuple[int, int, int] = (1, 8, 32),
                 tf32: bool = False) -> bytes:
    """A serialized engine for the graph at ``onnx_path``, with one profile over the batch dimension."""
    onnx_path = Path(onnx_path)
    builder, network, _parser, _logger = _parse(backend, onnx_path)
    config = builder.create_builder_config()
    if not tf32 and hasattr(backend.trt.BuilderFlag, "TF32"):
        config.clear_flag(backend.trt.BuilderFlag.TF32)  # FP32 layers must match ONNX Runtime
    tensor = network.get_input(0)
    shape = tuple(tensor.shape)
    if shape[0] == -1:
        profile = builder.create_optimization_profile()
        profile.set_shape(tensor.name, *[(b, *shape[1:]) for b in batches])
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"{backend.name} could not build an engine from {onnx_path}")
    return bytes(serialized)
