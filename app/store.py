"""The embedded pool store: SQLite rows plus one vector file per pool version.

Versions and visibility
    An example row is visible at version v when `added_version <= v` and it was not removed
    at or before v. Rows of an upload that is still embedding carry the job's id and no
    `added_version`, so no reader sees them. Annotations (PATCH) are rows of their own keyed
    by (example, version), so a reader pinned to version v sees v's labels even while v+1 is
    being published.

Publishing (ARCHITECTURE.md "Storage")
    1. the new vector file is written to a temporary name, fsynced, renamed, dir fsynced;
    2. one SQLite transaction (synchronous=FULL) marks the rows, records the version with the
       file's checksum and flips `pools.active_version`;
    3. the in-process snapshot pointer is swapped;
    4. versions no snapshot in use still needs are forgotten, with the rows only they saw and
       their vector files (a request or job holding an older snapshot keeps its rows).
    A crash before 2 commits leaves the old version and an orphan file, which recovery
    deletes; after 2 the new version is complete on disk. A failure before 2 commits (a full
    disk, a cancelled job) removes the new file at once and leaves the old version live.
    Recovery at startup, when no reader exists, keeps only each pool's active version.

All methods are synchronous and thread-safe; the app calls them from worker threads. Only
this process writes the data directory (one worker per container).
"""

from __future__ import annotations

import json
import logging
import secrets
import sqlite3
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field

from app.db import Database
from app.errors import (
    Conflict,
    ICLServeError,
    InsufficientStorage,
    InvalidRequest,
    NotFound,
    UnprocessableUpload,
)
from app.faults import fault_point
from app.ingest import ExampleRecord
from app.settings import IndexSettings
from app.snapshot import MemberLabels, PoolSnapshot
from app.templates import Template
from app.vectorfiles import read_vectors, write_vectors
from selection.ordering import OrderName
from selection.specs import KnnSpec, SelectorSpec

log = logging.getLogger("iclserve.store")

INDEX_KIND = "faiss-flat-ip"
JOB_ACTIVE = ("queued", "running")
MAX_REPORTED_ROWS = 20


class PoolSettings(BaseModel):
    """A pool's defaults, set with `PUT /v1/pools/{pool}`."""

    # Frozen: `PoolStore.settings_of` hands the same object to every request.
    model_config = ConfigDict(extra="forbid", frozen=True)

    description: str | None = Field(None, max_length=4000)
    task: Literal["classification", "generation"] = Field(
        "classification",
        description="classification: `label` defaults to `output` when absent.",
    )
    template: Template = Field(default_factory=Template)
    selector: SelectorSpec = Field(default_factory=KnnSpec)
    order: OrderName = "nearest_last"
    k: int | None = Field(None, ge=1, description="Default number of demonstrations.")


class PoolSettingsUpdate(BaseModel):
    """The body of `PUT /v1/pools/{pool}`: fields given replace the stored ones."""

    model_config = ConfigDict(extra="forbid")

    description: str | None = Field(None, max_length=4000)
    task: Literal["classification", "generation"] | None = None
    template: Template | None = None
    selector: SelectorSpec | None = None
    order: OrderName | None = None
    k: int | None = Field(None, ge=1)


@dataclass(frozen=True, slots=True)
class ExampleRow:
    id: int
    external_id: str | None
    input: str
    output: str | None
    label: str | None
    metadata: dict[str, Any] | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "external_id": self.external_id,
            "input": self.input,
            "output": self.output,
            "label": self.label,
            "metadata": self.metadata,
        }


@dataclass(frozen=True, slots=True)
class Annotation:
    """One PATCH item: `ref` is a server id (int) or an external id (str)."""

    ref: int | str
    output: str | None
    label: str | None
    set_output: bool
    set_label: bool


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, tz=UTC).isoformat().replace("+00:00", "Z")


def new_job_id() -> str:
    return "job_" + secrets.token_hex(12)


# The state of every visible row of a pool at version :v, with its newest annotation.
_VISIBLE = """
SELECT e.id, e.external_id, e.input, e.metadata,
       CASE WHEN an.example_id IS NULL THEN e.output ELSE an.output END AS output,
       CASE WHEN an.example_id IS NULL THEN e.label ELSE an.label END AS label
FROM examples e
LEFT JOIN (
    SELECT a.example_id, a.output, a.label
    FROM annotations a
    JOIN (SELECT example_id, MAX(version) AS v FROM annotations
          WHERE pool = :pool AND version <= :v GROUP BY example_id) latest
      ON a.example_id = latest.example_id AND a.version = latest.v
) an ON an.example_id = e.id
WHERE e.pool = :pool AND e.added_version IS NOT NULL AND e.added_version <= :v
  AND (e.removed_version IS NULL OR e.removed_version > :v)
"""

# `_VISIBLE` for a handful of rows, as a request or an annotation needs them: the outer filter
# of `SELECT * FROM (_VISIBLE) WHERE id IN (...)` is not pushed into the subquery, so that form
# walks the whole pool (30 ms at 100k rows). Here `{match}` picks rows by primary key (or by
# the external-id index), and each row's latest annotation at or before :v is a lookup in
# the annotations primary key. The unary `+` keeps the planner off the (pool, version) index,
# which would scan the pool again.
_VISIBLE_MATCHING = """
SELECT e.id, e.external_id, e.input, e.metadata,
       CASE WHEN an.example_id IS NULL THEN e.output ELSE an.output END AS output,
       CASE WHEN an.example_id IS NULL THEN e.label ELSE an.label END AS label
FROM examples e
LEFT JOIN annotations an
  ON an.example_id = e.id AND an.pool = :pool
 AND an.version = (SELECT MAX(a2.version) FROM annotations a2
                   WHERE a2.example_id = e.id AND a2.pool = :pool AND a2.version <= :v)
WHERE {match}
  AND +e.added_version IS NOT NULL AND +e.added_version <= :v
  AND (+e.removed_version IS NULL OR +e.removed_version > :v)
"""


