"""One interface over the backends that run a model: torch, ONNX Runtime and TensorRT.

A runner is a context manager with ``infer(batch) -> logits`` (float32 numpy in, float32 numpy out)
and what the model says about itself: preprocessing recipe, class count, precision. Evaluation and
benchmarking are written once, against this interface.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from rvdeploy.errors import RvdeployError
from rvdeploy.export import decode_metadata
from rvdeploy.preprocess import Preprocess


class RunnerError(RvdeployError):
    """A model that cannot be run here."""


class Runner:
    """Base: subclasses set the attributes and implement ``infer``."""

    name: str
    backend: str
    arch: str = "unknown"
    form: str = "fused"  # or "multi-branch"
    precision: str = "fp32"
    preprocess: Preprocess | None = None
    num_classes: int | None = None
    fixed_batch: int | None = None

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Release what the backend holds."""

    def infer(self, batch: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class TorchRunner(Runner):
    """A checkpoint in torch: the multi-branch net for training form, the plain net for fused form."""

    backend = "torch"

    def __init__(self, path: str | os.PathLike, device: str = "cpu") -> None:
        from rvdeploy.checkpoint import load_weights

        self._setup(load_weights(path), Path(path).name, device)

    @classmethod
    def from_weights(cls, weights, name: str, device: str = "cpu") -> TorchRunner:
        runner = cls.__new__(cls)
        runner._setup(weights, name, device)
        return runner

    def _setup(self, weights, name: str, device: str) -> None:
        from rvdeploy.model import build_model
        from rvdeploy.weights import TrainWeights

        if device == "cuda" and not torch.cuda.is_available():
            raise RunnerError("--device cuda: no CUDA GPU is available to torch here")
        trained = isinstance(weights, TrainWeights)
        self.model = build_model(weights.spec, deploy=not trained, state_dict=weights.tensors).to(device)
        self.device = device
        self.name = name
        self.form = "multi-branch" if trained else "fused"
        self.arch = weights.spec.name
        self.preprocess = weights.preprocess
        self.num_classes = weights.spec.num_classes

    def infer(self, batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self.model(torch.from_numpy(batch).to(self.device)).float().cpu().numpy()

    def device_session(self, batch: np.ndarray):
        """A callable running the model on ``batch`` already on the device: compute only, for timing."""
        x = torch.from_numpy(batch).to(self.device)

        def run() -> None:
            with torch.inference_mode():
                self.model(x)

        return run


class OrtRunner(Runner):
    """An ONNX graph in ONNX Runtime; inputs are cast to the graph's input type."""

    backend = "onnxruntime"

    def __init__(self, path: str | os.PathLike, device: str = "cpu", threads: int | None = None) -> None:
        import onnxruntime as ort

        providers = ["CPUExecutionProvider"]
        if device == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise RunnerError("--device cuda: this onnxruntime has no CUDA provider (install the gpu extra)")
            providers.insert(0, "CUDAExecutionProvider")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:  # onnxruntime's own exception types: a graph it cannot load
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise RunnerError(f"ONNX Runtime cannot load {path}: {message}") from None
        feed = self.session.get_inputs()[0]
        self.input_name = feed.name
        self.input_dtype = np.float16 if feed.type == "tensor(float16)" else np.float32
        self.fixed_batch = feed.shape[0] if isinstance(feed.shape[0], int) else None
        meta = decode_metadata(self.session.get_modelmeta().custom_metadata_map)
        self.name = Path(path).name
        self.metadata = meta
        self.precision = meta.get("precision", "fp32")
        if "int8_target" in meta:
            self.precision += f"/{meta['int8_target']}"
        if meta.get("fp32_nodes") and self.precision != "fp32":
            self.precision += f" ({len(meta['fp32_nodes'])} nodes fp32)"
        self.preprocess = Preprocess.from_dict(meta["preprocess"]) if "preprocess" in meta else None
        self.num_classes = meta.get("num_classes")
        self.arch = meta.get("arch", Path(path).stem)
        self.form = meta.get("form", "fused")

    def infer(self, batch: np.ndarray) -> np.ndarray:
        out = self.session.run(None, {self.input_name: batch.astype(self.input_dtype, copy=False)})[0]
        return out.astype(np.float32, copy=False)


def open_runner(path: str | os.PathLike, device: str = "cpu", threads: int | None = None) -> Runner:
    """The runner for ``path`` by its kind: ``.onnx`` → ONNX Runtime, ``.engine`` → TensorRT, else torch."""
    path = Path(path)
    if not path.exists():
        raise RunnerError(f"{path}: no such file")
    if path.suffix == ".onnx":
        return OrtRunner(path, device, threads)
    if path.suffix in (".engine", ".plan"):
        from rvdeploy.engine.runtime import TensorRTRunner

        return TensorRTRunner(path)
    return TorchRunner(path, device)
