"""A full disk (RELIABILITY.md D4, recipe G): the data directory on a small tmpfs.

A ballast file fills the tmpfs to a chosen free space, so each step hits ENOSPC where it
means to. On a real `iclserve serve` with the packaged MiniLM: an upload too big to stage is
refused with a clean error (507 `disk_full`, nothing stored, not even the new pool); an
upload that stages but whose vector file does not fit ends as a failed job saying so; a
reader selecting from the published pool throughout gets its version every time; a restart
with the disk still full comes up with the version intact and nothing left over; and once
space is freed the same upload publishes. In-process, the third place ENOSPC can strike,
the publish transaction's commit, is hit exactly and must leave the old version live and no
orphan vector file.

Mounting needs root; where it is not permitted the tests are skipped with the reason.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.errors import InsufficientStorage
from app.store import PoolStore
from tests.e2e.server import Server
from tests.fakes.upstream import FakeUpstream
from tests.reliability.figures import Figures
from tests.reliability.storage import (
    check_select_matches,
    client_for,
    fingerprint,
    leftovers,
    make_rows,
    publish,
    read_pool,
    select_all,
    store_publish,
    store_stage,
    unit_vectors,
    upload,
    wait_job,
)

pytestmark = pytest.mark.reliability

DISK_SIZE = "8m"
BALLAST = "ballast.bin"


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A fresh tmpfs of DISK_SIZE, unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK_SIZE}", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)], capture_output=True, timeout=30).returncode:
            subprocess.run(["umount", "-l", str(mount)], capture_output=True, timeout=30)


def fill(mount: Path, leave: int) -> None:
    """Make the ballast file as large as it takes to leave `leave` bytes free."""
    ballast = mount / BALLAST
    ballast.unlink(missing_ok=True)
    stat = os.statvfs(mount)
    size = stat.f_bavail * stat.f_frsize - leave
    assert size > 0, f"only {stat.f_bavail * stat.f_frsize} bytes free, wanted to leave {leave}"
    with ballast.open("wb") as fh:
        os.posix_fallocate(fh.fileno(), 0, size)


def free_bytes(mount: Path) -> int:
    stat = os.statvfs(mount)
    return stat.f_bavail * stat.f_frsize


class Reader(threading.Thread):
    """Selects from a pool until stopped, counting answers that are not its version."""

    def __init__(self, url: str, pool: str, version: int) -> None:
        super().__init__(daemon=True)
        self.url, self.pool, self.version = url, pool, version
        self.stop = threading.Event()
        self.answers = 0
        self.wrong: list[str] = []

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as client:
            for _ in range(100_000):
                if self.stop.wait(0.05):
                    return
                try:
                    version, _ = select_all(client, self.pool)
                except (AssertionError, httpx.HTTPError) as exc:
                    self.wrong.append(str(exc)[:200])
                    continue
                self.answers += 1
                if version != self.version:
                    self.wrong.append(f"served v{version}")


def test_full_disk_refuses_uploads_and_keeps_serving(
    small_disk: Path, fake_upstream: FakeUpstream, figures: Figures
) -> None:
    server = Server(small_disk, fake_upstream)
    outcomes: list[str] = []
    reader: Reader | None = None
    try:
        server.start()
        client = client_for(server, timeout=60)
        base = make_rows("base", 30)
        publish(client, "served", base, "replace")
        before = read_pool(client, "served")
        reader = Reader(server.url, "served", 1)
        reader.start()

        # 1. Nothing fits: staging fails in SQLite, for an existing pool and a new one.
        fill(small_disk, leave=64 * 1024)
        big = make_rows("big", 2000, text_words=60)  # about 1 MiB of JSONL
        for pool in ("served", "fresh"):
            response = upload(client, pool, big, "replace")
            outcomes.append(f"staging {pool}: {response.status_code}")
            assert response.status_code == 507, response.text
            error = response.json()["error"]
            assert error["code"] == "disk_full" and error["type"] == "storage_error", error
            assert "full" in error["message"]
        assert client.get("/v1/pools/fresh").status_code == 404  # not even half created

        # 2. The rows fit but the vector file (400 x 384 float32, 614 KB) does not.
        (small_disk / BALLAST).unlink()
        fill(small_disk, leave=400 * 1024)
        rows = make_rows("next", 400, text_words=3)
        response = upload(client, "served", rows, "replace")
        assert response.status_code == 202, response.text
        job = wait_job(client, response.json()["job"]["id"])
        outcomes.append(f"vector file: job {job['status']} ({job['error'][:40]}...)")
        assert job["status"] == "failed", job
        assert "full" in job["error"], job
        assert read_pool(client, "served") == before
        assert not check_select_matches(client, "served", before)
        assert leftovers(small_disk, strict=True) == []
        reader.stop.set()
        reader.join(timeout=60)

        # 3. Restarts. With no byte free, SQLite cannot even open (WAL mode needs room for
        # its index): the server must exit saying why, not hang. With a little room, it
        # comes up with the version intact and nothing left over.
        server.stop()
        (small_disk / BALLAST).unlink()
        fill(small_disk, leave=0)
        with pytest.raises(AssertionError):
            server.start()
        assert server.proc is not None and server.proc.returncode not in (None, 0)
        assert "the data directory is full" in server.log.read_text()
        outcomes.append("start on a 100% full disk: exits, saying the disk is full")
        (small_disk / BALLAST).unlink()
        fill(small_disk, leave=64 * 1024)
        server.start()
        after = read_pool(client, "served")
        assert after == before
        assert fingerprint(after.rows) == fingerprint(base)
        assert not check_select_matches(client, "served", after)
        assert leftovers(small_disk, strict=True) == []

        # 4. With space again, the same upload publishes.
        (small_disk / BALLAST).unlink()
        publish(client, "served", rows, "replace")
        assert fingerprint(read_pool(client, "served").rows) == fingerprint(rows)
        client.close()
    finally:
        if reader is not None:
            reader.stop.set()
            reader.join(timeout=60)
        server.kill()
    assert reader is not None and reader.answers > 0
    figures.record(
        "D4",
        "uploads into a full data directory (8 MiB tmpfs, MiniLM), with a reader selecting",
        "; ".join(outcomes)
        + f"; previous version served {reader.answers - len(reader.wrong)}/{reader.answers} "
        "selects; clean restart with 64 KiB free",
        "clean 507 or failed job, never 500; previous version keeps serving; clean restart",
        not reader.wrong,
        test="test_full_disk_refuses_uploads_and_keeps_serving",
    )
    assert not reader.wrong, reader.wrong[:5]


def test_full_disk_at_vector_write_and_commit_keeps_old_version(
    small_disk: Path, figures: Figures
) -> None:
    store = PoolStore(small_disk / "store")
    outcomes = []
    try:
        assert store_publish(store, "p", 50) == 1
        job = store_stage(store, "p", 3000, tag="-next")
        ids, _ = store.staged_rows(job)
        vectors = unit_vectors(3000)

        # The vector file does not fit.
        fill(small_disk, leave=16 * 1024)
        with pytest.raises(InsufficientStorage) as refused:
            store.publish_upload(job, ids, vectors, embedder_name="test")
        outcomes.append(f"vector file: {refused.value.status_code} {refused.value.code}")
        assert isinstance(refused.value.__cause__, OSError), refused.value.__cause__
        assert not list(small_disk.rglob("*.tmp"))

        # The file fits, the commit's pages do not: SQLite fails in the transaction.
        (small_disk / BALLAST).unlink()
        fill(small_disk, leave=vectors.nbytes + 8 * 1024)
        with pytest.raises(InsufficientStorage) as refused:
            store.publish_upload(job, ids, vectors, embedder_name="test")
        outcomes.append(f"commit: {refused.value.status_code} {refused.value.code}")
        assert isinstance(refused.value.__cause__, sqlite3.Error), refused.value.__cause__
        for snapshot in (store.snapshot("p"),):
            assert snapshot is not None and snapshot.version == 1 and snapshot.size == 50
        assert store.pool_info("p")["version"] == 1
        files = sorted(p.name for p in (small_disk / "store" / "vectors").rglob("*"))
        assert len(files) == 2 and files[0] == "p", files  # the directory and v1's file

        # With space again, the same job publishes, and a fresh store opens it.
        (small_disk / BALLAST).unlink()
        assert store.publish_upload(job, ids, vectors, embedder_name="test") == 2
    finally:
        store.close()
    reopened = PoolStore(small_disk / "store")
    try:
        reopened.recover()
        snapshot = reopened.snapshot("p")
        assert snapshot is not None and snapshot.version == 2 and snapshot.size == 3000
    finally:
        reopened.close()
    figures.record(
        "D4",
        "ENOSPC injected exactly at the vector write and at the publish commit (in-process)",
        ", ".join(outcomes) + "; old version live, no orphan file; publishes once freed",
        "InsufficientStorage (507), old version live, no leftovers",
        True,
        test="test_full_disk_at_vector_write_and_commit_keeps_old_version",
    )
