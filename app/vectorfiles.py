"""Vector files: one float32 .npy matrix per pool version, written atomically.

A file is written as `<name>.tmp`, fsynced, renamed into place and its directory fsynced, so
after a crash it either exists whole or not at all. Only files this server wrote are ever
read back, always with `allow_pickle=False`, and their SHA-256 is checked against SQLite.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
from pathlib import Path

import numpy as np
from numpy.lib import format as npy_format
from numpy.typing import NDArray

from app.errors import InsufficientStorage
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
    """Write `vectors` to `path` durably; returns the file's SHA-256.

    On failure nothing is left behind (no temporary file, no partial file); a full disk is
    raised as `InsufficientStorage`, other OS errors as they are.
    """
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        matrix = np.ascontiguousarray(vectors, dtype=np.float32)
        # What np.save writes, byte for byte; but np.save writes through ndarray.tofile,
        # whose short-write error has no errno, and a full disk must be recognisable.
        header = io.BytesIO()
        npy_format.write_array_header_1_0(header, npy_format.header_data_from_array_1_0(matrix))
        # Hashed from memory: reading the file back would be a second pass over all of it.
        hasher = hashlib.sha256(header.getbuffer())
        hasher.update(matrix.data)
        with tmp.open("wb") as fh:
            fh.write(header.getbuffer())
            fh.write(matrix.data)
            fh.flush()
            os.fsync(fh.fileno())
        fault_point("vectors_written")
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        # The half-written file would otherwise keep the space that ran out.
        tmp.unlink(missing_ok=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise InsufficientStorage(
                f"the data directory is full: no room for the {vectors.nbytes:,}-byte vector "
                "file of the new version; the previous version stays active. Free disk space "
                "and upload again",
                code="disk_full",
            ) from exc
        raise
    fault_point("vectors_renamed")
    return hasher.hexdigest()


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
