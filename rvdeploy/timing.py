"""Latency measurement the way trtexec does it, and the reference workload that makes it portable.

Each configuration is warmed up, then timed for at least ``min_s`` seconds and ``min_iters``
iterations; per-iteration latencies give min, mean, p50, p90, p95, p99 and the throughput. On a GPU,
CUDA events time the GPU compute alone, apart from the end-to-end latency with host↔device copies.

Machines differ. A fixed reference workload (a 3x3 conv, 64→64 channels on 56x56, batch 1) timed on
the same backend, device and threads, in short blocks interleaved with the model's, sees the same
load and clock; a latency divided by it is *normalised*.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from rvdeploy.errors import RvdeployError

REFERENCE_WORKLOAD = {"op": "conv3x3", "in_channels": 64, "out_channels": 64, "size": 56, "batch": 1}
LATENCY_KEYS = ("min", "mean", "p50", "p90", "p95", "p99")


class TimingError(RvdeployError):
    """Settings or samples that give no meaningful timing."""


@dataclass(frozen=True)
class Latency:
    """Per-iteration latency statistics in milliseconds, and throughput in images per second."""

    iterations: int
    batch: int
    min: float
    mean: float
    p50: float
    p90: float
    p95: float
    p99: float
    throughput_ips: float

    @classmethod
    def from_samples(cls, samples_ms: list[float] | np.ndarray, batch: int) -> Latency:
        samples = np.asarray(samples_ms, dtype=np.float64)
        if samples.size == 0 or not np.isfinite(samples).all() or (samples <= 0).any():
            raise TimingError("latency samples must be a non-empty series of positive numbers")
        p50, p90, p95, p99 = np.percentile(samples, [50, 90, 95, 99])
        return cls(
            iterations=int(samples.size),
            batch=batch,
            min=float(samples.min()),
            mean=float(samples.mean()),
            p50=float(p50),
            p90=float(p90),
            p95=float(p95),
            p99=float(p99),
            throughput_ips=batch * 1000.0 / float(samples.mean()),
        )

    def to_dict(self) -> dict:
        return asdict(self)

    def ms(self) -> dict:
        return {k: getattr(self, k) for k in LATENCY_KEYS}


def measure(run_once: Callable[[], object], batch: int, warmup_s: float = 1.0, min_s: float = 3.0,
            min_iters: int = 20) -> Latency:
    """Call ``run_once`` for ``warmup_s``, then time it until both ``min_s`` and ``min_iters`` are reached."""
    deadline = time.perf_counter() + warmup_s
    while time.perf_counter() < deadline:
        run_once()
    samples = []
    start = time.perf_counter()
    while len(samples) < min_iters or time.perf_counter() - start < min_s:
        t0 = time.perf_counter()
        run_once()
        samples.append((time.perf_counter() - t0) * 1000.0)
    return Latency.from_samples(samples, batch)


def measure_cuda(run_once: Callable[[], object], batch: int, warmup_s: float = 1.0, min_s: float = 3.0,
                 min_iters: int = 20, stream=None) -> Latency:
    """Like :func:`measure`, timed with CUDA events on ``stream`` (default: the current one): GPU time."""
    import torch

    stream = stream or torch.cuda.current_stream()
    deadline = time.perf_counter() + warmup_s
    while time.perf_counter() < deadline:
        run_once()
    torch.cuda.synchronize()
    events = []
    start = time.perf_counter()
    while len(events) < min_iters or time.perf_counter() - start < min_s:
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record(stream)
        run_once()
        end.record(stream)
        events.append((begin, end))
        if len(events) % 64 == 0:
            torch.cuda.synchronize()  # keep the queue short so wall time tracks GPU time
    torch.cuda.synchronize()
    return Latency.from_samples([b.elapsed_time(e) for b, e in events], batch)


def reference_workload(backend: str, device: str, threads: int | None) -> Callable[[], object]:
    """A callable running the fixed reference conv on ``backend`` (``onnxruntime``, else torch)
    with ``device`` and ``threads``."""
    w = REFERENCE_WORKLOAD
    rng = np.random.default_rng(0)
    x = rng.standard_normal((w["batch"], w["in_channels"], w["size"], w["size"]), dtype=np.float32)
    weight = rng.standard_normal((w["out_channels"], w["in_channels"], 3, 3), dtype=np.float32) * 0.05
    if backend == "onnxruntime":
        from onnx import TensorProto, helper, numpy_helper

        from rvdeploy.onnx_io import ort_session, with_min_ir_version

        graph = helper.make_graph(
            [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], "reference",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [numpy_helper.from_array(weight, "w")])
        model = with_min_ir_version(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
        session = ort_session(model.SerializeToString(), device, threads, name="the reference workload")
        return lambda: session.run(None, {"x": x})
    import torch
    import torch.nn.functional as F

    # torch and TensorRT (both on torch's CUDA device) share the torch reference.
    tx, tw = torch.from_numpy(x).to(device), torch.from_numpy(weight).to(device)

    def run() -> None:
        with torch.inference_mode():
            F.conv2d(tx, tw, padding=1)
        if device == "cuda":
            torch.cuda.synchronize()

    return run


def _block(run: Callable[[], object], seconds: float, min_iters: int, into: list[float]) -> None:
    """Time ``run`` for ``seconds`` (and ``min_iters`` kept samples); the first call after a switch
    between workloads pays for the switch (caches, thread pools waking) and is not kept."""
    run()
    end = time.perf_counter() + seconds
    kept = 0
    while kept < min_iters or time.perf_counter() < end:
        t0 = time.perf_counter()
        run()
        into.append((time.perf_counter() - t0) * 1000.0)
        kept += 1


def measure_with_reference(run_once: Callable[[], object], reference: Callable[[], object], batch: int,
                           warmup_s: float = 1.0, min_s: float = 3.0, min_iters: int = 20,
                           block_s: float = 0.25) -> tuple[Latency, float]:
    """:func:`measure`, with the reference workload timed in short blocks between blocks of the model:
    both see the same stretch of the machine's load and clock, so their ratio cancels it. (Blocks, not
    single iterations: two runtimes switching every call fight over the cores.)"""
    deadline = time.perf_counter() + warmup_s
    while time.perf_counter() < deadline:
        run_once()
    samples: list[float] = []
    reference_samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < min_iters or time.perf_counter() - start < min_s:
        _block(run_once, block_s, 1, samples)
        _block(reference, block_s / 4, 3, reference_samples)
    return Latency.from_samples(samples, batch), float(np.median(reference_samples))


