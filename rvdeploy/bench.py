"""Latency measurement the way trtexec does it, and a regression gate that holds across machines.

Each configuration is warmed up, then timed for at least ``min_s`` seconds and ``iters`` iterations;
per-iteration latencies give min, mean, p50, p90, p95, p99 and the throughput. On a GPU, CUDA events
time the GPU compute alone, reported apart from the end-to-end latency with host↔device copies.

Machines differ. Every run also times a fixed reference workload (a 3x3 conv, 64→64 channels on
56x56, batch 1) on the same backend, device and threads, interleaved with the model's iterations; a
latency divided by it is *normalised*, and the gate compares normalised latencies when the baseline
was recorded on another machine (or always, as CI does).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from rvdeploy.errors import RvdeployError

REGRESSION_EXIT = 5
REFERENCE_WORKLOAD = {"op": "conv3x3", "in_channels": 64, "out_channels": 64, "size": 56, "batch": 1}
LATENCY_KEYS = ("min", "mean", "p50", "p90", "p95", "p99")


class BenchError(RvdeployError):
    """A target, backend or baseline that cannot be benchmarked or compared."""


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


# -- the reference workload ------------------------------------------------------------------
def reference_workload(backend: str, device: str, threads: int | None) -> Callable[[], object]:
    """A callable running the fixed reference conv on ``backend``/``device``/``threads``."""
    w = REFERENCE_WORKLOAD
    rng = np.random.default_rng(0)
    x = rng.standard_normal((w["batch"], w["in_channels"], w["size"], w["size"]), dtype=np.float32)
    weight = rng.standard_normal((w["out_channels"], w["in_channels"], 3, 3), dtype=np.float32) * 0.05
    if backend == "ort":
        import onnx
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper

        graph = helper.make_graph(
            [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], "reference",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [numpy_helper.from_array(weight, "w")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = onnx.helper.find_min_ir_version_for(list(model.opset_import))
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
        session = ort.InferenceSession(model.SerializeToString(), options, providers=providers)
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


# -- comparison with a baseline --------------------------------------------------------------
MATCH_KEYS = ("model", "variant", "backend", "precision", "batch")


@dataclass
class Delta:
    key: tuple
    baseline_p50: float
    current_p50: float
    change_pct: float  # positive: slower
    normalized: bool

    @property
    def name(self) -> str:
        return " / ".join(str(k) for k in self.key)


@dataclass
class Comparison:
    deltas: list[Delta]
    normalized: bool
    max_regression_pct: float
    unmatched: list[str] = field(default_factory=list)

    @property
    def regressions(self) -> list[Delta]:
        return [d for d in self.deltas if d.change_pct > self.max_regression_pct]


def same_machine(a: dict, b: dict) -> bool:
    keys = ("cpu", "cpu_cores", "gpu")
    return all(a.get(k) == b.get(k) for k in keys)


def validate_report(data: object, where: str) -> dict:
    """A bench JSON (ours, or a baseline) with the documented schema, or a BenchError naming what is wrong."""
    if not isinstance(data, dict) or not isinstance(data.get("results"), list) or not isinstance(data.get("machine"), dict):
        raise BenchError(f"{where} is not an rvdeploy bench result (needs 'results' and 'machine')")
    for i, row in enumerate(data["results"]):
        missing = [k for k in (*MATCH_KEYS, "latency_ms", "throughput_ips") if not isinstance(row, dict) or k not in row]
        if missing or not isinstance(row.get("latency_ms"), dict) or "p50" not in row["latency_ms"]:
            raise BenchError(f"{where}: result {i} lacks {', '.join(missing) or 'latency_ms.p50'}")
    return data


def compare(current: dict, baseline: dict, max_regression_pct: float, normalize: str = "auto") -> Comparison:
    """Match rows by model, variant, backend, precision and batch, and compare their p50.

    ``normalize``: ``always`` compares p50 / reference p50, ``never`` raw p50, ``auto`` normalises
    only when the baseline's machine differs from the current one.
    """
    if normalize not in ("auto", "always", "never"):
        raise BenchError(f"normalize must be auto, always or never, got {normalize!r}")
    use_normalized = normalize == "always" or (normalize == "auto" and not same_machine(current["machine"], baseline["machine"]))
    base_rows = {tuple(r[k] for k in MATCH_KEYS): r for r in baseline["results"]}
    deltas, unmatched = [], []
    for row in current["results"]:
        key = tuple(row[k] for k in MATCH_KEYS)
        if key not in base_rows:
            unmatched.append(" / ".join(map(str, key)))
            continue
        old = base_rows[key]
        if use_normalized:
            if not row.get("reference_p50_ms") or not old.get("reference_p50_ms"):
                raise BenchError(f"cannot normalise {' / '.join(map(str, key))}: the baseline has no reference timing")
            before = old["latency_ms"]["p50"] / old["reference_p50_ms"]
            after = row["latency_ms"]["p50"] / row["reference_p50_ms"]
        else:
            before, after = old["latency_ms"]["p50"], row["latency_ms"]["p50"]
        deltas.append(Delta(key, before, after, (after / before - 1.0) * 100.0, use_normalized))
    if not deltas:
        raise BenchError("no result matches the baseline (model, variant, backend, precision and batch must agree)")
    return Comparison(deltas, use_normalized, max_regression_pct, unmatched)


# -- running a benchmark ---------------------------------------------------------------------
BACKEND_SUFFIXES = {"torch": None, "ort": (".onnx",), "trt": (".engine", ".plan")}


@dataclass(frozen=True)
class BenchSettings:
    batches: tuple[int, ...] = (1, 8, 32)
    warmup_s: float = 1.0
    min_s: float = 3.0
    iters: int = 20
    threads: int | None = None
    input_size: tuple[int, int] | None = None  # default: the model's recipe, else 224x224

    def __post_init__(self) -> None:
        if not self.batches or min(self.batches) < 1:
            raise BenchError("batch sizes must be positive integers")
        if self.warmup_s < 0 or self.min_s < 0 or self.iters < 1:
            raise BenchError("--warmup-s and --min-s must be >= 0 and --iters >= 1")
        if self.threads is not None and self.threads < 1:
            raise BenchError("--threads must be positive")


def _runners(target, backend: str, device: str, threads: int | None):
    """The runners to time: a training checkpoint gives its multi-branch net and its fold."""
    from rvdeploy.runners import OrtRunner, TorchRunner

    path = Path(target)
    if not path.exists():
        raise BenchError(f"{path}: no such file")
    suffixes = BACKEND_SUFFIXES[backend]
    if suffixes and path.suffix not in suffixes:
        raise BenchError(f"--backend {backend} needs a {' or '.join(suffixes)} target, got {path.name}")
    if backend == "torch":
        if path.suffix in (".onnx", ".engine", ".plan"):
            raise BenchError(f"--backend torch needs a checkpoint, got {path.name}")
        import torch

        from rvdeploy.checkpoint import load_weights
        from rvdeploy.reparam import fuse
        from rvdeploy.weights import TrainWeights

        if threads:
            torch.set_num_threads(threads)
        weights = load_weights(path)
        runners = [TorchRunner.from_weights(weights, path.name, device)]
        if isinstance(weights, TrainWeights):
            runners.append(TorchRunner.from_weights(fuse(weights)[0], path.name, device))
        return runners
    if backend == "ort":
        return [OrtRunner(path, device, threads)]
    from rvdeploy.engine.runtime import TensorRTRunner

    return [TensorRTRunner(path)]


def _time(runner, batch: int, size: tuple[int, int], settings: BenchSettings, device: str,
          reference: Callable[[], object]) -> tuple[Latency, Latency | None, float]:
    x = np.random.default_rng(batch).standard_normal((batch, 3, *size), dtype=np.float32)
    timing = dict(warmup_s=settings.warmup_s, min_s=settings.min_s, min_iters=settings.iters)
    # End to end: includes the host<->device copies on a GPU.
    end_to_end, reference_p50 = measure_with_reference(lambda: runner.infer(x), reference, batch, **timing)
    compute = None
    if device == "cuda" and hasattr(runner, "device_session"):
        compute = measure_cuda(runner.device_session(x), batch, stream=getattr(runner, "stream", None), **timing)
    return end_to_end, compute, reference_p50


def bench_target(target, backend: str, device: str = "cpu", settings: BenchSettings = BenchSettings(),
                 progress: Callable[[str], None] | None = None) -> dict:
    """Time ``target`` at every batch size; the report follows the documented JSON schema."""
    from rvdeploy.machine import describe_machine

    if backend not in BACKEND_SUFFIXES:
        raise BenchError(f"unknown backend {backend!r}; choose {', '.join(BACKEND_SUFFIXES)}")
    device = "cuda" if backend == "trt" else device  # engines run on the GPU
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise BenchError("--device cuda: no CUDA GPU is available here")
    runners = _runners(target, backend, device, settings.threads)
    reference = reference_workload(backend, device, settings.threads)
    rows = []
    for runner in runners:
        with runner:
            size = settings.input_size or (runner.preprocess.input_size if runner.preprocess else (224, 224))
            batches = (runner.fixed_batch,) if runner.fixed_batch else settings.batches
            for batch in batches:
                if progress:
                    progress(f"{runner.name} {runner.form} {runner.precision} batch {batch}")
                latency, compute, reference_p50 = _time(runner, batch, size, settings, device, reference)
                rows.append(BenchRow(
                    model=runner.arch,
                    variant=f"{runner.form}@{size[0]}x{size[1]}",
                    backend=f"{runner.backend}-{device}",
                    precision=runner.precision,
                    batch=batch,
                    latency=latency,
                    gpu_compute=compute,
                    reference_p50_ms=reference_p50,
                ))
    machine = describe_machine()
    machine.update(device=device, threads=settings.threads, reference_workload=REFERENCE_WORKLOAD)
    report = {"results": [r.to_dict() for r in rows], "machine": machine}
    speedups = []
    for fused in (r for r in rows if r.variant.startswith("fused")):
        for multi in (r for r in rows if r.variant.startswith("multi-branch") and r.batch == fused.batch and r.model == fused.model):
            speedups.append({"model": fused.model, "batch": fused.batch, "fused_vs_multi_branch": multi.latency.p50 / fused.latency.p50})
    if speedups:
        report["speedups"] = speedups
    return report


def backend_for(target) -> str:
    """The backend a target's kind implies: .onnx → ort, .engine → trt, anything else → torch."""
    suffix = Path(target).suffix
    return next((b for b, suffixes in BACKEND_SUFFIXES.items() if suffixes and suffix in suffixes), "torch")


