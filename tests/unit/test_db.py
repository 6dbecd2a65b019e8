"""The SQLite wrapper's reader connections: reused, bounded, and not tied to threads."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from app.db import MAX_IDLE_READERS, Database


def _open_descriptors_on(path: Path) -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == str(path):
                count += 1
        except OSError:
            continue
    return count


def test_short_lived_threads_do_not_leave_connections_behind(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite3"
    db = Database(path)
    try:

        def read_once() -> None:
            with db.read() as conn:
                conn.execute("SELECT 1").fetchone()

        for _ in range(200):
            worker = threading.Thread(target=read_once)
            worker.start()
            worker.join()
        # The writer plus at most one reused reader: 200 retired threads leave nothing open.
        assert _open_descriptors_on(path) <= 2
    finally:
        db.close()


def test_connections_are_bounded_by_concurrent_readers_not_by_threads(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite3"
    db = Database(path)
    readers = 12
    inside = threading.Barrier(readers)
    seen: set[int] = set()
    lock = threading.Lock()

    def read_together() -> None:
        with db.read() as conn:
            inside.wait(timeout=10)
            with lock:
                seen.add(id(conn))

    try:
        for _ in range(5):  # five rounds of twelve new threads each
            workers = [threading.Thread(target=read_together) for _ in range(readers)]
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join()
        assert len(db._idle_readers) <= MAX_IDLE_READERS
        # SQLite keeps a closed connection's descriptor while other connections of the process
        # hold locks on the file, and reuses it for the next open: the count follows the peak
        # of simultaneous readers (plus the writer), not the 60 threads that read.
        assert _open_descriptors_on(path) <= 1 + readers
    finally:
        db.close()


def test_a_failed_read_block_returns_its_connection(tmp_path: Path) -> None:
    db = Database(tmp_path / "store.sqlite3")
    try:
        for _ in range(3):
            try:
                with db.read() as conn:
                    conn.execute("SELECT 1")
                    raise KeyError("not found")
            except KeyError:
                pass
        with db.read() as conn:
            assert conn.execute("SELECT 1").fetchone()[0] == 1
        assert _open_descriptors_on(tmp_path / "store.sqlite3") <= 2
    finally:
        db.close()
