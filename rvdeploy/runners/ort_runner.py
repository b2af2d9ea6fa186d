"""An ONNX graph in ONNX Runtime; inputs are cast to the graph's input type."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from rvdeploy.onnx_io import decode_metadata, ort_session
from rvdeploy.runners.base import Runner


class OrtRunner(Runner):
    backend = "onnxruntime"
    session = None

    def _acquire(self) -> None:
        opts = self.options
        self.session = ort_session(self.path, opts.device, opts.threads, opts.spinning)
        feed = self.session.get_inputs()[0]
        self.input_name = feed.name
        self.input_dtype = np.float16 if feed.type == "tensor(float16)" else np.float32
        self.fixed_batch = feed.shape[0] if isinstance(feed.shape[0], int) else None
        self.metadata = decode_metadata(self.session.get_modelmeta().custom_metadata_map)
        self.describe_graph(self.metadata)

    def _release(self) -> None:
        self.session = None

    def _infer(self, feed: np.ndarray) -> np.ndarray:
        out = self.session.run(None, {self.input_name: feed.astype(self.input_dtype, copy=False)})[0]
        return out.astype(np.float32, copy=False)

    def _timed(self, feed: np.ndarray) -> Callable[[], None]:
        inputs = {self.input_name: feed.astype(self.input_dtype, copy=False)}

        def run() -> None:
            self.session.run(None, inputs)

        return run
