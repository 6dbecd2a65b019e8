"""SQLite access: one writer connection behind a lock, one reader connection per thread.

WAL mode lets readers run while a writer commits; synchronous=FULL makes a commit durable
before it returns, which is what a 202 on upload and a published version promise.

A write that fails because the disk is full is rolled back whole and raised as
`InsufficientStorage` (507), so the caller reports a clean error and the last committed state,
the previously published versions included, stays as it was.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from app.errors import InsufficientStorage

SCHEMA = """
CREATE TABLE IF NOT EXISTS pools (
    name TEXT PRIMARY KEY,
    settings TEXT NOT NULL,
    active_version INTEGER NOT NULL DEFAULT 0,
    content_version INTEGER NOT NULL DEFAULT 0,
    embedder_name TEXT,
    dim INTEGER,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS versions (
    pool TEXT NOT NULL,
    version INTEGER NOT NULL,
    vectors_file TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    kind TEXT NOT NULL,
    stats TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (pool, version)
);
CREATE TABLE IF NOT EXISTS examples (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    pool TEXT NOT NULL,
    external_id TEXT,
    input TEXT NOT NULL,
    output TEXT,
    label TEXT,
    metadata TEXT,
    job_id TEXT,
    added_version INTEGER,
    removed_version INTEGER
);
CREATE INDEX IF NOT EXISTS examples_pool_live ON examples (pool, removed_version, added_version);
CREATE INDEX IF NOT EXISTS examples_job ON examples (job_id) WHERE job_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS examples_external ON examples (pool, external_id)
    WHERE external_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS annotations (
    pool TEXT NOT NULL,
    example_id INTEGER NOT NULL,
    version INTEGER NOT NULL,
    output TEXT,
    label TEXT,
    PRIMARY KEY (example_id, version)
);
CREATE INDEX IF NOT EXISTS annotations_pool ON annotations (pool, version);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    pool TEXT,
    status TEXT NOT NULL,
    done INTEGER NOT NULL DEFAULT 0,
    total INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    result TEXT,
    params TEXT,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS jobs_pool ON jobs (pool, created_at);
CREATE TABLE IF NOT EXISTS subsets (
    pool TEXT NOT NULL,
    name TEXT NOT NULL,
    method TEXT NOT NULL,
    budget INTEGER NOT NULL,
    params TEXT NOT NULL,
    seed INTEGER NOT NULL,
    status TEXT NOT NULL,
    job_id TEXT,
    pool_version INTEGER,
    content_version INTEGER,
    ids TEXT,
    timing TEXT,
    info TEXT,
    error TEXT,
    created_at REAL NOT NULL,
    finished_at REAL,
    PRIMARY KEY (pool, name)
);
CREATE TABLE IF NOT EXISTS presets (
    pool TEXT NOT NULL,
    name TEXT NOT NULL,
    method TEXT NOT NULL,
    k INTEGER NOT NULL,
    params TEXT NOT NULL,
    request TEXT NOT NULL,
    seed INTEGER NOT NULL,
    status TEXT NOT NULL,
    job_id TEXT,
    pool_version INTEGER,
    content_version INTEGER,
    ids TEXT,
    instruction TEXT,
    score REAL,
    history TEXT,
    info TEXT,
    timing TEXT,
    error TEXT,
    created_at REAL NOT NULL,
    finished_at REAL,
    PRIMARY KEY (pool, name)
);
"""


# Idle reader connections kept for reuse; more may be open while more threads read at once.
MAX_IDLE_READERS = 8


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30.0)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


_DISK_FULL_CODES = frozenset(
    {
        sqlite3.SQLITE_FULL,
        # ENOSPC while growing the WAL index or writing a page: SQLite reports these as I/O
        # errors rather than SQLITE_FULL.
        getattr(sqlite3, "SQLITE_IOERR_SHMSIZE", 4874),
        getattr(sqlite3, "SQLITE_IOERR_WRITE", 778),
    }
)


def is_disk_full(exc: sqlite3.Error) -> bool:
    """Whether SQLite failed because the file system ran out of space."""
    return getattr(exc, "sqlite_errorcode", None) in _DISK_FULL_CODES


def _rollback(conn: sqlite3.Connection) -> None:
    # SQLite rolls back by itself after some errors (SQLITE_FULL among them); a second
    # ROLLBACK would then raise and hide the original error.
    if conn.in_transaction:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass


class Database:
    """The pool store's SQLite file. `write()` is a transaction; `read()` a snapshot read."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._writer = _connect(path)
            self._writer.executescript(SCHEMA)
        except sqlite3.Error as exc:
            # WAL mode needs a few pages for its shared-memory index even to read.
            if is_disk_full(exc):
                raise InsufficientStorage(
                    f"cannot open {path.name}: the data directory is full; free disk space "
                    "and start again",
                    code="disk_full",
                ) from exc
            raise
        self._write_lock = threading.RLock()
        # Reader connections are pooled, not thread-local: worker threads come and go (AnyIO
        # retires idle ones), and a connection per thread ever seen leaked two descriptors
        # for every retired thread.
        self._idle_readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._closed = False

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """A serialised IMMEDIATE transaction, committed (durably) on normal exit.

        Any failure rolls it back whole; a full disk, in a statement or in the commit, is
        raised as `InsufficientStorage`.
        """
        with self._write_lock:
            conn = self._writer
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                except BaseException:
                    _rollback(conn)
                    raise
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                # A failed COMMIT may leave the transaction open (and the write lock held).
                _rollback(conn)
                if is_disk_full(exc):
                    raise InsufficientStorage(
                        "the data directory is full; nothing was changed, and the published "
                        "versions stay as they were. Free disk space and retry",
                        code="disk_full",
                    ) from exc
                raise

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """A consistent read-only snapshot on a pooled connection, held until the block ends."""
        with self._readers_lock:
            conn = self._idle_readers.pop() if self._idle_readers else None
        if conn is None:
            conn = _connect(self.path)
        try:
            conn.execute("BEGIN")
        except BaseException:
            conn.close()
            raise
        try:
            yield conn
        finally:
            self._release_reader(conn)

    def _release_reader(self, conn: sqlite3.Connection) -> None:
        try:
            conn.execute("COMMIT")
        except BaseException:
            # A connection whose snapshot cannot be ended is not reused.
            conn.close()
            raise
        with self._readers_lock:
            if self._closed or len(self._idle_readers) >= MAX_IDLE_READERS:
                conn.close()
            else:
                self._idle_readers.append(conn)

    def close(self) -> None:
        with self._readers_lock:
            self._closed = True
            for conn in self._idle_readers:
                conn.close()
            self._idle_readers.clear()
        with self._write_lock:
            self._writer.close()
