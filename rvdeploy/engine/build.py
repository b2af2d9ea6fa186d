"""TensorRT engines from typed ONNX graphs, with the TensorRT or the TensorRT-RTX builder.

TensorRT 11 networks are strongly typed: there are no precision builder flags; the graph's FP16
tensors and Q/DQ nodes decide. Both libraries share one Python API, so there is one code path;
what differs (the strongly-typed flag, timing caches) lives in :class:`Backend`.

Every engine gets a sidecar ``<engine>.json`` recording what was compiled, how, with which library
and on which GPU; a rebuild with identical inputs and settings is skipped.
"""

from __future__ import annotations

import datetime
import os
import time
from dataclasses import dataclass
from pathlib import Path

from rvdeploy import __version__
from rvdeploy.engine.library import Library, collecting_logger, load_library
from rvdeploy.engine.sidecar import SIDECAR_FORMAT, read_sidecar, sidecar_path, write_sidecar
from rvdeploy.errors import RvdeployError, first_line
from rvdeploy.files import atomic_output, sha256_file
from rvdeploy.onnx_io import load_onnx, precision_label, read_metadata, runtime_inputs

DEFAULT_BATCHES = (1, 8, 32)


class EngineBuildError(RvdeployError):
    """A graph the builder rejects, settings that make no sense, or no builder at all."""


@dataclass(frozen=True)
class BuildSettings:
    min_batch: int | None = None  # None: the defaults for a dynamic batch, the graph's own when fixed
    opt_batch: int | None = None
    max_batch: int | None = None
    workspace_mb: int | None = None
    opt_level: int | None = None
    tf32: bool = False
    timing_cache: str | None = None

    def __post_init__(self) -> None:
        given = [b for b in (self.min_batch, self.opt_batch, self.max_batch) if b is not None]
        if any(b < 1 for b in given):
            raise EngineBuildError("batch sizes must be positive")
        lo, opt, hi = self.batches(DEFAULT_BATCHES)
        if not lo <= opt <= hi:
            raise EngineBuildError(f"batch profile must satisfy min <= opt <= max, got min {lo}, opt {opt}, max {hi}")
        if self.workspace_mb is not None and self.workspace_mb <= 0:
            raise EngineBuildError(f"workspace must be a positive number of MB, got {self.workspace_mb}")
        if self.opt_level is not None and not 0 <= self.opt_level <= 5:
            raise EngineBuildError(f"optimisation level must be 0 to 5, got {self.opt_level}")

    def batches(self, defaults: tuple[int, int, int]) -> tuple[int, int, int]:
        """(min, opt, max): given values, the rest from ``defaults`` clamped around them."""
        lo = self.min_batch if self.min_batch is not None else min(defaults[0], self.opt_batch or defaults[0], self.max_batch or defaults[0])
        hi = self.max_batch if self.max_batch is not None else max(defaults[2], self.opt_batch or 0, lo)
        opt = self.opt_batch if self.opt_batch is not None else min(max(defaults[1], lo), hi)
        return lo, opt, hi

    @property
    def batch_given(self) -> bool:
        return any(b is not None for b in (self.min_batch, self.opt_batch, self.max_batch))


@dataclass
class BuildResult:
    engine: Path
    sidecar: dict
    skipped: bool  # an identical build was already there


def _gpu() -> dict | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    return {"name": torch.cuda.get_device_name(0), "compute_capability": ".".join(map(str, torch.cuda.get_device_capability(0)))}


def _parse(library: Library, onnx_path: Path):
    trt = library.trt
    logger = collecting_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(library.strongly_typed_flag)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes(), str(onnx_path)):
        errors = [parser.get_error(i) for i in range(parser.num_errors)]
        first = errors[0]
        desc = first_line(first.desc())
        raise EngineBuildError(
            f"{library.name} cannot parse {onnx_path}: node {first.node_name() or first.node()} "
            f"({first.node_operator()}): {desc}" + (f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else "")
        )
    return builder, network, parser, logger


def _profile(network, settings: BuildSettings) -> list[dict]:
    tensor = network.get_input(0)
    shape = list(tensor.shape)
    if shape[0] != -1:
        if settings.batch_given:
            raise EngineBuildError(f"--min/--opt/--max-batch apply to dynamic-batch graphs; this graph has a fixed batch of {shape[0]}")
        return [{"input": tensor.name, "min": shape, "opt": shape, "max": shape}]
    lo, opt, hi = settings.batches(DEFAULT_BATCHES)
    return [{"input": tensor.name, "min": [lo, *shape[1:]], "opt": [opt, *shape[1:]], "max": [hi, *shape[1:]]}]


