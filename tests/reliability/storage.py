"""Shared pieces of the storage reliability tests (RELIABILITY.md D1-D4).

Deterministic pool contents (rows derived from a seed and a tag, so any row found in a pool
tells which operation wrote it), reading a pool back over HTTP with its version, a select
that returns the whole pool (which checks that the search index holds exactly the pool's
rows), and an inspector of the data directory that lists what a crash, a failed publish or
recovery must not leave behind.
"""

from __future__ import annotations

import hashlib
import json
import random
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from numpy.typing import NDArray

from app.ingest import ExampleRecord
from app.store import PoolStore
from tests.e2e.server import Server

SEED = 20_251_202
LABELS = ("alpha", "beta", "gamma")
_WORDS = (
    "river stone lantern orbit meadow copper signal harbor violet engine quartz falcon "
    "garden ledger summit thistle marble beacon canyon willow ember prism glacier cobalt"
).split()
SELECT_K = 64  # the server's max_k: a select returns the whole pool when it has fewer rows
QUIET_TIMEOUT_S = 120.0


def make_rows(tag: str, n: int, *, seed: int = SEED, text_words: int = 6) -> list[dict[str, Any]]:
    """`n` rows written by the operation `tag`: ids `{tag}-{i}`, text and metadata naming it."""
    rng = random.Random(f"{seed}:{tag}")
    rows = []
    for i in range(n):
        label = LABELS[rng.randrange(len(LABELS))]
        words = " ".join(rng.choice(_WORDS) for _ in range(text_words))
        rows.append(
            {
                "id": f"{tag}-{i}",
                "input": f"{tag} row {i}: {words}",
                "output": label,
                "label": label,
                "metadata": {"tag": tag, "row": i},
            }
        )
    return rows


def jsonl(rows: Iterable[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def row_key(row: dict[str, Any]) -> str:
    """A row's identity and content, from an uploaded row or one the server returns."""
    ident = row.get("external_id", row.get("id"))
    metadata = row.get("metadata") or {}
    return json.dumps(
        [ident, row["input"], row.get("output"), row.get("label"), metadata], sort_keys=True
    )


def fingerprint(rows: Iterable[dict[str, Any]]) -> str:
    """Order-free checksum of rows' ids and contents."""
    digest = hashlib.sha256()
    for key in sorted(row_key(r) for r in rows):
        digest.update(key.encode())
        digest.update(b"\n")
    return digest.hexdigest()


def client_for(server: Server, timeout: float = 30.0) -> httpx.Client:
    return httpx.Client(base_url=server.url, timeout=timeout)


def upload(
    client: httpx.Client, pool: str, rows: Sequence[dict[str, Any]], mode: str
) -> httpx.Response:
    return client.post(
        f"/v1/pools/{pool}/examples",
        params={"mode": mode},
        content=jsonl(rows),
        headers={"content-type": "application/x-ndjson"},
    )


def wait_job(client: httpx.Client, job_id: str, timeout: float = QUIET_TIMEOUT_S) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job: dict[str, Any] = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] not in ("queued", "running"):
            return job
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} did not finish in {timeout}s")


def publish(
    client: httpx.Client, pool: str, rows: Sequence[dict[str, Any]], mode: str
) -> dict[str, Any]:
    """Upload and wait for the job; fails unless it succeeded."""
    response = upload(client, pool, rows, mode)
    assert response.status_code == 202, response.text
    job = wait_job(client, response.json()["job"]["id"])
    assert job["status"] == "succeeded", job
    return job


def wait_quiet(client: httpx.Client, timeout: float = QUIET_TIMEOUT_S) -> list[dict[str, Any]]:
    """Wait until no job is queued or running; returns every job."""
    deadline = time.monotonic() + timeout
    while True:
        jobs: list[dict[str, Any]] = client.get("/v1/jobs", params={"limit": 1000}).json()["data"]
        if not any(j["status"] in ("queued", "running") for j in jobs):
            return jobs
        if time.monotonic() > deadline:
            raise AssertionError(f"jobs still active after {timeout}s: {jobs[:5]}")
        time.sleep(0.05)