def _row_to_example(row: sqlite3.Row) -> ExampleRow:
    meta = row["metadata"]
    return ExampleRow(
        id=int(row["id"]),
        external_id=row["external_id"],
        input=row["input"],
        output=row["output"],
        label=row["label"],
        metadata=json.loads(meta) if meta is not None else None,
    )


class _RowCache:
    """Rows of published versions by (pool, version, id), least recently used out first.

    A row as of a published version never changes (annotations and removals make new
    versions), so a hit needs no read; the demonstrations a pool serves repeat from query to
    query. Bounded in rows and in characters. What the database forgets, this forgets too:
    `forget` (a pool deleted, whose version numbers start again; or its old versions
    collected) bumps a generation, and a read that overlapped it stores nothing.
    """

    def __init__(self, max_rows: int, max_chars: int) -> None:
        self.max_rows = max_rows
        self.max_chars = max_chars
        self._rows: OrderedDict[tuple[str, int, int], tuple[ExampleRow, int]] = OrderedDict()
        self._chars = 0
        self._generation = 0
        self._lock = threading.Lock()

    @property
    def generation(self) -> int:
        """Take it before deciding that a version is published, and store under it."""
        with self._lock:
            return self._generation

    def lookup(self, pool: str, version: int, ids: Sequence[int]) -> dict[int, ExampleRow]:
        """The rows of `ids` that are here."""
        found: dict[int, ExampleRow] = {}
        with self._lock:
            for row_id in ids:
                entry = self._rows.get((pool, version, row_id))
                if entry is not None:
                    self._rows.move_to_end((pool, version, row_id))
                    found[row_id] = entry[0]
        return found

    def store(self, pool: str, version: int, rows: Sequence[ExampleRow], generation: int) -> None:
        with self._lock:
            if generation != self._generation:
                return
            for row in rows:
                size = _row_chars(row)
                key = (pool, version, row.id)
                if size > self.max_chars // 16 or key in self._rows:
                    continue
                self._rows[key] = (row, size)
                self._chars += size
            while self._rows and (len(self._rows) > self.max_rows or self._chars > self.max_chars):
                _, (_, size) = self._rows.popitem(last=False)
                self._chars -= size

    def forget(self, pool: str, *, before: int | None = None) -> None:
        """Drop `pool`'s rows (of the versions before `before`, if given)."""
        with self._lock:
            self._generation += 1
            gone = [k for k in self._rows if k[0] == pool and (before is None or k[1] < before)]
            for key in gone:
                self._chars -= self._rows.pop(key)[1]


def _row_chars(row: ExampleRow) -> int:
    meta = 0 if row.metadata is None else len(json.dumps(row.metadata))
    return len(row.input) + len(row.output or "") + len(row.label or "") + meta + 64


ROW_CACHE_ROWS = 4_096
ROW_CACHE_CHARS = 8_000_000


