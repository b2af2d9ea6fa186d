"""Safe file output and content hashes."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from rvdeploy.errors import OutputError


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class FileDigest:
    """A file's SHA-256, hashed on a thread of its own from the moment this is made (hashlib leaves
    the GIL): the work that reads the file meanwhile (a fold and its proof) does not wait for it.
    :attr:`hex` waits for the digest."""

    def __init__(self, path: str | os.PathLike):
        pool = ThreadPoolExecutor(1)
        self._digest = pool.submit(sha256_file, path)
        pool.shutdown(wait=False)

    @property
    def hex(self) -> str:
        return self._digest.result()


def check_output_path(path: str | os.PathLike, what: str = "output") -> Path:
    """``path`` when a file can be written there, else one line naming ``what`` (``--report``...):
    callers with slow work ahead check before it."""
    if not str(path).strip():
        raise OutputError(f"{what} needs a file path, got an empty one")
    target = Path(path)
    if not target.parent.is_dir():
        raise OutputError(f"{what} directory {target.parent} does not exist")
    if target.is_dir():
        raise OutputError(f"{what} {target} is a directory")
    return target


@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it replaces ``path`` only if the block succeeds.

    A failure at any point leaves an existing ``path`` untouched and no temporary file behind.
    """
    target = check_output_path(path)
    parent = target.parent
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file ordinary permissions
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write {target}: {exc.strerror or exc}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