@dataclass(frozen=True)
class PoolState:
    """A pool as the server shows it: None version when the pool does not exist."""

    version: int | None
    size: int
    rows: list[dict[str, Any]]


def read_pool(client: httpx.Client, pool: str) -> PoolState:
    """The pool's description and every row of its active version (call it when quiet)."""
    info = client.get(f"/v1/pools/{pool}")
    if info.status_code == 404:
        return PoolState(None, 0, [])
    assert info.status_code == 200, info.text
    described = info.json()
    rows: list[dict[str, Any]] = []
    offset = 0
    for _ in range(10_000):
        page = client.get(f"/v1/pools/{pool}/examples", params={"offset": offset, "limit": 1000})
        assert page.status_code == 200, page.text
        body = page.json()
        assert body["version"] == described["version"], (pool, body["version"], described)
        rows.extend(body["examples"])
        offset += len(body["examples"])
        if not body["examples"] or offset >= body["total"]:
            break
    assert described["size"] == len(rows), (pool, described["size"], len(rows))
    return PoolState(int(described["version"]), int(described["size"]), rows)


def select_all(
    client: httpx.Client, pool: str, query: str = "river stone lantern"
) -> tuple[int, list[dict[str, Any]]]:
    """A select for `SELECT_K` demonstrations: (the version it names, the rows it returned).

    The version comes from the X-Pool-Version header, checked against the body's.
    """
    response = client.post(f"/v1/pools/{pool}/select", json={"query": query, "k": SELECT_K})
    assert response.status_code == 200, response.text
    body = response.json()
    header = int(response.headers["x-pool-version"])
    assert header == body["version"], (header, body["version"])
    return header, body["demonstrations"]


def check_select_matches(client: httpx.Client, pool: str, state: PoolState) -> list[str]:
    """Problems with a select on `pool` against its listed rows (empty when consistent)."""
    version, demos = select_all(client, pool)
    problems = []
    if version != state.version:
        problems.append(f"{pool}: select names v{version}, the pool is at v{state.version}")
    listed = {row_key(r) for r in state.rows}
    foreign = [d["external_id"] for d in demos if row_key(d) not in listed]
    if foreign:
        problems.append(f"{pool}: select returned rows not in v{state.version}: {foreign[:3]}")
    want = min(SELECT_K, state.size)  # every row is labeled, so every row is in the index
    ids = {d["id"] for d in demos}
    if len(ids) != want or len(demos) != want:
        problems.append(f"{pool}: select returned {len(demos)} rows, expected {want}")
    return problems


# --------------------------------------------------------------------- the data directory


