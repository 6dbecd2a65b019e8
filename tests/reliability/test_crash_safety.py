"""Crash safety of the store (RELIABILITY.md D1, D2; recipe A), on a real `iclserve serve`.

D2, crash points: every point of app/faults.py is armed in turn, through ICLSERVE_FAULT_FILE,
in a server running the packaged MiniLM; the operation that reaches it (an append or replace
upload, an annotation, a pool deletion, or startup recovery) kills the process there. After
the restart the pool must hold exactly its old or its new version, as the point decides:
same rows (count and checksum), the version number, a select returning exactly that
version's rows (so the index holds as many rows as the pool), the acknowledged job resumed
and finished, every other pool untouched, and nothing left over in the data directory.

D1, kill -9 at random moments: writers upload deterministic batches to a few pools while a
killer SIGKILLs the server after a seeded random delay; the history records each operation
as ok (202), fail (422) or info (no answer: outcome unknown). After each restart a checker
asserts that every ok upload is present whole and published, no failed upload is visible,
info uploads are all or nothing, pool descriptions, listings and selects agree, and no
temporary or orphan file remains. This test runs the hash embedder
(ICLSERVE_EMBEDDING__KIND=hash) so that restarts are fast: it tests storage, not embeddings.
"""

from __future__ import annotations

import random
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.faults import ALL_POINTS, ANNOTATE_POINTS, DELETE_POINTS, UPLOAD_POINTS
from tests.e2e.server import Server
from tests.fakes.upstream import FakeUpstream
from tests.reliability.figures import Figures, scale
from tests.reliability.storage import (
    SEED,
    PoolState,
    active_jobs,
    check_select_matches,
    client_for,
    fingerprint,
    leftovers,
    make_rows,
    publish,
    read_pool,
    row_key,
    upload,
    wait_quiet,
)

pytestmark = pytest.mark.reliability

CRASH_WAIT_S = 90.0  # the armed operation must reach its point well within this
RESTART_TO_READY_S = 10.0  # RELIABILITY.md D1, plus model load (none with the hash embedder)


def _wait_exit(server: Server, timeout: float = CRASH_WAIT_S) -> int | None:
    assert server.proc is not None
    try:
        return server.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


@pytest.fixture
def crash_server(tmp_path: Path, fake_upstream: FakeUpstream) -> Iterator[tuple[Server, Path]]:
    armed = tmp_path / "fault-point"
    armed.write_text("")
    server = Server(tmp_path / "data", fake_upstream, env={"ICLSERVE_FAULT_FILE": str(armed)})
    try:
        yield server, armed
    finally:
        server.kill()


# ------------------------------------------------------------------------------- D2


@dataclass(frozen=True)
class Scenario:
    point: str
    operation: str  # append | replace | annotate | delete | recovery

    @property
    def new_survives(self) -> bool:
        """Whether the operation must be visible after a crash at this point."""
        if self.operation in ("append", "replace"):
            return self.point != "upload_staged"  # later points come after a durable 202
        if self.operation == "recovery":
            return True  # the upload crashed after its commit
        return self.point.endswith("after_commit")


def _scenarios() -> list[Scenario]:
    # Each upload point once, the modes alternating (a restart costs seconds; the API tests
    # crash both modes at every publish point in-process), and both at the commit, whose
    # transaction differs between them.
    found = [Scenario(p, "replace" if n % 2 else "append") for n, p in enumerate(UPLOAD_POINTS)]
    at_commit = next(s for s in found if s.point == "before_commit")
    other = "append" if at_commit.operation == "replace" else "replace"
    found.append(Scenario("before_commit", other))
    found += [Scenario(p, "annotate") for p in ANNOTATE_POINTS]
    found += [Scenario(p, "delete") for p in DELETE_POINTS]
    # Recovery crashes while repairing a crash after a commit, which left old versions
    # whose files recovery removes.
    found.append(Scenario("recovery_committed", "recovery"))
    return found


