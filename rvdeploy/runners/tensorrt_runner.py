"""TensorRT (or TensorRT-RTX) engines on the GPU: sidecar check, deserialize, bind, execute.

Device buffers are torch CUDA tensors: torch is already a dependency, and pycuda ships no wheels and
needs a CUDA toolchain to install. ``execute_async_v3`` runs on a torch CUDA stream.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from rvdeploy.engine.library import collecting_logger
from rvdeploy.engine.sidecar import check_engine
from rvdeploy.runners.base import Runner, RunnerError


class TensorRTRunner(Runner):
    backend = "tensorrt"
    engine = None

    def _acquire(self) -> None:
        import torch

        sidecar, library = check_engine(self.path)
        if not torch.cuda.is_available():
            raise RunnerError("running a TensorRT engine needs a CUDA GPU; none is available here")
        built_on = sidecar.get("gpu")
        here = ".".join(map(str, torch.cuda.get_device_capability(0)))
        if built_on and built_on.get("compute_capability") != here:
            raise RunnerError(
                f"{self.path} was built for compute capability {built_on['compute_capability']} ({built_on['name']}), "
                f"this GPU is {here}: rebuild it here"
            )
        trt = library.trt
        self.torch = torch
        logger = collecting_logger(trt)
        self.engine = trt.Runtime(logger).deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            errors = [m for _, m in logger.messages]
            raise RunnerError(f"{library.name} cannot deserialize {self.path}" + (f": {errors[-1]}" if errors else ""))
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_name = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        # Every output, in the engine's order (a backbone export has one per feature stage).
        self.output_names = tuple(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        self.output_ranks = tuple(len(self.engine.get_tensor_shape(n)) for n in self.output_names)
        low, _opt, high = self.engine.get_tensor_profile_shape(self.input_name, 0)
        self.batch_range = (low[0], high[0])
        self.fixed_batch = low[0] if low[0] == high[0] else None
        self.input_chw = tuple(int(d) for d in low[1:])
        dtypes = {trt.float32: torch.float32, trt.float16: torch.float16}
        self.dtypes = {}
        for name in (self.input_name, *self.output_names):
            dtype = self.engine.get_tensor_dtype(name)
            if dtype not in dtypes:
                raise RunnerError(f"engine I/O type {dtype} is not supported by the runner")
            self.dtypes[name] = dtypes[dtype]
        self.stream = torch.cuda.Stream()
        self._buffers: dict[int, tuple] = {}  # batch -> (input, [outputs]) device tensors
        self.backend = library.name
        self.describe_graph(sidecar.get("model_metadata", {}))
        self.precision = sidecar.get("precision", self.precision)

    def _release(self) -> None:
        self._buffers = {}
        self.context = None
        self.engine = None

    def _bind(self, batch: int):
        """Device buffers for ``batch``, bound to the context."""
        low, high = self.batch_range
        if not low <= batch <= high:
            raise RunnerError(f"batch {batch} is outside the engine's profile ({low} to {high})")
        chw = tuple(self.engine.get_tensor_shape(self.input_name)[1:])
        self.context.set_input_shape(self.input_name, (batch, *chw))
        if batch not in self._buffers:
            torch = self.torch
            inputs = torch.empty((batch, *chw), dtype=self.dtypes[self.input_name], device="cuda")
            outputs = [torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=self.dtypes[name], device="cuda")
                       for name in self.output_names]
            self._buffers[batch] = (inputs, outputs)
        inputs, outputs = self._buffers[batch]
        self.context.set_tensor_address(self.input_name, inputs.data_ptr())
        for name, output in zip(self.output_names, outputs):
            self.context.set_tensor_address(name, output.data_ptr())
        return inputs, outputs

    def _execute(self) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RunnerError(f"{self.name}: TensorRT failed to execute")

    def _stage(self, feed: np.ndarray):
        inputs, outputs = self._bind(len(feed))
        with self.torch.cuda.stream(self.stream):
            inputs.copy_(self.torch.from_numpy(feed).to(inputs.dtype))
        return outputs

    def _infer(self, feed: np.ndarray) -> list[np.ndarray]:
        outputs = self._stage(feed)
        self._execute()
        self.stream.synchronize()
        return [output.float().cpu().numpy() for output in outputs]

    def _timed(self, feed: np.ndarray) -> Callable[[], None]:
        self._stage(feed)
        self.stream.synchronize()
        batch = len(feed)

        def run() -> None:
            self._bind(batch)
            self._execute()

        return run
