"""Vector files: one float32 .npy matrix per pool version, written atomically.

A file is written as `<name>.tmp`, fsynced, renamed into place and its directory fsynced, so
after a crash it either exists whole or not at all. Only files this server wrote are ever
read back, always with `allow_pickle=False`, and their SHA-256 is checked against SQLite.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from app.faults import fault_point

_CHUNK = 1 << 20


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def write_vectors(path: Path, vectors: NDArray[np.float32]) -> str:
    """Write `vectors` to `path` durably; returns the file's SHA-256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as fh:
        np.save(fh, np.ascontiguousarray(vectors, dtype=np.float32), allow_pickle=False)
        fh.flush()
        os.fsync(fh.fileno())
    fault_point("vectors_written")
    digest = sha256_file(tmp)
    os.replace(tmp, path)
    fsync_dir(path.parent)
    fault_point("vectors_renamed")
    return digest


class CorruptVectorFile(RuntimeError):
    pass


def read_vectors(path: Path, *, expected_sha256: str, rows: int, dim: int) -> NDArray[np.float32]:
    """Memory-map a vector file this server wrote, after checking its hash and shape."""
    if sha256_file(path) != expected_sha256:
        raise CorruptVectorFile(f"vector file {path.name} does not match its recorded checksum")
    matrix = np.load(path, mmap_mode="r", allow_pickle=False)
    if matrix.dtype != np.float32 or matrix.shape != (rows, dim):
        raise CorruptVectorFile(
            f"vector file {path.name} has shape {matrix.shape} {matrix.dtype}, "
            f"expected ({rows}, {dim}) float32"
        )
    return matrix  # type: ignore[no-any-return]