def _relabel(rows: list[dict[str, Any]], how_many: int) -> tuple[list[dict[str, Any]], Any]:
    """Rows after an annotation of the first `how_many`, and the PATCH body doing it."""
    changed = []
    body = []
    for n, row in enumerate(rows):
        if n < how_many:
            row = {**row, "output": "relabeled", "label": "relabeled"}
            body.append({"id": row["id"], "output": "relabeled", "label": "relabeled"})
        changed.append(row)
    return changed, {"examples": body}


def test_crash_at_every_publish_step(crash_server: tuple[Server, Path], figures: Figures) -> None:
    server, armed = crash_server
    scenarios = _scenarios()
    covered = {s.point for s in scenarios}
    assert covered == set(ALL_POINTS), f"points without a scenario: {set(ALL_POINTS) - covered}"
    data_dir = Path(server.env["ICLSERVE_DATA_DIR"])
    expected: dict[str, tuple[int | None, str]] = {}  # pool -> (version, fingerprint)
    problems: list[str] = []
    started = time.monotonic()
    server.start()
    client = client_for(server, timeout=60)
    try:
        for n, scenario in enumerate(scenarios):
            pool = f"crash{n:02d}"
            base_a = make_rows(f"{pool}-a", 12)
            base_b = make_rows(f"{pool}-b", 8)
            # Two versions in this process: publishing a third collects the first.
            publish(client, pool, base_a, "replace")
            publish(client, pool, base_b, "append")
            old_rows, old_version = base_a + base_b, 2
            new_rows: list[dict[str, Any]] | None
            armed.write_text("after_commit" if scenario.operation == "recovery" else scenario.point)
            try:
                if scenario.operation in ("append", "replace", "recovery"):
                    added = make_rows(f"{pool}-c", 10)
                    mode = "replace" if scenario.operation == "replace" else "append"
                    new_rows = added if mode == "replace" else old_rows + added
                    upload(client, pool, added, mode)
                elif scenario.operation == "annotate":
                    new_rows, body = _relabel(old_rows, 5)
                    client.patch(f"/v1/pools/{pool}/examples", json=body)
                else:
                    new_rows = None
                    client.delete(f"/v1/pools/{pool}")
            except httpx.HTTPError:
                pass  # the server died under the request: its outcome is what we check
            code = _wait_exit(server)
            assert code == 137, f"{scenario}: server exit {code}, the point was not reached"
            if scenario.operation == "recovery":
                armed.write_text("recovery_committed")
                with pytest.raises(AssertionError):
                    server.start()  # dies while starting, in recovery
                assert server.proc is not None and server.proc.returncode == 137
            armed.write_text("")
            resumed = bool(active_jobs(data_dir))
            server.start()
            wait_quiet(client)
            problems += [f"{scenario}: {p}" for p in leftovers(data_dir, strict=not resumed)]
            if scenario.new_survives:
                want_rows, want_version = new_rows, (None if new_rows is None else 3)
            else:
                want_rows, want_version = old_rows, old_version
            state = read_pool(client, pool)
            problems += _compare(scenario, pool, state, want_rows, want_version)
            if state.version:
                problems += [f"{scenario}: {p}" for p in check_select_matches(client, pool, state)]
            if scenario.operation in ("append", "replace") and scenario.new_survives:
                jobs = client.get("/v1/jobs", params={"pool": pool}).json()["data"]
                statuses = sorted(j["status"] for j in jobs)
                if statuses != ["succeeded"] * 3:
                    problems.append(f"{scenario}: upload jobs of {pool} ended {statuses}")
            expected[pool] = (
                want_version,
                fingerprint(want_rows) if want_rows is not None else "",
            )
            problems += _changed_pools(client, expected, f"after {scenario}", but=pool)
            if problems:
                break
        else:
            # After a clean restart every pool keeps its active version only, unchanged.
            server.stop()
            server.start()
            problems += [f"final restart: {p}" for p in leftovers(data_dir, strict=True)]
            problems += _changed_pools(client, expected, "after the final restart")
    finally:
        client.close()
    seconds = time.monotonic() - started
    figures.record(
        "D2",
        "crash points of app/faults.py crashed at (uploads append+replace, annotation, "
        "pool delete, GC, recovery), each followed by a restart",
        f"{len(covered)}/{len(ALL_POINTS)} points, {len(scenarios)} crashes, "
        f"{len(problems)} mixed versions or leftovers ({seconds:.0f} s)",
        "every point; old or new version, never mixed; 0 leftovers after recovery",
        not problems and covered == set(ALL_POINTS),
        test="test_crash_at_every_publish_step",
    )
    assert not problems, "\n".join(problems)