def merge_reports(reports: list[dict]) -> dict:
    """One report from several targets measured in the same session."""
    merged = {"results": [r for rep in reports for r in rep["results"]], "machine": reports[0]["machine"]}
    speedups = [s for rep in reports for s in rep.get("speedups", [])]
    if speedups:
        merged["speedups"] = speedups
    return merged


def markdown_table(report: dict) -> str:
    lines = ["| model | variant | backend | precision | batch | p50 ms | p90 ms | p99 ms | img/s | GPU compute p50 ms |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["results"]:
        lat, gpu = r["latency_ms"], r.get("gpu_compute_ms")
        gpu_cell = f"{gpu['p50']:.3f}" if gpu else "-"
        lines.append(f"| {r['model']} | {r['variant']} | {r['backend']} | {r['precision']} | {r['batch']} | {lat['p50']:.3f} | "
                     f"{lat['p90']:.3f} | {lat['p99']:.3f} | {r['throughput_ips']:.1f} | {gpu_cell} |")
    return "\n".join(lines)


def plot_throughput(report: dict, path) -> None:
    """A bar chart of throughput per configuration, written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rvdeploy.files import atomic_output

    rows = report["results"]
    labels = [f"{r['model']}\n{r['variant'].split('@')[0]} {r['precision']}\n{r['backend']} b{r['batch']}" for r in rows]
    figure, axis = plt.subplots(figsize=(max(6, 1.3 * len(rows)), 4.5))
    bars = axis.bar(range(len(rows)), [r["throughput_ips"] for r in rows], color="#4c72b0")
    axis.bar_label(bars, fmt="%.0f", fontsize=8)
    axis.set_xticks(range(len(rows)), labels, fontsize=7)
    axis.set_ylabel("images / s")
    machine = report["machine"]
    axis.set_title(f"rvdeploy bench on {machine.get('gpu') or machine.get('cpu')} ({machine.get('cpu_cores')} cores)", fontsize=10)
    figure.tight_layout()
    with atomic_output(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120)
    plt.close(figure)
