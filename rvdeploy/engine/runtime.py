"""Running TensorRT engines: deserialize, check the sidecar, bind torch CUDA tensors, execute.

Device buffers are torch CUDA tensors: torch is already a dependency, and pycuda ships no wheels and
needs a CUDA toolchain to install. ``execute_async_v3`` runs on a torch CUDA stream; for small
batches the enqueue can be captured once in a CUDA graph and replayed.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import numpy as np

from rvdeploy.engine.build import BACKENDS, INSTALL_HINT, SIDECAR_FORMAT, collecting_logger, read_sidecar, sidecar_path
from rvdeploy.files import sha256_file
from rvdeploy.preprocess import Preprocess
from rvdeploy.runners import Runner, RunnerError


def check_engine(path: str | os.PathLike) -> dict:
    """The engine's sidecar, after checking it describes this very file and an installed library.

    A missing or foreign sidecar, a changed engine file or another library version is refused:
    an engine only runs with the exact library that built it.
    """
    path = Path(path)
    if not path.is_file():
        raise RunnerError(f"{path}: no such file")
    side = sidecar_path(path)
    sidecar = read_sidecar(side) if side.exists() else None
    if sidecar is None or sidecar.get("format") != SIDECAR_FORMAT:
        raise RunnerError(f"{path} has no readable rvdeploy sidecar ({side.name}): rebuild it with rvdeploy build-engine")
    if sidecar.get("engine_sha256") != sha256_file(path):
        raise RunnerError(f"{path} does not match its sidecar (sha256 differs): the engine was replaced; rebuild it")
    backend = sidecar.get("backend")
    if backend not in BACKENDS:
        raise RunnerError(f"{side.name} names an unknown backend {backend!r}")
    try:
        trt = importlib.import_module(BACKENDS[backend])
    except ImportError:
        raise RunnerError(f"{path} was built with {backend}, which is not installed: {INSTALL_HINT[backend]}") from None
    if trt.__version__ != sidecar.get("library_version"):
        raise RunnerError(
            f"{path} was built with {backend} {sidecar.get('library_version')} but {trt.__version__} is installed: rebuild it"
        )
    return sidecar


class TensorRTRunner(Runner):
    """A TensorRT (or TensorRT-RTX) engine on the GPU."""

    backend = "tensorrt"

    def __init__(self, path: str | os.PathLike, cuda_graph: bool = False) -> None:
        import torch

        sidecar = check_engine(path)
        if not torch.cuda.is_available():
            raise RunnerError("running a TensorRT engine needs a CUDA GPU; none is available here")
        built_on = sidecar.get("gpu")
        here = ".".join(map(str, torch.cuda.get_device_capability(0)))
        if built_on and built_on.get("compute_capability") != here:
            raise RunnerError(
                f"{path} was built for compute capability {built_on['compute_capability']} ({built_on['name']}), "
                f"this GPU is {here}: rebuild it here"
            )
        trt = importlib.import_module(BACKENDS[sidecar["backend"]])
        self.torch = torch
        self.logger = collecting_logger(trt)
        self.engine = trt.Runtime(self.logger).deserialize_cuda_engine(Path(path).read_bytes())
        if self.engine is None:
            errors = [m for _, m in self.logger.messages]
            raise RunnerError(f"{sidecar['backend']} cannot deserialize {path}" + (f": {errors[-1]}" if errors else ""))
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_name = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output_name = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        low, _opt, high = self.engine.get_tensor_profile_shape(self.input_name, 0)
        self.batch_range = (low[0], high[0])
        self.fixed_batch = low[0] if low[0] == high[0] else None
        self.dtypes = {n: self._torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in (self.input_name, self.output_name)}
        self.stream = torch.cuda.Stream()
        self.cuda_graph = cuda_graph
        self._buffers: dict[int, tuple] = {}  # batch -> (input, output, captured graph or None)
        meta = sidecar.get("model_metadata", {})
        self.name = Path(path).name
        self.backend = sidecar["backend"]
        self.precision = sidecar.get("precision", "fp32")
        self.preprocess = Preprocess.from_dict(meta["preprocess"]) if "preprocess" in meta else None
        self.num_classes = meta.get("num_classes")
        self.arch = meta.get("arch", Path(path).stem)
        self.form = meta.get("form", "fused")
        self.sidecar = sidecar

    @staticmethod
    def _torch_dtype(trt, dtype):
        import torch

        table = {trt.float32: torch.float32, trt.float16: torch.float16}
        if dtype not in table:
            raise RunnerError(f"engine I/O type {dtype} is not supported by the runner")
        return table[dtype]

    def _bind(self, batch: int):
        """Device buffers for ``batch``, bound to the context (and captured in a CUDA graph if asked)."""
        low, high = self.batch_range
        if not low <= batch <= high:
            raise RunnerError(f"batch {batch} is outside the engine's profile ({low} to {high})")
        if batch not in self._buffers:
            torch = self.torch
            self.context.set_input_shape(self.input_name, (batch, *self.engine.get_tensor_shape(self.input_name)[1:]))
            out_shape = tuple(self.context.get_tensor_shape(self.output_name))
            inputs = torch.empty((batch, *self.engine.get_tensor_shape(self.input_name)[1:]), dtype=self.dtypes[self.input_name], device="cuda")
            outputs = torch.empty(out_shape, dtype=self.dtypes[self.output_name], device="cuda")
            graph = None
            if self.cuda_graph:
                self._enqueue(inputs, outputs)  # TensorRT sets up its resources on the first enqueue
                self.stream.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=self.stream):
                    self.context.execute_async_v3(self.stream.cuda_stream)
            self._buffers[batch] = (inputs, outputs, graph)
        inputs, outputs, graph = self._buffers[batch]
        self.context.set_input_shape(self.input_name, tuple(inputs.shape))
        self.context.set_tensor_address(self.input_name, inputs.data_ptr())
        self.context.set_tensor_address(self.output_name, outputs.data_ptr())
        return inputs, outputs, graph

    def _enqueue(self, inputs, outputs) -> None:
        self.context.set_tensor_address(self.input_name, inputs.data_ptr())
        self.context.set_tensor_address(self.output_name, outputs.data_ptr())
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RunnerError(f"{self.name}: TensorRT failed to execute")

    def execute(self, batch: int) -> None:
        """Run on the bound device buffers only: GPU compute, no host transfers (for timing)."""
        inputs, outputs, graph = self._bind(batch)
        with self.torch.cuda.stream(self.stream):
            if graph is not None:
                graph.replay()
            else:
                self._enqueue(inputs, outputs)

    def device_session(self, batch: np.ndarray):
        """A callable running the engine on ``batch`` already on the device: compute only, for timing."""
        inputs, _, _ = self._bind(len(batch))
        inputs.copy_(self.torch.from_numpy(np.ascontiguousarray(batch)).to(inputs.dtype))
        return lambda: self.execute(len(batch))

    def infer(self, batch: np.ndarray) -> np.ndarray:
        inputs, outputs, _ = self._bind(len(batch))
        with self.torch.cuda.stream(self.stream):
            inputs.copy_(self.torch.from_numpy(np.ascontiguousarray(batch)).to(inputs.dtype), non_blocking=False)
        self.execute(len(batch))
        self.stream.synchronize()
        return outputs.float().cpu().numpy()

    def close(self) -> None:
        self._buffers.clear()
        self.context = None
        self.engine = None