def _changed_pools(
    client: httpx.Client,
    expected: dict[str, tuple[int | None, str]],
    when: str,
    but: str | None = None,
) -> list[str]:
    """Pools whose version or content is no longer what `expected` says."""
    problems = []
    for pool, (version, digest) in expected.items():
        if pool == but:
            continue
        seen = read_pool(client, pool)
        got = fingerprint(seen.rows) if seen.version is not None else ""
        if (seen.version, got) != (version, digest):
            problems.append(f"{when}: pool {pool} changed (v{seen.version}, expected v{version})")
    return problems


def _compare(
    scenario: Scenario,
    pool: str,
    state: PoolState,
    want_rows: list[dict[str, Any]] | None,
    want_version: int | None,
) -> list[str]:
    if want_rows is None:
        return [] if state.version is None else [f"{scenario}: deleted pool {pool} is back"]
    problems = []
    if state.version != want_version:
        problems.append(f"{scenario}: {pool} is at v{state.version}, expected v{want_version}")
    if fingerprint(state.rows) != fingerprint(want_rows):
        have = {row_key(r) for r in state.rows}
        want = {row_key(r) for r in want_rows}
        problems.append(
            f"{scenario}: {pool} holds {len(state.rows)} rows, expected {len(want_rows)} "
            f"({len(have - want)} unexpected, {len(want - have)} missing)"
        )
    return problems


# ------------------------------------------------------------------------------- D1


@dataclass
class Op:
    """One upload in the history. outcome: ok (202), fail (422), info (no answer)."""

    tag: str  # the pool and the writer's operation count; prefixes the rows' ids
    pool: str
    mode: str
    rows: list[dict[str, Any]]
    bad: bool  # holds a row without input: the server must refuse it whole
    outcome: str = "invoked"
    job: str | None = None
    applied: bool | None = None  # for info ops, once a check has seen the outcome
    verified: bool = False  # for ok ops, once a check has seen the job succeeded
    interrupted: bool = False  # for ok ops, the kill came before the job finished


@dataclass
class History:
    ops: list[Op] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    unexpected: list[str] = field(default_factory=list)

    def add(self, op: Op) -> None:
        with self.lock:
            self.ops.append(op)

    def of_pool(self, pool: str) -> list[Op]:
        with self.lock:
            return [op for op in self.ops if op.pool == pool]


POOLS = ("kill0", "kill1", "kill2")
MAX_POOL_ROWS = 1500  # past this a writer replaces, so appends stay cheap
MAX_OPS_PER_CYCLE = 500  # a bound only: the kill comes within seconds


