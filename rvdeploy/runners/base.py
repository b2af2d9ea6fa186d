"""The runner life cycle every backend shares, as Polygraphy's runners do.

A runner is made cheaply from a path and options; ``with`` (or :meth:`Runner.activate`) acquires
the module, session or engine, and leaving the block releases it. While active, ``infer(feed)``
maps a float32 NCHW batch to float32 logits, and ``timed(feed)`` gives a callable that runs the
model on that batch already staged on the device: compute only, for timing. Evaluation,
comparison and benchmarking are written once, against this interface.
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
    ``preprocess``, ``num_classes``, ``fixed_batch``.
    """

    backend: str
    arch: str = "unknown"
    form: str = "fused"  # or "multi-branch"
    precision: str = "fp32"
    preprocess: Preprocess | None = None
    num_classes: int | None = None
    fixed_batch: int | None = None

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

    def infer(self, feed: np.ndarray) -> np.ndarray:
        """Logits (float32) for the float32 NCHW batch ``feed``."""
        self._require_active()
        feed = np.ascontiguousarray(feed, dtype=np.float32)
        # Shapes are checked once each: infer is what bench times, call after call.
        first = feed.shape not in self._checked_shapes
        if first:
            self._check_input(feed)
        out = self._infer(feed)
        if first:
            if out.ndim != 2 or len(out) != len(feed):
                raise RunnerError(f"{self.name} gives an output of shape {list(out.shape)} for a batch of {len(feed)}, "
                                  "not (batch, classes) logits")
            self._checked_shapes.add(feed.shape)
        return out

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
        self.form = meta.get("form", "fused")

    def _acquire(self) -> None:
        raise NotImplementedError

    def _release(self) -> None:
        raise NotImplementedError

    def _check_input(self, feed: np.ndarray) -> None:
        """Refuse, by name, a batch the model cannot take (runners that know their input size)."""

    def _infer(self, feed: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _timed(self, feed: np.ndarray) -> Callable[[], None]:
        raise NotImplementedError