class PoolStore:
    def __init__(
        self, data_dir: Path, *, max_pools: int = 1000, index: IndexSettings | None = None
    ) -> None:
        self.data_dir = data_dir
        self.index_settings = index or IndexSettings()
        self.vectors_dir = data_dir / "vectors"
        self.max_pools = max_pools
        data_dir.mkdir(parents=True, exist_ok=True)
        self.vectors_dir.mkdir(parents=True, exist_ok=True)
        self.db = Database(data_dir / "iclserve.sqlite3")
        self._pool_locks: dict[str, threading.RLock] = {}
        self._locks_guard = threading.Lock()
        self._snapshots: dict[str, PoolSnapshot] = {}
        self._snapshot_guard = threading.Lock()
        # Every snapshot handed out, weakly: those still alive pin their versions' rows.
        self._issued: dict[str, list[weakref.ref[PoolSnapshot]]] = {}
        # Settings as last read, by pool; a write that may change them bumps the generation
        # (after its commit) and clears them, and a read that overlapped a write keeps nothing.
        self._settings: dict[str, PoolSettings] = {}
        self._settings_generation = 0
        self._settings_guard = threading.Lock()
        self._rows = _RowCache(ROW_CACHE_ROWS, ROW_CACHE_CHARS)

    def close(self) -> None:
        self.db.close()

    def pool_lock(self, pool: str) -> threading.RLock:
        with self._locks_guard:
            lock = self._pool_locks.get(pool)
            if lock is None:
                lock = self._pool_locks[pool] = threading.RLock()
            return lock

    # ----------------------------------------------------------------------------- recovery

    def recover(self) -> list[str]:
        """Repair the store after a crash; returns the ids of upload jobs to resume.

        Upload jobs that were queued or running resume: their rows were durable before the
        202. Other interrupted jobs are marked failed. Staged rows of jobs that did not
        survive are deleted. No reader exists yet, so each pool keeps only its active version:
        older versions and the rows only they saw are deleted, and every file in the vectors
        directory that no remaining version references (temporary files of an interrupted
        publish included) is removed.
        """
        # Orphan files first: after a crash on a full disk they hold the space the repair
        # below needs.
        self._remove_unreferenced_files()
        try:
            resume = self._repair()
        except InsufficientStorage:
            # Still full: serve the published versions rather than fail to start. Interrupted
            # jobs stay as they are, to be repaired by a start with free space.
            log.error("data directory full: started without repairing interrupted jobs")
            return []
        fault_point("recovery_committed")
        self._remove_unreferenced_files()
        return resume

    def _repair(self) -> list[str]:
        now = time.time()
        with self.db.write() as conn:
            conn.execute(
                "UPDATE jobs SET status='failed', finished_at=?, error=? "
                "WHERE status IN ('queued','running') AND kind != 'upload'",
                (now, "interrupted by a server restart; resubmit it"),
            )
            conn.execute(
                "UPDATE jobs SET status='queued', started_at=NULL "
                "WHERE status IN ('queued','running') AND kind = 'upload'"
            )
            conn.execute(
                "UPDATE subsets SET status='failed', finished_at=?, error=? "
                "WHERE status = 'computing'",
                (now, "interrupted by a server restart; resubmit it"),
            )
            conn.execute(
                "UPDATE presets SET status='failed', finished_at=?, error=? "
                "WHERE status = 'computing'",
                (now, "interrupted by a server restart; resubmit it"),
            )
            conn.execute(
                "DELETE FROM examples WHERE job_id IS NOT NULL AND job_id NOT IN "
                "(SELECT id FROM jobs WHERE status = 'queued')"
            )
            pools = conn.execute("SELECT name, active_version FROM pools").fetchall()
            for pool, active in pools:
                self._forget_before(conn, pool, int(active))
            resume = [
                r["id"]
                for r in conn.execute(
                    "SELECT id FROM jobs WHERE status='queued' AND kind='upload' "
                    "ORDER BY created_at"
                )
            ]
        return resume

    def _remove_unreferenced_files(
        self, pool: str | None = None, *, fault_after_first: str | None = None
    ) -> None:
        """Delete vector files no version references: of `pool`, or of every pool.

        With a pool, call it under that pool's lock: the pool's next file may be on disk
        before the version referencing it is committed, and only the lock holder knows.
        `fault_after_first` names the crash point reached after the first file is removed.
        """
        root = self.vectors_dir if pool is None else self.vectors_dir / pool
        if not root.is_dir():
            return
        with self.db.read() as conn:
            if pool is None:
                rows = conn.execute("SELECT vectors_file FROM versions")
            else:
                rows = conn.execute("SELECT vectors_file FROM versions WHERE pool = ?", (pool,))
            keep = {r["vectors_file"] for r in rows}
        for path in sorted(root.rglob("*")):
            if path.is_file() and str(path.relative_to(self.data_dir)) not in keep:
                path.unlink(missing_ok=True)
                if fault_after_first is not None:
                    fault_point(fault_after_first)
                    fault_after_first = None
        dirs = [root] if pool is not None else sorted(self.vectors_dir.iterdir())
        for path in dirs:
            if path.is_dir() and not any(path.iterdir()):
                path.rmdir()

    # -------------------------------------------------------------------------------- pools

    def _pool_row(self, conn: sqlite3.Connection, pool: str) -> sqlite3.Row:
        row = conn.execute("SELECT * FROM pools WHERE name = ?", (pool,)).fetchone()
        if row is None:
            raise NotFound(f"pool '{pool}' does not exist", param="pool", code="pool_not_found")
        return row  # type: ignore[no-any-return]

    def settings_of(self, pool: str) -> PoolSettings:
        """The pool's settings, read once and kept until a write may have changed them.

        Every selection asks; reading and validating them took 0.3 ms on an idle server.
        """
        with self._settings_guard:
            cached = self._settings.get(pool)
            generation = self._settings_generation
        if cached is not None:
            return cached
        with self.db.read() as conn:
            row = self._pool_row(conn, pool)
        settings = PoolSettings.model_validate_json(row["settings"])
        with self._settings_guard:
            if generation == self._settings_generation:
                self._settings[pool] = settings
        return settings

    def _settings_written(self) -> None:
        """Called after every committed write that may create, change or delete settings."""
        with self._settings_guard:
            self._settings_generation += 1
            self._settings.clear()

    def _insert_pool(self, conn: sqlite3.Connection, pool: str, settings: PoolSettings) -> None:
        count = conn.execute("SELECT COUNT(*) FROM pools").fetchone()[0]
        if count >= self.max_pools:
            raise Conflict(
                f"the server holds its maximum of {self.max_pools} pools; delete one first",
                code="too_many_pools",
            )
        now = time.time()
        conn.execute(
            "INSERT INTO pools (name, settings, created_at, updated_at) VALUES (?, ?, ?, ?)",
            (pool, settings.model_dump_json(by_alias=True), now, now),
        )

    def put_pool(self, pool: str, update: PoolSettingsUpdate) -> dict[str, Any]:
        given = update.model_dump(exclude_unset=True)
        with self.db.write() as conn:
            row = conn.execute("SELECT settings FROM pools WHERE name = ?", (pool,)).fetchone()
            if row is None:
                settings = PoolSettings.model_validate(
                    {k: getattr(update, k) for k in given if getattr(update, k) is not None}
                )
                self._insert_pool(conn, pool, settings)
            else:
                current = PoolSettings.model_validate_json(row["settings"])
                # An explicit null resets a setting to its default, as for a new pool (a
                # null `task` or `template` would otherwise fail validation: a 500).
                defaults = PoolSettings()
                merged = current.model_copy(
                    update={
                        k: getattr(update, k)
                        if getattr(update, k) is not None
                        else getattr(defaults, k)
                        for k in given
                    }
                )
                merged = PoolSettings.model_validate(merged.model_dump(by_alias=True))
                conn.execute(
                    "UPDATE pools SET settings = ?, updated_at = ? WHERE name = ?",
                    (merged.model_dump_json(by_alias=True), time.time(), pool),
                )
        self._settings_written()
        return self.pool_info(pool)

    def pool_info(self, pool: str) -> dict[str, Any]:
        with self.db.read() as conn:
            row = self._pool_row(conn, pool)
            return self._info(conn, row)

    def list_pools(self) -> list[dict[str, Any]]:
        with self.db.read() as conn:
            rows = conn.execute("SELECT * FROM pools ORDER BY name").fetchall()
            return [self._info(conn, row) for row in rows]

    def _info(self, conn: sqlite3.Connection, row: sqlite3.Row) -> dict[str, Any]:
        pool = row["name"]
        version = int(row["active_version"])
        stats: dict[str, Any] = {"size": 0, "labeled": 0, "labels": {}, "label_count": 0}
        if version:
            vrow = conn.execute(
                "SELECT stats FROM versions WHERE pool = ? AND version = ?", (pool, version)
            ).fetchone()
            if vrow is not None:
                stats = json.loads(vrow["stats"])
        job = conn.execute(
            "SELECT id FROM jobs WHERE pool = ? AND status IN ('queued','running') "
            "ORDER BY created_at LIMIT 1",
            (pool,),
        ).fetchone()
        settings = PoolSettings.model_validate_json(row["settings"])
        status = "updating" if job is not None else ("ready" if version else "empty")
        return {
            "name": pool,
            "version": version,
            "size": stats["size"],
            "labeled": stats["labeled"],
            "labels": stats["labels"],
            "label_count": stats["label_count"],
            "embedder": (
                {"name": row["embedder_name"], "dim": row["dim"]} if row["embedder_name"] else None
            ),
            "index": INDEX_KIND,
            "created_at": iso(row["created_at"]),
            "updated_at": iso(row["updated_at"]),
            "status": status,
            "active_job": job["id"] if job is not None else None,
            **settings.model_dump(by_alias=True, mode="json"),
        }

    def delete_pool(self, pool: str) -> None:
        with self.pool_lock(pool):
            with self.db.write() as conn:
                self._pool_row(conn, pool)
                now = time.time()
                conn.execute(
                    "UPDATE jobs SET status='cancelled', finished_at=?, error='pool deleted' "
                    "WHERE pool = ? AND status IN ('queued','running')",
                    (now, pool),
                )
                for table in ("examples", "annotations", "versions", "subsets", "presets"):
                    conn.execute(f"DELETE FROM {table} WHERE pool = ?", (pool,))
                conn.execute("DELETE FROM pools WHERE name = ?", (pool,))
                fault_point("delete_before_commit")
            self._settings_written()
            fault_point("delete_after_commit")
            with self._snapshot_guard:
                self._snapshots.pop(pool, None)
                self._issued.pop(pool, None)
            # After the snapshot is gone: a reader that still saw it as published took the
            # generation before this, so what it read cannot be stored.
            self._rows.forget(pool)
            self._remove_unreferenced_files(pool)

    # ---------------------------------------------------------------------------- uploads

    def stage_upload(
        self,
        pool: str,
        records: Sequence[ExampleRecord],
        *,
        mode: Literal["append", "replace"],
        max_pool_rows: int,
        label_from_output: bool | None = None,
    ) -> dict[str, Any]:
        """Store validated rows as a pending version and queue the job that publishes it.

        Durable when it returns (one synchronous=FULL commit). Creates the pool if missing.
        Raises UnprocessableUpload when caller ids collide with the pool's rows (append).
        """
        job_id = new_job_id()
        now = time.time()
        with self.db.write() as conn:
            row = conn.execute("SELECT settings FROM pools WHERE name = ?", (pool,)).fetchone()
            if row is None:
                settings = PoolSettings()
                self._insert_pool(conn, pool, settings)
            else:
                settings = PoolSettings.model_validate_json(row["settings"])
            classification = settings.task == "classification"
            if label_from_output is not None:
                classification = label_from_output
            existing = 0
            if mode == "append":
                existing = conn.execute(
                    "SELECT COUNT(*) FROM examples WHERE pool = ? AND removed_version IS NULL",
                    (pool,),
                ).fetchone()[0]
                self._check_external_ids(conn, pool, records)
            else:
                existing = conn.execute(
                    "SELECT COUNT(*) FROM examples WHERE pool = ? AND job_id IS NOT NULL",
                    (pool,),
                ).fetchone()[0]
            if existing + len(records) > max_pool_rows:
                raise UnprocessableUpload(
                    f"pool '{pool}' would hold {existing + len(records)} examples, more than "
                    f"the limit of {max_pool_rows}; nothing was stored",
                    code="pool_too_large",
                    details={"rows": [], "bad_rows": 0},
                )
            conn.executemany(
                "INSERT INTO examples (pool, external_id, input, output, label, metadata, job_id)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    (
                        pool,
                        r.external_id,
                        r.input,
                        r.output,
                        r.label if r.label is not None or not classification else r.output,
                        json.dumps(r.metadata) if r.metadata is not None else None,
                        job_id,
                    )
                    for r in records
                ),
            )
            conn.execute(
                "INSERT INTO jobs (id, kind, pool, status, total, params, created_at) "
                "VALUES (?, 'upload', ?, 'queued', ?, ?, ?)",
                (job_id, pool, len(records), json.dumps({"mode": mode}), now),
            )
            fault_point("upload_staged")
        fault_point("upload_committed")
        return self.job(job_id)

    def _check_external_ids(
        self, conn: sqlite3.Connection, pool: str, records: Sequence[ExampleRecord]
    ) -> None:
        wanted = {r.external_id: r.line for r in records if r.external_id is not None}
        if not wanted:
            return
        taken: set[str] = set()
        names = list(wanted)
        for start in range(0, len(names), 500):
            chunk = names[start : start + 500]
            marks = ",".join("?" * len(chunk))
            taken.update(
                r[0]
                for r in conn.execute(
                    f"SELECT external_id FROM examples WHERE pool = ? AND "
                    f"removed_version IS NULL AND external_id IN ({marks})",
                    (pool, *chunk),
                )
            )
        if taken:
            bad = sorted((wanted[name], name) for name in taken)
            raise UnprocessableUpload(
                f"{len(bad)} rows reuse ids that already exist in pool '{pool}'; "
                "nothing was stored",
                code="duplicate_id",
                details={
                    "rows": [
                        {"line": line, "reason": f"id '{name}' already exists in the pool"}
                        for line, name in bad[:MAX_REPORTED_ROWS]
                    ],
                    "bad_rows": len(bad),
                },
            )

    def staged_rows(self, job_id: str) -> tuple[NDArray[np.int64], list[str]]:
        with self.db.read() as conn:
            rows = conn.execute(
                "SELECT id, input FROM examples WHERE job_id = ? ORDER BY id", (job_id,)
            ).fetchall()
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        return ids, [r[1] for r in rows]

    def publish_upload(
        self,
        job_id: str,
        new_ids: NDArray[np.int64],
        new_vectors: NDArray[np.float32],
        *,
        embedder_name: str,
    ) -> int:
        """Publish an embedded upload as the pool's next version; returns that version."""
        job = self.job(job_id)
        pool = job["pool"]
        mode = (job.get("params") or {}).get("mode", "append")
        dim = int(new_vectors.shape[1])
        with self.pool_lock(pool):
            with self.db.read() as conn:
                prow = self._pool_row(conn, pool)
                status = conn.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if status is None or status["status"] != "running":
                raise Conflict(f"job {job_id} was cancelled", code="job_cancelled")
            if prow["embedder_name"] and (
                prow["embedder_name"] != embedder_name or prow["dim"] != dim
            ):
                raise Conflict(
                    f"pool '{pool}' was embedded with {prow['embedder_name']} "
                    f"(dim {prow['dim']}) but the server now uses {embedder_name} (dim {dim}); "
                    "replace the pool or configure the original embedder"
                )
            base = self.snapshot(pool) if mode == "append" else None
            if base is not None and base.size:
                ids = np.concatenate([base.ids, new_ids])
                vectors = np.concatenate([np.asarray(base.vectors), new_vectors])
                order = np.argsort(ids, kind="stable")
                ids, vectors = ids[order], vectors[order]
            else:
                ids, vectors = new_ids, new_vectors
            # Held, the old snapshot would pin its version and keep it from being collected.
            base = None
            version = int(prow["active_version"]) + 1
            rel = f"vectors/{pool}/v{version}-{secrets.token_hex(4)}.npy"
            path = self.data_dir / rel
            committed = False
            try:
                digest = write_vectors(path, vectors)
                del vectors
                snapshot = self._commit_upload(
                    job_id, pool, mode, version, rel, digest, embedder_name, dim, ids.shape[0]
                )
                committed = True
            finally:
                if not committed:
                    # Not referenced by any version: the old version stays live, and the
                    # file would only hold space (a full disk is a likely cause).
                    path.unlink(missing_ok=True)
            fault_point("after_commit")
            self._swap(snapshot)
        self._collect_garbage(pool)
        return version

    def _commit_upload(
        self,
        job_id: str,
        pool: str,
        mode: str,
        version: int,
        rel: str,
        digest: str,
        embedder_name: str,
        dim: int,
        rows: int,
    ) -> PoolSnapshot:
        """The publish transaction of an upload whose vector file is written."""
        with self.db.write() as conn:
            # Re-check under the write lock: a DELETE may have landed while we wrote.
            still = conn.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if still is None or still["status"] != "running":
                raise Conflict(f"job {job_id} was cancelled", code="job_cancelled")
            if mode == "replace":
                conn.execute(
                    "UPDATE examples SET removed_version = ? WHERE pool = ? "
                    "AND added_version IS NOT NULL AND removed_version IS NULL",
                    (version, pool),
                )
            conn.execute(
                "UPDATE examples SET added_version = ?, job_id = NULL WHERE job_id = ?",
                (version, job_id),
            )
            snapshot = self._snapshot_from(
                conn, pool, version, rel, digest, embedder_name, dim, rows=rows
            )
            self._record_version(conn, snapshot, rel, digest, "upload")
            # content_version marks what subsets depend on: membership and vectors.
            conn.execute(
                "UPDATE pools SET active_version = ?, content_version = ?, embedder_name = ?, "
                "dim = ?, updated_at = ? WHERE name = ?",
                (version, version, embedder_name, dim, time.time(), pool),
            )
            conn.execute(
                "UPDATE jobs SET status='succeeded', done=total, finished_at=?, result=? "
                "WHERE id = ?",
                (time.time(), json.dumps({"version": version}), job_id),
            )
            fault_point("before_commit")
        return snapshot

    def _record_version(
        self, conn: sqlite3.Connection, snap: PoolSnapshot, rel: str, digest: str, kind: str
    ) -> None:
        # Stats are stored with the version so that GET /v1/pools needs no scan.
        conn.execute(
            "INSERT INTO versions (pool, version, vectors_file, sha256, size, kind, stats, "
            "created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                snap.pool,
                snap.version,
                rel,
                digest,
                snap.size,
                kind,
                json.dumps(snap.stats()),
                time.time(),
            ),
        )

    def _collect_garbage(self, pool: str) -> None:
        """Forget the versions of `pool` that no snapshot in use can see any more.

        A request or job holding the snapshot of version v reads v's rows by id after its
        search, so versions from the oldest one still held on are kept, with the rows they
        see, and so is the version before the active one (for readers that looked up the
        active version number just before the publish); older versions, the rows only they
        saw, and their vector files go. A failure here (a full disk) leaves garbage for the
        next publish or restart, not an error.
        """
        try:
            with self.pool_lock(pool):
                with self.db.read() as conn:
                    row = conn.execute(
                        "SELECT active_version FROM pools WHERE name = ?", (pool,)
                    ).fetchone()
                if row is None:
                    return
                previous = int(row["active_version"]) - 1
                oldest = min({previous, *self._pinned_versions(pool)})
                with self.db.write() as conn:
                    self._forget_before(conn, pool, oldest)
                self._rows.forget(pool, before=oldest)
                fault_point("garbage_committed")
                self._remove_unreferenced_files(pool, fault_after_first="garbage_file_removed")
        except (ICLServeError, OSError) as exc:
            log.warning("could not collect old versions of pool %s: %s", pool, exc)

    @staticmethod
    def _forget_before(conn: sqlite3.Connection, pool: str, oldest: int) -> None:
        """Delete the versions of `pool` before `oldest`, and the rows only they could see."""
        conn.execute("DELETE FROM versions WHERE pool = ? AND version < ?", (pool, oldest))
        # A row removed at version r is seen only by versions before r.
        removed = conn.execute(
            "DELETE FROM examples WHERE pool = ? AND removed_version IS NOT NULL "
            "AND removed_version <= ?",
            (pool, oldest),
        ).rowcount
        if removed:
            conn.execute(
                "DELETE FROM annotations WHERE pool = ? AND example_id NOT IN "
                "(SELECT id FROM examples WHERE pool = ?)",
                (pool, pool),
            )

    def _pinned_versions(self, pool: str) -> set[int]:
        """Versions of `pool` whose snapshots someone still holds (the active one included)."""
        with self._snapshot_guard:
            alive = [ref for ref in self._issued.get(pool, ()) if ref() is not None]
            self._issued[pool] = alive
            return {snap.version for ref in alive if (snap := ref()) is not None}

    # ------------------------------------------------------------------------- snapshots

    def _members(self, conn: sqlite3.Connection, pool: str, version: int) -> MemberLabels:
        rows = conn.execute(
            "SELECT id, output, label FROM (" + _VISIBLE + ") ORDER BY id",
            {"pool": pool, "v": version},
        ).fetchall()
        return MemberLabels(
            ids=np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows)),
            labeled=np.fromiter((r[1] is not None for r in rows), dtype=np.bool_, count=len(rows)),
            labels=[r[2] for r in rows],
        )

    def _snapshot_from(
        self,
        conn: sqlite3.Connection,
        pool: str,
        version: int,
        rel: str,
        digest: str,
        embedder_name: str,
        dim: int,
        *,
        rows: int,
    ) -> PoolSnapshot:
        vectors = read_vectors(self.data_dir / rel, expected_sha256=digest, rows=rows, dim=dim)
        return PoolSnapshot.build(
            pool=pool,
            version=version,
            embedder_name=embedder_name,
            dim=dim,
            members=self._members(conn, pool, version),
            vectors=vectors,
            index_settings=self.index_settings,
        )

    def _reuse_vectors(
        self, conn: sqlite3.Connection, prow: sqlite3.Row, *, of: int, as_version: int
    ) -> tuple[PoolSnapshot, sqlite3.Row]:
        """The snapshot of `as_version` over the vector file of version `of` (same members)."""
        vrow = conn.execute(
            "SELECT * FROM versions WHERE pool = ? AND version = ?", (prow["name"], of)
        ).fetchone()
        snapshot = self._snapshot_from(
            conn,
            prow["name"],
            as_version,
            vrow["vectors_file"],
            vrow["sha256"],
            prow["embedder_name"],
            int(prow["dim"]),
            rows=int(vrow["size"]),
        )
        return snapshot, vrow

    def _swap(self, snapshot: PoolSnapshot) -> None:
        with self._snapshot_guard:
            self._snapshots[snapshot.pool] = snapshot
            self._issued.setdefault(snapshot.pool, []).append(weakref.ref(snapshot))

    def snapshot(self, pool: str) -> PoolSnapshot | None:
        """The pool's active version, loaded on first use; None while nothing is published."""
        with self._snapshot_guard:
            cached = self._snapshots.get(pool)
        if cached is not None:
            return cached
        with self.pool_lock(pool):
            with self._snapshot_guard:
                cached = self._snapshots.get(pool)
            if cached is not None:
                return cached
            with self.db.read() as conn:
                prow = self._pool_row(conn, pool)
                version = int(prow["active_version"])
                if version == 0:
                    return None
                snapshot, _ = self._reuse_vectors(conn, prow, of=version, as_version=version)
            self._swap(snapshot)
            return snapshot

    def load_snapshots(self) -> int:
        """Load every pool's active version now; returns how many were loaded.

        Called at startup, so that the first request to a large pool does not pay for
        reading its vectors and building its index.
        """
        with self.db.read() as conn:
            names = [r[0] for r in conn.execute("SELECT name FROM pools WHERE active_version > 0")]
        return sum(self.snapshot(name) is not None for name in names)

    # --------------------------------------------------------------------------- reading

    def examples_by_id(
        self, pool: str, version: int, ids: Sequence[int], *, skip_missing: bool = False
    ) -> list[ExampleRow]:
        """Rows of `ids` as of `version`, in the order of `ids`.

        An id that is not in that version is a conflict (the pool changed under the request),
        or is left out with `skip_missing`.
        """
        wanted = [int(i) for i in ids]
        generation = self._rows.generation
        published = self._is_published(pool, version)
        if published:
            by_id = self._rows.lookup(pool, version, wanted)
            unread = [i for i in wanted if i not in by_id]
        else:
            by_id, unread = {}, wanted
        if unread:
            read: list[ExampleRow] = []
            with self.db.read() as conn:
                # Chunks keep the statement under SQLite's bound-parameter limit.
                for start in range(0, len(unread), 900):
                    chunk = unread[start : start + 900]
                    params: dict[str, Any] = {"pool": pool, "v": version}
                    params.update({f"i{n}": i for n, i in enumerate(chunk)})
                    marks = ",".join(f":i{n}" for n in range(len(chunk)))
                    match = f"e.id IN ({marks}) AND +e.pool = :pool"
                    read.extend(
                        _row_to_example(r)
                        for r in conn.execute(_VISIBLE_MATCHING.format(match=match), params)
                    )
            by_id.update((row.id, row) for row in read)
            if published:
                self._rows.store(pool, version, read, generation)
        if skip_missing:
            return [by_id[int(i)] for i in ids if int(i) in by_id]
        missing = [i for i in ids if int(i) not in by_id]
        if missing:
            raise Conflict(
                f"pool '{pool}' changed while the request ran; retry it", code="pool_changed"
            )
        return [by_id[int(i)] for i in ids]

    def _is_published(self, pool: str, version: int) -> bool:
        """Whether `version` of `pool` is published (at or below its loaded active version)."""
        with self._snapshot_guard:
            active = self._snapshots.get(pool)
        return active is not None and 0 < version <= active.version

    def page_examples(
        self, pool: str, *, offset: int, limit: int, labeled: bool | None
    ) -> dict[str, Any]:
        with self.db.read() as conn:
            prow = self._pool_row(conn, pool)
            version = int(prow["active_version"])
            where = ""
            if labeled is True:
                where = "WHERE output IS NOT NULL"
            elif labeled is False:
                where = "WHERE output IS NULL"
            params = {"pool": pool, "v": version, "limit": limit, "offset": offset}
            total = conn.execute(
                "SELECT COUNT(*) FROM (" + _VISIBLE + ") " + where, params
            ).fetchone()[0]
            rows = conn.execute(
                "SELECT * FROM ("
                + _VISIBLE
                + ") "
                + where
                + " ORDER BY id LIMIT :limit OFFSET :offset",
                params,
            ).fetchall()
        return {
            "pool": pool,
            "version": version,
            "total": int(total),
            "offset": offset,
            "limit": limit,
            "examples": [_row_to_example(r).as_dict() for r in rows],
        }

    # ------------------------------------------------------------------------ annotation

    def annotate(self, pool: str, items: Sequence[Annotation]) -> dict[str, Any]:
        """Set outputs and labels of existing examples; publishes a version, no re-embedding."""
        with self.pool_lock(pool):
            with self.db.read() as conn:
                prow = self._pool_row(conn, pool)
            version = int(prow["active_version"])
            if version == 0:
                raise Conflict(
                    f"pool '{pool}' has no published version yet; wait for its upload job",
                    code="pool_not_ready",
                )
            settings = PoolSettings.model_validate_json(prow["settings"])
            with self.db.write() as conn:
                current = self._resolve(conn, pool, version, items)
                new_version = version + 1
                for item, row in zip(items, current, strict=True):
                    output = item.output if item.set_output else row.output
                    if item.set_label:
                        label = item.label
                    elif item.set_output and settings.task == "classification":
                        label = output
                    else:
                        label = row.label
                    conn.execute(
                        "INSERT INTO annotations (pool, example_id, version, output, label) "
                        "VALUES (?, ?, ?, ?, ?)",
                        (pool, row.id, new_version, output, label),
                    )
                snapshot, vrow = self._reuse_vectors(conn, prow, of=version, as_version=new_version)
                self._record_version(
                    conn, snapshot, vrow["vectors_file"], vrow["sha256"], "annotate"
                )
                conn.execute(
                    "UPDATE pools SET active_version = ?, updated_at = ? WHERE name = ?",
                    (new_version, time.time(), pool),
                )
                fault_point("annotate_before_commit")
            fault_point("annotate_after_commit")
            self._swap(snapshot)
        self._collect_garbage(pool)
        return {"pool": pool, "version": new_version, "updated": len(items)}

    def _resolve(
        self, conn: sqlite3.Connection, pool: str, version: int, items: Sequence[Annotation]
    ) -> list[ExampleRow]:
        rows: list[ExampleRow] = []
        errors: list[dict[str, Any]] = []
        seen: dict[int, int] = {}
        for n, item in enumerate(items, start=1):
            match = (
                "e.id = :ref AND +e.pool = :pool"
                if isinstance(item.ref, int)
                else "e.pool = :pool AND e.external_id = :ref"
            )
            found = conn.execute(
                _VISIBLE_MATCHING.format(match=match),
                {"pool": pool, "v": version, "ref": item.ref},
            ).fetchone()
            if found is None:
                errors.append({"line": n, "reason": f"no example with id {item.ref!r} in the pool"})
                continue
            row = _row_to_example(found)
            if row.id in seen:
                errors.append(
                    {"line": n, "reason": f"example {item.ref!r} also set by item {seen[row.id]}"}
                )
                continue
            seen[row.id] = n
            rows.append(row)
        if errors:
            raise UnprocessableUpload(
                f"{len(errors)} annotation items are invalid; nothing was changed",
                details={"rows": errors[:MAX_REPORTED_ROWS], "bad_rows": len(errors)},
            )
        return rows

    # ------------------------------------------------------------------------------ jobs

    def job(self, job_id: str) -> dict[str, Any]:
        with self.db.read() as conn:
            row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise NotFound(f"job '{job_id}' does not exist", param="id", code="job_not_found")
        return _job_dict(row)

    def list_jobs(self, pool: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        with self.db.read() as conn:
            if pool is None:
                rows = conn.execute(
                    "SELECT * FROM jobs ORDER BY created_at DESC LIMIT ?", (limit,)
                ).fetchall()
            else:
                rows = conn.execute(
                    "SELECT * FROM jobs WHERE pool = ? ORDER BY created_at DESC LIMIT ?",
                    (pool, limit),
                ).fetchall()
        return [_job_dict(r) for r in rows]

    def job_counts(self) -> dict[tuple[str, str], int]:
        with self.db.read() as conn:
            rows = conn.execute("SELECT kind, status, COUNT(*) FROM jobs GROUP BY kind, status")
            return {(r[0], r[1]): int(r[2]) for r in rows}

    def pool_sizes(self) -> dict[str, int]:
        with self._snapshot_guard:
            return {name: snap.size for name, snap in self._snapshots.items()}

    def start_job(self, job_id: str) -> bool:
        with self.db.write() as conn:
            cur = conn.execute(
                "UPDATE jobs SET status='running', started_at=? WHERE id=? AND status='queued'",
                (time.time(), job_id),
            )
            return cur.rowcount == 1

    def progress(
        self,
        job_id: str,
        done: int,
        *,
        total: int | None = None,
        result: dict[str, Any] | None = None,
    ) -> bool:
        """Record progress (and a partial `result`, when given); False when cancelled."""
        with self.db.write() as conn:
            cur = conn.execute(
                "UPDATE jobs SET done = ?, total = COALESCE(?, total), "
                "result = COALESCE(?, result) WHERE id = ? AND status = 'running'",
                (done, total, json.dumps(result) if result is not None else None, job_id),
            )
            return cur.rowcount == 1

    def fail_job(self, job_id: str, error: str) -> None:
        with self.db.write() as conn:
            conn.execute(
                "UPDATE jobs SET status='failed', error=?, finished_at=? "
                "WHERE id=? AND status IN ('queued','running')",
                (error, time.time(), job_id),
            )
            conn.execute("DELETE FROM examples WHERE job_id = ?", (job_id,))

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        with self.db.write() as conn:
            row = conn.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise NotFound(f"job '{job_id}' does not exist", param="id", code="job_not_found")
            if row["status"] in JOB_ACTIVE:
                conn.execute(
                    "UPDATE jobs SET status='cancelled', finished_at=?, error='cancelled' "
                    "WHERE id=?",
                    (time.time(), job_id),
                )
                conn.execute("DELETE FROM examples WHERE job_id = ?", (job_id,))
        return self.job(job_id)


def _job_dict(row: sqlite3.Row) -> dict[str, Any]:
    total = int(row["total"])
    done = int(row["done"])
    status = row["status"]
    if status == "succeeded":
        progress = 1.0
    else:
        progress = round(done / total, 4) if total else 0.0
    return {
        "id": row["id"],
        "kind": row["kind"],
        "pool": row["pool"],
        "status": status,
        "done": done,
        "total": total,
        "progress": progress,
        "error": row["error"],
        "result": json.loads(row["result"]) if row["result"] else None,
        "params": json.loads(row["params"]) if row["params"] else None,
        "created_at": iso(row["created_at"]),
        "started_at": iso(row["started_at"]),
        "finished_at": iso(row["finished_at"]),
    }


def parse_annotations(body: Any, *, max_items: int, max_chars: int) -> list[Annotation]:
    """Validate a PATCH body `{"examples": [{"id", "output"?, "label"?}]}`."""
    if (
        not isinstance(body, dict)
        or set(body) != {"examples"}
        or not isinstance(body["examples"], list)
    ):
        raise InvalidRequest(
            'body must be {"examples": [{"id": ..., "output": ..., "label": ...}]}'
        )
    items = body["examples"]
    if not items:
        raise InvalidRequest("examples must not be empty", param="examples")
    if len(items) > max_items:
        raise InvalidRequest(f"at most {max_items} examples per request", param="examples")
    out: list[Annotation] = []
    errors: list[dict[str, Any]] = []
    for n, item in enumerate(items, start=1):
        reason = _annotation_problem(item, max_chars)
        if reason:
            errors.append({"line": n, "reason": reason})
            continue
        out.append(
            Annotation(
                ref=item["id"],
                output=item.get("output"),
                label=item.get("label"),
                set_output="output" in item,
                set_label="label" in item,
            )
        )
    if errors:
        raise UnprocessableUpload(
            f"{len(errors)} annotation items are invalid; nothing was changed",
            details={"rows": errors[:MAX_REPORTED_ROWS], "bad_rows": len(errors)},
        )
    return out


def _annotation_problem(item: Any, max_chars: int) -> str | None:
    if not isinstance(item, dict):
        return "item must be an object"
    unknown = set(item) - {"id", "output", "label"}
    if unknown:
        return f"unknown field '{sorted(unknown)[0]}'"
    ref = item.get("id")
    if isinstance(ref, bool) or not isinstance(ref, int | str):
        return "'id' must be the example's integer id or its string id"
    if "output" not in item and "label" not in item:
        return "give 'output' and/or 'label'"
    for name in ("output", "label"):
        value = item.get(name)
        if value is not None and not isinstance(value, str):
            return f"'{name}' must be a string or null, got {type(value).__name__}"
        if isinstance(value, str) and len(value) > max_chars:
            return f"'{name}' has {len(value)} characters, more than the limit of {max_chars}"
    return None