def _connect_ro(data_dir: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(f"file:{data_dir / 'iclserve.sqlite3'}?mode=ro", uri=True, timeout=30)
    conn.row_factory = sqlite3.Row
    return conn


def active_jobs(data_dir: Path) -> list[str]:
    """Ids of upload jobs queued or running in the store (read while the server is down)."""
    conn = _connect_ro(data_dir)
    try:
        rows = conn.execute(
            "SELECT id FROM jobs WHERE status IN ('queued','running') ORDER BY created_at"
        ).fetchall()
        return [r["id"] for r in rows]
    finally:
        conn.close()


def leftovers(data_dir: Path, *, strict: bool) -> list[str]:
    """What a quiet store must not hold, in words; empty when clean.

    Always: temporary files, vector files no version references, referenced files that are
    missing, versions of pools that do not exist or newer than the active one, staged rows
    of jobs that are not active, and rows that no kept version can see. `strict` (right
    after recovery, before anything new was published): each pool keeps its active version
    only; otherwise the version before it may be kept for in-flight readers.
    """
    problems = [f"temporary file {p}" for p in data_dir.rglob("*.tmp")]
    conn = _connect_ro(data_dir)
    try:
        pools = {r["name"]: int(r["active_version"]) for r in conn.execute("SELECT * FROM pools")}
        versions = conn.execute("SELECT pool, version, vectors_file FROM versions").fetchall()
        referenced = set()
        for v in versions:
            pool, version = v["pool"], int(v["version"])
            referenced.add(v["vectors_file"])
            if pool not in pools:
                problems.append(f"version {version} of deleted pool {pool}")
                continue
            oldest = pools[pool] if strict else pools[pool] - 1
            if not oldest <= version <= pools[pool]:
                problems.append(f"pool {pool} keeps version {version} (active {pools[pool]})")
            if not (data_dir / v["vectors_file"]).is_file():
                problems.append(f"pool {pool} v{version}: file {v['vectors_file']} missing")
        vectors = data_dir / "vectors"
        on_disk = (
            {str(p.relative_to(data_dir)) for p in vectors.rglob("*") if p.is_file()}
            if vectors.is_dir()
            else set()
        )
        problems += [f"unreferenced vector file {name}" for name in sorted(on_disk - referenced)]
        if vectors.is_dir():
            problems += [
                f"vector directory of deleted pool {p.name}"
                for p in vectors.iterdir()
                if p.is_dir() and p.name not in pools
            ]
        staged = conn.execute(
            "SELECT job_id, COUNT(*) AS n FROM examples WHERE job_id IS NOT NULL AND job_id NOT "
            "IN (SELECT id FROM jobs WHERE status IN ('queued','running')) GROUP BY job_id"
        ).fetchall()
        problems += [f"{r['n']} staged rows of finished job {r['job_id']}" for r in staged]
        for pool, active in pools.items():
            oldest = active if strict else active - 1
            stale = conn.execute(
                "SELECT COUNT(*) FROM examples WHERE pool = ? AND removed_version IS NOT NULL "
                "AND removed_version <= ?",
                (pool, oldest),
            ).fetchone()[0]
            if stale:
                problems.append(f"pool {pool}: {stale} rows no kept version can see")
            future = conn.execute(
                "SELECT COUNT(*) FROM examples WHERE pool = ? AND added_version > ?",
                (pool, active),
            ).fetchone()[0]
            if future:
                problems.append(f"pool {pool}: {future} rows of versions after the active one")
        orphans = conn.execute(
            "SELECT COUNT(*) FROM examples WHERE pool NOT IN (SELECT name FROM pools)"
        ).fetchone()[0]
        if orphans:
            problems.append(f"{orphans} rows of deleted pools")
    finally:
        conn.close()
    return problems


# ---------------------------------------------------------------------- in-process store


def store_publish(
    store: PoolStore, pool: str, n: int, *, mode: str = "replace", tag: str = ""
) -> int:
    """Publish `n` rows through the store itself (random unit vectors, dim 8); the version."""
    job = store_stage(store, pool, n, mode=mode, tag=tag)
    ids, _ = store.staged_rows(job)
    return store.publish_upload(job, ids, unit_vectors(n), embedder_name="test")


def store_stage(
    store: PoolStore, pool: str, n: int, *, mode: str = "replace", tag: str = ""
) -> str:
    """Stage `n` rows as an upload job and mark it running, as the worker would; its id."""
    records = [
        ExampleRecord(
            input=f"{pool}{tag} row {i}",
            output="a",
            label="a",
            external_id=None,
            metadata=None,
            line=i + 1,
        )
        for i in range(n)
    ]
    job = store.stage_upload(pool, records, mode=mode, max_pool_rows=1_000_000)  # type: ignore[arg-type]
    assert store.start_job(job["id"])
    return str(job["id"])


def unit_vectors(n: int, dim: int = 8) -> NDArray[np.float32]:
    vectors = np.random.default_rng(n).standard_normal((n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors
