"""Readers during republishing (RELIABILITY.md D3, recipe B) on a real `iclserve serve`.

Eight reader threads run `/v1/pools/{pool}/select` (and, every few requests, a GET of the pool)
while an admin republishes that pool 20 times with the packaged MiniLM: replace uploads,
appends and annotations. Every row says which version brought it (text and metadata carry
`v{N}`), and an annotation writes `lab-v{N}` into the rows it changes, so the test knows the
exact content of every version before it is published. Each response must be a 200 whose
`X-Pool-Version` header matches the body's version, whose demonstrations are all rows of that
version with that version's labels, and whose pool description (size, label histogram)
is that version's. Each reader also checks that the versions it sees never go backwards.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.errors import Conflict
from app.store import PoolStore
from tests.e2e.server import Server
from tests.fakes.upstream import FakeUpstream
from tests.reliability.figures import Figures, scale
from tests.reliability.storage import (
    SEED,
    client_for,
    make_rows,
    publish,
    row_key,
    store_publish,
)

pytestmark = pytest.mark.reliability

POOL = "republished"
READERS = 8
K = 8
DESCRIBE_EVERY = 4  # one request in four is a GET of the pool
QUERIES = (
    "river stone lantern",
    "copper signal harbor",
    "violet engine quartz",
    "garden ledger summit",
    "marble beacon canyon",
    "glacier cobalt prism",
)
PLAN = ("replace", "append", "annotate", "append", "replace", "annotate")


@dataclass
class Version:
    rows: dict[str, dict[str, Any]]  # external id -> row

    @property
    def keys(self) -> set[str]:
        return {row_key(r) for r in self.rows.values()}

    @property
    def labels(self) -> dict[str, int]:
        return dict(Counter(r["label"] for r in self.rows.values()))


@dataclass
class ReaderLog:
    selects: int = 0
    describes: int = 0
    errors: list[str] = field(default_factory=list)
    inconsistent: list[str] = field(default_factory=list)
    versions: set[int] = field(default_factory=set)


def _reader(
    url: str,
    versions: dict[int, Version],
    done: threading.Event,
    log: ReaderLog,
    seed: int,
) -> None:
    rng = random.Random(seed)
    last_select = last_describe = 0
    with httpx.Client(base_url=url, timeout=30) as client:
        for n in range(1_000_000):
            if done.is_set():
                return
            try:
                if n % DESCRIBE_EVERY == DESCRIBE_EVERY - 1:
                    response = client.get(f"/v1/pools/{POOL}")
                    log.describes += 1
                else:
                    query = rng.choice(QUERIES)
                    response = client.post(
                        f"/v1/pools/{POOL}/select", json={"query": query, "k": K}
                    )
                    log.selects += 1
            except httpx.HTTPError as exc:
                log.errors.append(f"{type(exc).__name__}: {exc}")
                continue
            if response.status_code != 200:
                log.errors.append(f"HTTP {response.status_code}: {response.text[:200]}")
                continue
            body = response.json()
            version = int(body["version"])
            log.versions.add(version)
            expected = versions.get(version)
            if expected is None:
                log.inconsistent.append(f"unknown version {version}")
                continue
            if "demonstrations" in body:
                problem = _select_problem(response, body, expected, last_select)
                last_select = version
            else:
                problem = _describe_problem(body, expected, last_describe)
                last_describe = version
            if problem:
                log.inconsistent.append(f"v{version}: {problem}")


def _select_problem(
    response: httpx.Response, body: dict[str, Any], expected: Version, last: int
) -> str | None:
    version = int(body["version"])
    header = response.headers.get("x-pool-version")
    if header is None or int(header) != version:
        return f"X-Pool-Version {header} but body version {version}"
    if version < last:
        return f"select went back from v{last}"
    keys = expected.keys
    foreign = [d["external_id"] for d in body["demonstrations"] if row_key(d) not in keys]
    if foreign:
        return f"rows not in this version (or with another version's labels): {foreign[:3]}"
    if len({d["id"] for d in body["demonstrations"]}) != min(K, len(expected.rows)):
        return f"{len(body['demonstrations'])} demonstrations"
    return None


def _describe_problem(body: dict[str, Any], expected: Version, last: int) -> str | None:
    if int(body["version"]) < last:
        return f"description went back from v{last}"
    if body["size"] != len(expected.rows):
        return f"size {body['size']}, the version has {len(expected.rows)} rows"
    if body["labels"] != expected.labels:
        return f"labels {body['labels']}, the version has {expected.labels}"
    return None


def _next_version(
    number: int, kind: str, current: Version, rng: random.Random
) -> tuple[Version, list[dict[str, Any]] | dict[str, Any]]:
    """Version `number` made from `current` by `kind`, and the upload rows or PATCH body."""
    if kind == "annotate":
        chosen = rng.sample(sorted(current.rows), 5)
        label = f"lab-v{number}"
        rows = dict(current.rows)
        for ident in chosen:
            rows[ident] = {**rows[ident], "output": label, "label": label}
        body = {"examples": [{"id": i, "output": label, "label": label} for i in chosen]}
        return Version(rows), body
    added = make_rows(f"v{number}", 12 + number % 7)
    base = {} if kind == "replace" else dict(current.rows)
    base.update({r["id"]: r for r in added})
    return Version(base), added


def test_readers_see_one_whole_version_while_republishing(
    tmp_path: Path, fake_upstream: FakeUpstream, figures: Figures
) -> None:
    republishes = scale("republishes", 20, 100)
    rng = random.Random(SEED)
    server = Server(tmp_path / "data", fake_upstream)
    versions: dict[int, Version] = {}
    logs = [ReaderLog() for _ in range(READERS)]
    done = threading.Event()
    readers: list[threading.Thread] = []
    published = 0
    started = time.monotonic()
    try:
        server.start()
        admin = client_for(server, timeout=60)
        first = make_rows("v1", 24)
        versions[1] = Version({r["id"]: r for r in first})
        publish(admin, POOL, first, "replace")
        readers = [
            threading.Thread(
                target=_reader, args=(server.url, versions, done, log, SEED + n), daemon=True
            )
            for n, log in enumerate(logs)
        ]
        for reader in readers:
            reader.start()
        current = versions[1]
        for number in range(2, republishes + 2):
            kind = PLAN[(number - 2) % len(PLAN)]
            # Known before it can be served: readers look versions up here.
            current, payload = _next_version(number, kind, current, rng)
            versions[number] = current
            if kind == "annotate":
                response = admin.patch(f"/v1/pools/{POOL}/examples", json=payload)
                assert response.status_code == 200, response.text
                assert response.json()["version"] == number
            else:
                assert isinstance(payload, list)
                job = publish(admin, POOL, payload, kind)
                assert job["result"]["version"] == number, job
            published += 1
            time.sleep(0.1)  # let readers see each version, however fast the publish
        admin.close()
    finally:
        done.set()
        for reader in readers:
            reader.join(timeout=60)
        server.kill()
    seconds = time.monotonic() - started
    selects = sum(log.selects for log in logs)
    describes = sum(log.describes for log in logs)
    errors = [e for log in logs for e in log.errors]
    inconsistent = [e for log in logs for e in log.inconsistent]
    seen = set().union(*(log.versions for log in logs))
    passed = not errors and not inconsistent and published == republishes
    figures.record(
        "D3",
        f"{READERS} readers (select k={K}, pool GET) while the pool is republished "
        f"{republishes}x (replace, append, annotate; MiniLM)",
        f"{selects + describes:,} responses ({selects:,} selects, {describes:,} GETs) over "
        f"{len(seen)} versions in {seconds:.0f} s: {len(errors)} errors, "
        f"{len(inconsistent)} inconsistent",
        "0 errors; 100% consistent with X-Pool-Version",
        passed,
        test="test_readers_see_one_whole_version_while_republishing",
    )
    assert not errors, errors[:10]
    assert not inconsistent, inconsistent[:10]
    assert published == republishes
    # Readers must have overlapped most publishes, or the test proved little.
    assert len(seen) >= republishes // 2, sorted(seen)
    assert all(not reader.is_alive() for reader in readers), "a reader hung"


def test_a_held_snapshot_keeps_its_rows_through_later_publishes(tmp_path: Path) -> None:
    """The guarantee behind D3, made deterministic: a request holding version v's snapshot
    can read v's rows however many versions are published meanwhile; once it lets go, the
    next publish collects them (and the vector file) like any old version's."""
    store = PoolStore(tmp_path)
    try:
        assert store_publish(store, "p", 10, tag="-v1") == 1
        held = store.snapshot("p")
        assert held is not None
        held_ids = [int(i) for i in held.ids]
        for version in (2, 3, 4):  # each replaces every row
            assert store_publish(store, "p", 10, tag=f"-v{version}") == version
        rows = store.examples_by_id("p", held.version, held_ids)
        assert [r.input for r in rows] == [f"p-v1 row {i}" for i in range(10)]
        # v1 is held, so it and every version after it stay.
        assert len(list((tmp_path / "vectors" / "p").iterdir())) == 4
        del held, rows
        assert store_publish(store, "p", 10, tag="-v5") == 5
        with pytest.raises(Conflict):
            store.examples_by_id("p", 1, held_ids)
        assert len(list((tmp_path / "vectors" / "p").iterdir())) == 2  # v4 (grace) and v5
    finally:
        store.close()
