"""An ONNX graph in ONNX Runtime; inputs are cast to the graph's input type."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np

from rvdeploy.errors import RvdeployWarning
from rvdeploy.machine import cpu_int8_class
from rvdeploy.onnx_io import decode_metadata, ort_session, run_session
from rvdeploy.runners.base import Runner, RunnerError


class OrtRunner(Runner):
    backend = "onnxruntime"
    session = None

    def _acquire(self) -> None:
        opts = self.options
        self.session = ort_session(self.path, opts.device, opts.threads)
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        # ONNX Runtime loads any valid graph; what rvdeploy runs takes one NCHW image batch (and gives
        # logits, or a backbone's feature maps).
        if len(inputs) != 1 or (inputs[0].shape and len(inputs[0].shape) != 4):
            shapes = ", ".join(str(i.shape) for i in inputs) or "none"
            raise RunnerError(f"{self.path} is not an image model: it takes {len(inputs)} inputs ({shapes}), "
                              "not one NCHW image batch")
        feed = inputs[0]
        self.input_name = feed.name
        # The fixed C, H, W of the input (None where dynamic): a feed of another size is refused by name.
        self.input_chw = tuple(d if isinstance(d, int) else None for d in feed.shape[1:]) if feed.shape else None
        self.input_dtype = np.float16 if feed.type == "tensor(float16)" else np.float32
        self.fixed_batch = feed.shape[0] if feed.shape and isinstance(feed.shape[0], int) else None
        self.output_names = tuple(o.name for o in outputs)
        self.output_ranks = tuple(len(o.shape) if o.shape is not None else None for o in outputs)
        try:
            metadata = decode_metadata(self.session.get_modelmeta().custom_metadata_map)
        except UnicodeDecodeError:  # ONNX Runtime hands metadata over as str: bytes that are not UTF-8 fail there
            raise RunnerError(f"{self.path} is not a valid ONNX graph: its metadata is not UTF-8 text") from None
        self.describe_graph(metadata)
        if self.options.device == "cpu" and metadata.get("int8_target") == "onnxruntime":
            warn_cpu_class(self.name, metadata)

    def _release(self) -> None:
        self.session = None

    def _infer(self, feed: np.ndarray) -> list[np.ndarray]:
        outputs = run_session(self.session, {self.input_name: feed.astype(self.input_dtype, copy=False)}, self.path)
        return [out.astype(np.float32, copy=False) for out in outputs]

    def _timed(self, feed: np.ndarray) -> Callable[[], None]:
        inputs = {self.input_name: feed.astype(self.input_dtype, copy=False)}

        def run() -> None:
            run_session(self.session, inputs, self.path)

        return run


def warn_cpu_class(name: str, metadata: dict) -> None:
    """One warning when an onnxruntime-layout INT8 graph was made for another CPU class than this one
    (graphs from before the classes existed are u8s8 throughout: VNNI's)."""
    made_for, here = metadata.get("int8_cpu", "vnni"), cpu_int8_class()
    if made_for == here:
        return
    if here == "avx2":
        message = (f"{name} is an INT8 graph for VNNI CPUs; this CPU has no VNNI, where its u8s8 layers saturate and "
                   "lose accuracy: quantize it with --cpu avx2 for CPUs like this one")
    else:
        message = (f"{name} is an INT8 graph for CPUs without VNNI; this CPU has VNNI, where it computes the same but "
                   f"its {len(metadata.get('u8u8_layers', []))} u8u8 layers run slower: quantize it with --cpu vnni "
                   "for CPUs like this one")
    warnings.warn(message, RvdeployWarning, stacklevel=3)
