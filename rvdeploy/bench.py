"""Latency measurement the way trtexec does it: warm up, then a time-boxed run of many iterations."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np


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
            raise ValueError("latency samples must be a non-empty series of positive numbers")
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
