"""The sidecar ``<engine>.json``: what was compiled, how, with which library and on which GPU.

An engine only runs with the exact library that built it; :func:`check_engine` refuses a missing or
foreign sidecar, a replaced engine file or another library version before anything is deserialized.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from rvdeploy.backends import INSTALL_HINT, TENSORRT_BACKENDS
from rvdeploy.engine.library import Library, LibraryError, load_library
from rvdeploy.errors import RvdeployError
from rvdeploy.files import atomic_output, sha256_file

SIDECAR_FORMAT = "rvdeploy-engine/1"


class EngineFileError(RvdeployError):
    """An engine file that cannot be trusted to run here."""


def sidecar_path(engine: str | os.PathLike) -> Path:
    return Path(f"{engine}.json")


def read_sidecar(path: Path) -> dict | None:
    """The sidecar's content, or None when it is missing or not JSON."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def write_sidecar(engine: str | os.PathLike, sidecar: dict) -> None:
    with atomic_output(sidecar_path(engine)) as tmp:
        tmp.write_text(json.dumps(sidecar, indent=2, sort_keys=True) + "\n")


def check_engine(path: str | os.PathLike) -> tuple[dict, Library]:
    """The engine's sidecar and the library to run it, after checking the sidecar describes this
    very file and that library is installed in the same version."""
    path = Path(path)
    if not path.is_file():
        raise EngineFileError(f"{path}: no such file")
    side = sidecar_path(path)
    sidecar = read_sidecar(side)
    if sidecar is None or sidecar.get("format") != SIDECAR_FORMAT:
        raise EngineFileError(f"{path} has no readable rvdeploy sidecar ({side.name}): rebuild it with rvdeploy build-engine")
    if sidecar.get("engine_sha256") != sha256_file(path):
        raise EngineFileError(f"{path} does not match its sidecar (sha256 differs): the engine was replaced; rebuild it")
    # What the runner reads from it besides: the GPU it was built on, the precision, the graph's metadata.
    gpu = sidecar.get("gpu")
    if not (gpu is None or (isinstance(gpu, dict) and isinstance(gpu.get("name"), str)
                            and isinstance(gpu.get("compute_capability"), str))) \
            or not isinstance(sidecar.get("precision", ""), str) or not isinstance(sidecar.get("model_metadata", {}), dict):
        raise EngineFileError(f"{side.name} is malformed (gpu, precision or model_metadata): rebuild {path.name}")
    backend = sidecar.get("backend")
    if backend not in TENSORRT_BACKENDS:
        raise EngineFileError(f"{side.name} names an unknown backend {backend!r}")
    try:
        library = load_library(backend)
    except LibraryError:
        raise EngineFileError(f"{path} was built with {backend}, which is not installed: {INSTALL_HINT[backend]}") from None
    if library.version != sidecar.get("library_version"):
        raise EngineFileError(
            f"{path} was built with {backend} {sidecar.get('library_version')} but {library.version} is installed: rebuild it"
        )
    return sidecar, library
