"""The runner life cycle every backend shares, as Polygraphy's runners do.

A runner is made cheaply from a path and options; ``with`` (or :meth:`Runner.activate`) acquires
the module, session or engine, and leaving the block releases it. While active, ``infer(feed)``
maps a float32 NCHW batch to float32 logits (a multi-output model, e.g. a backbone export's stage
features, gives the list of every output; ``infer_all`` always gives that list), and
``timed(feed)`` gives a callable that runs the model on that batch already staged on the device:
compute only, for timing. Evaluation, comparison and benchmarking are written once, against this
interface.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rvdeploy.arch import ZOO_NAMES
from rvdeploy.errors import RvdeployError
from rvdeploy.model import DEFAULT_BN_EPS
from rvdeploy.onnx_io import check_metadata, precision_label
from rvdeploy.preprocess import Preprocess


class RunnerError(RvdeployError):
    """A model that cannot be run here."""


@dataclass(frozen=True)
class RunnerOptions:
    device: str = "cpu"  # "cpu" or "cuda"; engines always run on the GPU
    threads: int | None = None  # CPU threads (torch and ONNX Runtime)
    bn_eps: float = DEFAULT_BN_EPS  # BatchNorm epsilon of a training checkpoint

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "cuda"):
            raise RunnerError(f"device must be cpu or cuda, got {self.device!r}")
        if self.threads is not None and self.threads < 1:
            raise RunnerError("threads must be positive")
        if not self.bn_eps > 0:
            raise RunnerError(f"BatchNorm epsilon must be positive, got {self.bn_eps}")


class Runner:
    """Base: subclasses implement ``_acquire``, ``_release``, ``_infer`` and ``_timed``.

    After activation the description attributes say what runs: ``arch``, ``form``, ``precision``,
    ``preprocess``, ``num_classes``, ``fixed_batch``, ``input_chw`` (the fixed C, H, W, None where
    dynamic), ``output_names`` and ``output_ranks``.
    """

    backend: str
    arch: str = "unknown"
    form: str = "fused"  # or "multi-branch"; "unknown" for a graph without rvdeploy metadata
    precision: str = "fp32"
    preprocess: Preprocess | None = None
    num_classes: int | None = None
    fixed_batch: int | None = None
    input_chw: tuple[int | None, int | None, int | None] | None = None
    output_names: tuple[str, ...] = ("logits",)
    output_ranks: tuple[int | None, ...] = (2,)  # None: unknown

    def __init__(self, path: str | os.PathLike, options: RunnerOptions = RunnerOptions()) -> None:
        self.path = Path(path)
        self.name = self.path.name
        self.options = options
        self.active = False

    @property
    def label(self) -> str:
        """What a table calls the model: its zoo architecture, else the file it came from."""
        return self.arch if self.arch in ZOO_NAMES else self.path.stem

    def activate(self) -> Runner:
        if not self.active:
            self._acquire()
            self._checked_shapes: set[tuple[int, ...]] = set()
            self.active = True
        return self

    def deactivate(self) -> None:
        if self.active:
            self.active = False
            self._release()

    def __enter__(self) -> Runner:
        return self.activate()

    def __exit__(self, *exc) -> None:
        self.deactivate()

    def _require_active(self) -> None:
        if not self.active:
            raise RunnerError(f"{self.name}: the runner is not active (use it inside `with open_runner(...)`)")

    @property
    def is_classifier(self) -> bool:
        """One output of rank 2: (batch, classes) logits."""
        return len(self.output_ranks) == 1 and self.output_ranks[0] in (2, None)

    def infer(self, feed: np.ndarray) -> np.ndarray | list[np.ndarray]:
        """Logits (float32) for the float32 NCHW batch ``feed``; the list of every output (float32,
        in the model's order) when the model has several."""
        outputs = self.infer_all(feed)
        return outputs[0] if len(outputs) == 1 else outputs

    def infer_all(self, feed: np.ndarray) -> list[np.ndarray]:
        """Every output (float32) for the float32 NCHW batch ``feed``, in the model's order."""
        self._require_active()
        feed = np.ascontiguousarray(feed, dtype=np.float32)
        # Shapes are checked once each: infer is what bench times, call after call.
        first = feed.shape not in self._checked_shapes
        if first:
            self._check_input(feed)
        outputs = self._infer(feed)
        if first:
            for name, out in zip(self.output_names, outputs):
                if out.ndim < 2 or len(out) != len(feed):
                    raise RunnerError(f"{self.name} gives an output {name} of shape {list(out.shape)} for a batch of "
                                      f"{len(feed)}: not batch-major")
            self._checked_shapes.add(feed.shape)
        return outputs

    def timed(self, feed: np.ndarray) -> Callable[[], None]:
        """A callable running the model on ``feed``, staged once beforehand: compute only, for timing."""
        self._require_active()
        feed = np.ascontiguousarray(feed, dtype=np.float32)
        self._check_input(feed)
        return self._timed(feed)

    def describe_graph(self, meta: dict) -> None:
        """Take the description attributes from a graph's rvdeploy metadata."""
        check_metadata(meta, self.path)
        self.precision = precision_label(meta)
        try:
            self.preprocess = Preprocess.from_dict(meta["preprocess"]) if "preprocess" in meta else None
        except RvdeployError as exc:
            raise RunnerError(f"{self.path}: {exc}") from None
        self.num_classes = meta.get("num_classes")
        self.arch = meta.get("arch", self.path.stem)
        self.form = meta.get("form", "unknown")  # another tool's graph: folded or not, it does not say

    def _acquire(self) -> None:
        raise NotImplementedError

    def _release(self) -> None:
        raise NotImplementedError

    def _check_input(self, feed: np.ndarray) -> None:
        """Refuse, by name, a batch whose C, H, W the model cannot take."""
        expected = self.input_chw
        if expected and any(e is not None and e != got for e, got in zip(expected, feed.shape[1:])):
            want = "x".join("?" if e is None else str(e) for e in expected)
            have = "x".join(map(str, feed.shape[1:]))
            raise RunnerError(f"{self.name} takes {want} (CxHxW) inputs, not {have}")

    def _infer(self, feed: np.ndarray) -> list[np.ndarray]:
        raise NotImplementedError

    def _timed(self, feed: np.ndarray) -> Callable[[], None]:
        raise NotImplementedError