def _configure(library: Library, builder, settings: BuildSettings, profiles: list[dict]):
    trt = library.trt
    config = builder.create_builder_config()
    if not settings.tf32:
        config.clear_flag(trt.BuilderFlag.TF32)  # FP32 layers must match ONNX Runtime
    if settings.workspace_mb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_mb << 20)
    if settings.opt_level is not None:
        config.builder_optimization_level = settings.opt_level
    profile = builder.create_optimization_profile()
    for p in profiles:
        profile.set_shape(p["input"], p["min"], p["opt"], p["max"])
    config.add_optimization_profile(profile)
    timing_cache = None
    if settings.timing_cache and library.uses_timing_cache:
        path = Path(settings.timing_cache)
        timing_cache = config.create_timing_cache(path.read_bytes() if path.exists() else b"")
        config.set_timing_cache(timing_cache, ignore_mismatch=False)
    return config, timing_cache


def compile_onnx(onnx_path: str | os.PathLike, library: Library, settings: BuildSettings = BuildSettings()) -> tuple[bytes, list[dict]]:
    """A serialized engine for the graph at ``onnx_path`` and the profiles it was built with."""
    onnx_path = Path(onnx_path)
    builder, network, _parser, _logger = _parse(library, onnx_path)
    profiles = _profile(network, settings)
    config, timing_cache = _configure(library, builder, settings, profiles)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        errors = [msg for severity, msg in _logger.messages if severity in (library.trt.Logger.ERROR, library.trt.Logger.INTERNAL_ERROR)]
        raise EngineBuildError(f"{library.name} could not build an engine from {onnx_path}" + (f": {errors[0]}" if errors else ""))
    if timing_cache is not None:
        with atomic_output(settings.timing_cache) as tmp:
            tmp.write_bytes(bytes(timing_cache.serialize()))
    return bytes(serialized), profiles


def _tensors(values) -> list[dict]:
    """Name and shape (a dimension's name where it is dynamic) of graph inputs or outputs."""
    return [{"name": v.name, "shape": [d.dim_value if d.HasField("dim_value") else d.dim_param or "?"
                                       for d in v.type.tensor_type.shape.dim]} for v in values]


def _same_build(old: dict, request: dict, engine: Path) -> bool:
    return (
        old.get("format") == SIDECAR_FORMAT
        and old.get("request") == request
        and engine.exists()
        and old.get("engine_sha256") == sha256_file(engine)
    )


def build_engine(onnx_path: str | os.PathLike, engine_path: str | os.PathLike, backend: str = "auto",
                 settings: BuildSettings = BuildSettings(), force: bool = False) -> BuildResult:
    """Compile ``onnx_path`` to ``engine_path`` and write its sidecar; skip an identical earlier build."""
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    model = load_onnx(onnx_path)  # "no such file" / "not an ONNX model" in one line
    meta = read_metadata(model)
    chosen = load_library(backend)
    # Everything that decides the engine's bytes: equal requests give equal engines.
    request = {
        "onnx_sha256": sha256_file(onnx_path),
        "backend": chosen.name,
        "library_version": chosen.version,
        "batches": list(settings.batches(DEFAULT_BATCHES)),
        "builder": {
            "strongly_typed": True,
            "tf32": settings.tf32,
            "workspace_mb": settings.workspace_mb,
            "opt_level": settings.opt_level,
            "timing_cache": settings.timing_cache if chosen.uses_timing_cache else None,
        },
    }
    side = sidecar_path(engine_path)
    old = read_sidecar(side) if side.exists() and not force else None
    if old is not None and _same_build(old, request, engine_path):
        return BuildResult(engine_path, old, skipped=True)
    start = time.perf_counter()
    engine, profiles = compile_onnx(onnx_path, chosen, settings)
    seconds = time.perf_counter() - start
    gpu = _gpu()
    with atomic_output(engine_path) as tmp:
        tmp.write_bytes(engine)
    sidecar = {
        "format": SIDECAR_FORMAT,
        "request": request,
        "onnx": str(onnx_path),
        "precision": precision_label(meta, with_target=False),
        "backend": chosen.name,
        "library_version": chosen.version,
        "profiles": profiles,
        "inputs": _tensors(runtime_inputs(model)),
        "outputs": _tensors(model.graph.output),  # every one: a backbone export has one per feature stage
        "engine_sha256": sha256_file(engine_path),
        "engine_bytes": len(engine),
        "build_seconds": round(seconds, 3),
        "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpu": gpu,  # None: compiled ahead of time on a machine without one
        "ahead_of_time": gpu is None,
        "model_metadata": meta,
        "rvdeploy_version": __version__,
    }
    write_sidecar(engine_path, sidecar)
    return BuildResult(engine_path, sidecar, skipped=False)