class Writer(threading.Thread):
    """Uploads to one pool, one operation at a time, until told to stop or the server dies."""

    def __init__(self, pool: str, url: str, history: History, rng: random.Random) -> None:
        super().__init__(daemon=True)
        self.pool = pool
        self.url = url
        self.history = history
        self.rng = rng
        self.stop = threading.Event()

    def _next(self) -> Op:
        ops = self.history.of_pool(self.pool)
        tag = f"{self.pool}x{len(ops):05d}"
        roll = self.rng.random()
        bad = roll < 0.15
        size = _expected_size(ops)
        replace = not ops or size > MAX_POOL_ROWS or roll > 0.8
        rows = make_rows(tag, self.rng.randint(20, 300), text_words=4)
        if bad:
            rows.insert(self.rng.randrange(len(rows)), {"id": f"{tag}-bad", "output": "x"})
        return Op(tag, self.pool, "replace" if replace else "append", rows, bad)

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=20) as client:
            for _ in range(MAX_OPS_PER_CYCLE):
                if self.stop.is_set():
                    return
                op = self._next()
                self.history.add(op)
                try:
                    response = upload(client, self.pool, op.rows, op.mode)
                except httpx.HTTPError:
                    op.outcome = "info"
                    return
                if response.status_code == 202:
                    op.outcome, op.job = "ok", response.json()["job"]["id"]
                elif response.status_code == 422 and op.bad:
                    op.outcome = "fail"
                    continue
                else:
                    op.outcome = "info"
                    self.history.unexpected.append(
                        f"{op.tag}: HTTP {response.status_code} {response.text[:200]}"
                    )
                    return
                if not self._await(client, op):
                    op.interrupted = True
                    return

    def _await(self, client: httpx.Client, op: Op) -> bool:
        """Poll the op's job until it ends; False once the server is gone."""
        for _ in range(2000):
            try:
                status = client.get(f"/v1/jobs/{op.job}").json()["status"]
            except (httpx.HTTPError, ValueError):
                return False
            if status == "succeeded":
                return True
            if status not in ("queued", "running"):
                self.history.unexpected.append(f"{op.tag}: acknowledged job ended {status}")
                return True
            if self.stop.is_set():
                return False
            time.sleep(0.01)
        return False


def _expected_size(ops: list[Op]) -> int:
    size = 0
    for op in ops:
        if op.outcome == "ok" or op.applied:
            size = len(op.rows) if op.mode == "replace" else size + len(op.rows)
    return size


@dataclass
class Tally:
    lost_ok: int = 0
    visible_fail: int = 0
    partial: int = 0
    extra: int = 0
    select_mismatch: int = 0
    leftovers: int = 0
    info_applied: int = 0
    info_absent: int = 0
    problems: list[str] = field(default_factory=list)


def _check_pools(
    client: httpx.Client, data_dir: Path, history: History, tally: Tally, *, strict: bool
) -> None:
    """The checker: compare each pool to its history, then resolve the info operations."""
    wait_quiet(client)
    problems = [f"leftover: {p}" for p in leftovers(data_dir, strict=strict)]
    tally.leftovers += len(problems)
    for pool in POOLS:
        ops = history.of_pool(pool)
        by_tag = {op.tag: op for op in ops}
        state = read_pool(client, pool)
        present: dict[str, list[dict[str, Any]]] = {}
        for row in state.rows:
            present.setdefault(str(row["external_id"]).split("-")[0], []).append(row)
        for tag, rows in present.items():
            op = by_tag.get(tag)
            if op is None:
                problems.append(f"{pool}: rows of unknown operation {tag}")
                continue
            if op.outcome == "fail":
                tally.visible_fail += 1
                problems.append(f"{pool}: refused upload {tag} is visible")
            elif fingerprint(rows) != fingerprint(op.rows):
                tally.partial += 1
                problems.append(f"{pool}: {tag} is partly visible ({len(rows)}/{len(op.rows)})")
        # Replay: ok ops apply, info ops apply exactly when their rows are there (an info op
        # wiped by a later replace is indistinguishable from one never applied, and the final
        # state is the same either way).
        expected: list[str] = []
        for op in ops:
            if op.bad and op.tag in present:
                tally.visible_fail += 1
                problems.append(f"{pool}: upload {op.tag} with a bad row is visible")
            applied = op.outcome == "ok" or (
                op.outcome == "info" and not op.bad and (op.applied or op.tag in present)
            )
            if op.outcome == "info" and op.applied is None:
                op.applied = op.tag in present
                if op.applied:
                    tally.info_applied += 1
                else:
                    tally.info_absent += 1
            if applied:
                expected = [op.tag] if op.mode == "replace" else [*expected, op.tag]
        missing = [t for t in expected if t not in present]
        extra = [t for t in present if t not in expected]
        for tag in missing:
            if by_tag[tag].outcome == "ok":
                tally.lost_ok += 1
                problems.append(f"{pool}: acknowledged upload {tag} is lost")
        if extra:
            tally.extra += len(extra)
            problems.append(f"{pool}: operations visible out of order: {extra[:5]}")
        if state.version:
            select_problems = check_select_matches(client, pool, state)
            tally.select_mismatch += len(select_problems)
            problems += select_problems
        for op in ops:
            if op.outcome == "ok" and op.job is not None and not op.verified:
                job = client.get(f"/v1/jobs/{op.job}").json()
                op.verified = job["status"] == "succeeded"
                if not op.verified:
                    problems.append(f"{pool}: acknowledged job {op.job} ended {job['status']}")
    tally.problems += problems


@pytest.mark.timeout(120 + 30 * scale("kill_cycles", 20, 200))
def test_kill_during_uploads(tmp_path: Path, fake_upstream: FakeUpstream, figures: Figures) -> None:
    cycles = scale("kill_cycles", 20, 200)
    max_delay_s = 1.5
    rng = random.Random(SEED)
    server = Server(tmp_path / "data", fake_upstream, env={"ICLSERVE_EMBEDDING__KIND": "hash"})
    data_dir = tmp_path / "data"
    history = History()
    tally = Tally()
    restarts: list[float] = []
    deadline = time.monotonic() + 60 + cycles * 30
    client: httpx.Client | None = None
    try:
        server.start()
        client = client_for(server)
        for cycle in range(cycles):
            assert time.monotonic() < deadline, f"only {cycle} of {cycles} cycles in time"
            writers = [
                Writer(pool, server.url, history, random.Random(f"{SEED}:{cycle}:{pool}"))
                for pool in POOLS
            ]
            for writer in writers:
                writer.start()
            time.sleep(rng.uniform(0.05, max_delay_s))
            server.kill()
            for writer in writers:
                writer.stop.set()
            for writer in writers:
                writer.join(timeout=30)
                assert not writer.is_alive(), "a writer hung after the kill"
            for op in history.ops:
                if op.outcome == "invoked":
                    op.outcome = "info"
            server.start()
            assert server.ready_s is not None
            restarts.append(server.ready_s)
            _check_pools(client, data_dir, history, tally, strict=False)
            assert not tally.problems, "\n".join(tally.problems)
        server.stop()
        server.start()
        _check_pools(client, data_dir, history, tally, strict=True)
    finally:
        if client is not None:
            client.close()
        server.kill()
    outcomes = {k: sum(op.outcome == k for op in history.ops) for k in ("ok", "fail", "info")}
    interrupted = sum(op.interrupted for op in history.ops)
    restarts.sort()
    slowest = restarts[-1] if restarts else float("nan")
    passed = not tally.problems and not history.unexpected and slowest <= RESTART_TO_READY_S
    figures.record(
        "D1",
        "kill -9 cycles at random moments during uploads (3 writers, hash embedder)",
        f"{cycles} cycles, {len(history.ops)} uploads (ok {outcomes['ok']}, {interrupted} of "
        f"them killed before the writer saw the job finish; fail {outcomes['fail']}; info "
        f"{outcomes['info']}: {tally.info_applied} applied, {tally.info_absent} absent)",
        ">= 20 in CI, >= 200 nightly",
        passed,
        test="test_kill_during_uploads",
    )
    figures.record(
        "D1",
        "acknowledged uploads lost / refused uploads visible / partly visible",
        f"{tally.lost_ok} / {tally.visible_fail} / {tally.partial}",
        "0 / 0 / 0",
        tally.lost_ok == tally.visible_fail == tally.partial == 0,
        test="test_kill_during_uploads",
    )
    figures.record(
        "D1",
        "restart to ready after kill -9 (recovery included), median / max",
        f"{restarts[len(restarts) // 2]:.1f} s / {slowest:.1f} s" if restarts else "none",
        f"<= {RESTART_TO_READY_S:.0f} s (no model to load)",
        slowest <= RESTART_TO_READY_S,
        test="test_kill_during_uploads",
    )
    assert not history.unexpected, "\n".join(history.unexpected)
    assert not tally.problems, "\n".join(tally.problems)
    assert outcomes["ok"] >= cycles, f"too few acknowledged uploads to mean much: {outcomes}"
    assert slowest <= RESTART_TO_READY_S, f"restart to ready took {slowest:.1f} s"
