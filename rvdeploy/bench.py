"""``rvdeploy bench``: time each model at every batch size through its runner, in one report.

A training checkpoint on torch is timed both multi-branch and fused, with the speed-up; before
timing, every form of one model is run on the same input and compared, so the table never
compares two different functions.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from rvdeploy.backends import RUNS, backend_for
from rvdeploy.checkpoint import load_weights
from rvdeploy.compare import compare_outputs, worst
from rvdeploy.errors import RvdeployError
from rvdeploy.machine import describe_machine
from rvdeploy.model import DEFAULT_BN_EPS, as_tuple
from rvdeploy.reparam import fuse
from rvdeploy.runners import Runner, RunnerOptions, TorchRunner, open_runner
from rvdeploy.timing import REFERENCE_WORKLOAD, Latency, measure_cuda, measure_with_reference, reference_workload
from rvdeploy.weights import TrainWeights

# One timed input batch beyond this is no benchmark: a graph declaring 2^20 x 2^20 pixels is refused by name.
MAX_INPUT_BYTES = 4 * 2 ** 30


class BenchError(RvdeployError):
    """A target, backend or setting that cannot be benchmarked."""


@dataclass
class BenchRow:
    model: str
    variant: str
    backend: str
    precision: str
    batch: int
    latency: Latency
    gpu_compute: Latency | None = None
    reference_p50_ms: float | None = None

    @property
    def normalized_p50(self) -> float | None:
        return self.latency.p50 / self.reference_p50_ms if self.reference_p50_ms else None

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "variant": self.variant,
            "backend": self.backend,
            "precision": self.precision,
            "batch": self.batch,
            "latency_ms": self.latency.ms(),
            "throughput_ips": self.latency.throughput_ips,
            "iterations": self.latency.iterations,
            "gpu_compute_ms": self.gpu_compute.ms() if self.gpu_compute else None,
            "reference_p50_ms": self.reference_p50_ms,
            "normalized_p50": self.normalized_p50,
        }


@dataclass(frozen=True)
class BenchSettings:
    batches: tuple[int, ...] = (1, 8, 32)
    warmup_s: float = 1.0
    min_s: float = 3.0
    iters: int = 20
    threads: int | None = None
    input_size: tuple[int, int] | None = None  # default: the model's recipe, else 224x224
    device: str = "cpu"  # engines always run on the GPU
    bn_eps: float = DEFAULT_BN_EPS  # of a training checkpoint

    def __post_init__(self) -> None:
        if not self.batches or min(self.batches) < 1:
            raise BenchError("batch sizes must be positive integers")
        if self.warmup_s < 0 or self.min_s < 0 or self.iters < 1:
            raise BenchError("--warmup-s and --min-s must be >= 0 and --iters >= 1")
        if self.threads is not None and self.threads < 1:
            raise BenchError("--threads must be positive")


def _runners(path: Path, backend: str, settings: BenchSettings) -> list[Runner]:
    """The runners to time: a training checkpoint gives its multi-branch net and its fold."""
    options = RunnerOptions(settings.device, settings.threads, settings.bn_eps)
    if backend != "torch":
        return [open_runner(path, backend, device=settings.device, threads=settings.threads)]
    weights = load_weights(path, bn_eps=settings.bn_eps)
    runners = [TorchRunner(path, options, weights)]
    if isinstance(weights, TrainWeights):
        runners.append(TorchRunner(path, options, fuse(weights)[0]))
    return runners


def _same_function(runners: list[Runner], shape: tuple[int, int, int]) -> list[dict]:
    """Each later form of one model against the first (the multi-branch net), on one probe batch,
    every output within what float32 explains: a table that times two forms must time one function."""
    if len(runners) < 2:
        return []
    first = runners[0]
    x = np.random.default_rng(0).standard_normal((2, *shape), dtype=np.float32)
    with torch.inference_mode():
        net64 = first.weights.to_module(torch.float64)
        reference64 = [t.numpy() for t in as_tuple(net64(torch.from_numpy(x).double()))]
    reference32 = first.infer_all(x)
    checks = []
    for runner in runners[1:]:
        candidate = runner.infer_all(x)
        if len(candidate) != len(reference32):
            raise BenchError(f"{runner.name}: the {runner.form} net gives {len(candidate)} outputs, "
                             f"the {first.form} net {len(reference32)}")
        comparisons = [compare_outputs(c, r64, r32) for c, r64, r32 in zip(candidate, reference64, reference32)]
        closest = worst(comparisons)
        if not all(c.passed for c in comparisons):
            raise BenchError(f"{runner.name}: the {runner.form} net does not compute what the {first.form} net does "
                             f"(relative error {closest.max_rel_error:.3g}, float32 explains {closest.budget_rel:.3g})")
        checks.append({"model": runner.label, "candidate": runner.form, "reference": first.form,
                       "outputs": len(comparisons), **closest.to_dict()})
    return checks


def _input_shape(runner: Runner, settings: BenchSettings) -> tuple[int, int, int]:
    """C, H, W to time: a graph's own fixed size, else ``--input-size``, the recipe's, or 224x224;
    refused when the largest batch of it would not fit in :data:`MAX_INPUT_BYTES`."""
    channels, height, width = runner.input_chw or (None, None, None)
    if height is not None and width is not None:
        if settings.input_size is not None and tuple(settings.input_size) != (height, width):
            raise BenchError(f"{runner.name} takes {height}x{width} inputs (fixed in the graph), not "
                             f"--input-size {settings.input_size[0]}x{settings.input_size[1]}: leave --input-size out")
        size = (height, width)
    else:
        size = settings.input_size or (runner.preprocess.input_size if runner.preprocess else (224, 224))
    shape = (channels or 3, *size)
    largest = max(settings.batches) * math.prod(shape) * 4
    if largest > MAX_INPUT_BYTES:
        raise BenchError(f"{runner.name}: a float32 input of {'x'.join(map(str, shape))} at batch {max(settings.batches)} "
                         f"takes {largest / 2 ** 30:.3g} GiB, over the {MAX_INPUT_BYTES // 2 ** 30} GiB one timed input may take")
    return shape


def _time(runner: Runner, batch: int, shape: tuple[int, int, int], settings: BenchSettings,
          reference: Callable[[], object]) -> tuple[Latency, Latency | None, float]:
    x = np.random.default_rng(batch).standard_normal((batch, *shape), dtype=np.float32)
    timing = dict(warmup_s=settings.warmup_s, min_s=settings.min_s, min_iters=settings.iters)
    # End to end: includes the host<->device copies on a GPU.
    end_to_end, reference_p50 = measure_with_reference(lambda: runner.infer_all(x), reference, batch, **timing)
    compute = None
    if settings.device == "cuda":
        compute = measure_cuda(runner.timed(x), batch, stream=getattr(runner, "stream", None), **timing)
    return end_to_end, compute, reference_p50


def bench_target(target: str | os.PathLike, backend: str | None = None, settings: BenchSettings = BenchSettings(),
                 progress: Callable[[str], None] | None = None) -> dict:
    """Time ``target`` at every batch size; the report follows the documented JSON schema.

    ``backend`` defaults to the artifact's kind (checkpoint → torch, .onnx → onnxruntime, .engine →
    tensorrt); aliases are accepted.
    """
    path = Path(target)
    if not path.exists():
        raise BenchError(f"{path}: no such file")
    backend = backend_for(path, backend)
    if RUNS[backend] == "engine":
        settings = replace(settings, device="cuda")  # engines run on the GPU
    if settings.device == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda: no CUDA GPU is available here")
    runners = _runners(path, backend, settings)
    # TensorRT shares torch's CUDA reference.
    reference = reference_workload(backend, settings.device, settings.threads)
    rows, checks, skipped = [], [], []
    with ExitStack() as stack:
        for runner in runners:
            stack.enter_context(runner)
        shape = _input_shape(runners[0], settings)
        size = shape[1:]
        checks = _same_function(runners, shape)
        for runner in runners:
            batches = (runner.fixed_batch,) if runner.fixed_batch else settings.batches
            if runner.fixed_batch and set(settings.batches) != {runner.fixed_batch}:
                skipped.append({"model": runner.label, "fixed_batch": runner.fixed_batch,
                                "batches": [b for b in settings.batches if b != runner.fixed_batch]})
            for batch in batches:
                if progress:
                    progress(f"{runner.name} {runner.form} {runner.precision} batch {batch}")
                latency, compute, reference_p50 = _time(runner, batch, shape, settings, reference)
                rows.append(BenchRow(
                    model=runner.label,
                    variant=f"{runner.form}@{size[0]}x{size[1]}",
                    backend=f"{runner.backend}-{settings.device}",
                    precision=runner.precision,
                    batch=batch,
                    latency=latency,
                    gpu_compute=compute,
                    reference_p50_ms=reference_p50,
                ))
    machine = describe_machine()
    machine.update(device=settings.device, threads=settings.threads, reference_workload=REFERENCE_WORKLOAD)
    report = {"results": [r.to_dict() for r in rows], "machine": machine}
    if checks:
        report["checks"] = checks
    if skipped:  # a fixed-batch graph runs only its own batch
        report["skipped_batches"] = skipped
    speedups = [
        {"model": fused.model, "batch": fused.batch, "fused_vs_multi_branch": multi.latency.p50 / fused.latency.p50}
        for fused in rows if fused.variant.startswith("fused")
        for multi in rows if multi.variant.startswith("multi-branch") and multi.batch == fused.batch and multi.model == fused.model
    ]
    if speedups:
        report["speedups"] = speedups
    return report


def merge_reports(reports: list[dict]) -> dict:
    """One report from several targets measured in the same session."""
    merged = {"results": [r for rep in reports for r in rep["results"]], "machine": reports[0]["machine"]}
    for key in ("checks", "skipped_batches", "speedups"):
        entries = [entry for rep in reports for entry in rep.get(key, [])]
        if entries:
            merged[key] = entries
    return merged
