"""F1: schemathesis over every operation of the OpenAPI schema, against a real server.

The target is `iclserve serve` (uvicorn on 127.0.0.1, the packaged MiniLM, FAISS, SQLite) with
admin and client keys, in front of a FakeUpstream. Its schema is read from `/openapi.json`.
Two pools, a subset and a preset are published first, and generated cases are steered onto
them some of the time (path parameters, `icl.pool`), so that the handlers behind the 404s run
too; before each operation, whatever generated requests changed of them (a DELETE, a replace
upload, an annotation) is put back.

Each operation gets `fuzz_examples` cases (100 in CI, 1,000 nightly): half of them negative
data (schemathesis breaks one part: a parameter, the body, or the key), as far as the
operation has invalid inputs at all, and positive data (valid per the schema) for the rest.
Positive cases carry the admin key; negative cases whose broken part is the key are sent as
generated. Every response must pass:

* not_a_server_error: no 5xx at all (the upstream is healthy, so a 502 is our fault too);
* status_code_conformance, content_type_conformance, response_schema_conformance: only the
  documented statuses and media types, and errors in the documented OpenAI shape;
* negative_data_rejection: invalid data is answered with a 4xx, except on the two forwarding
  routes, whose fields other than `model` and `icl` go to the upstream unchanged and are
  judged by it (so an out-of-schema `stream` may legitimately succeed there);
* a response time bound (RESPONSE_BOUND_S) on every call.

Operations without any input (`/healthz`, `/readyz`, `/metrics`) have a single possible
request: they get it once, and no negative data exists for them. Hypothesis is seeded
(`derandomize`), does not shrink, and failures are collected across all operations and
reported together.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from tests.datasets import topic_rows
from tests.e2e.server import Server
from tests.fakes.upstream import FakeUpstream
from tests.reliability.figures import Figures, scale

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(1800)]

ADMIN_KEY = "sk-fuzz-admin-5b1c0e"
CLIENT_KEY = "sk-fuzz-client-92af47"
EXAMPLES = scale("fuzz_examples", 100, 1000)
# Every answer here is a few milliseconds of work; the bound leaves room for a loaded machine
# and for a first MiniLM pass, and still catches a handler that hangs.
RESPONSE_BOUND_S = 5.0
POOLS = ("fz-topics", "fz-gen")
FIXTURE_ROWS = 30
SUBSET = "fz-sub"
PRESET = "fz-pre"
FORWARDING = {"POST /v1/chat/completions", "POST /v1/completions"}
NO_INPUT = {"GET /healthz", "GET /readyz", "GET /metrics"}
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
# Our documented refusals; 5xx are left out on purpose (not_a_server_error counts them).
REJECTIONS = ["400", "401", "403", "404", "409", "413", "422"]


@dataclass
class Target:
    server: Server
    http: httpx.Client
    job_ids: list[str] = field(default_factory=list)

    def admin(self) -> dict[str, str]:
        return {"authorization": f"Bearer {ADMIN_KEY}"}

    def wait_job(self, job_id: str, timeout: float = 120.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job: dict[str, Any] = self.http.get(f"/v1/jobs/{job_id}", headers=self.admin()).json()
            if job["status"] not in ("queued", "running"):
                return job
            time.sleep(0.05)
        raise AssertionError(f"job {job_id} did not finish in {timeout}s")

    def ensure_fixtures(self) -> None:
        """(Re)publish the pools, subset and preset that cases are steered onto.

        Generated requests may replace, annotate or delete them; whatever differs from the
        fixture is put back before the next operation.
        """
        rows = topic_rows(FIXTURE_ROWS, unlabeled_every=6)
        labeled = sum(1 for row in rows if row.get("output") is not None)
        for pool, task in zip(POOLS, ("classification", "generation"), strict=True):
            info = self.http.get(f"/v1/pools/{pool}", headers=self.admin())
            if info.status_code == 200:
                found = info.json()
                if (found["size"], found["labeled"], found["task"]) == (
                    FIXTURE_ROWS,
                    labeled,
                    task,
                ):
                    continue
            defaults = {"task": task, "template": None, "selector": None, "order": None, "k": None}
            r = self.http.put(f"/v1/pools/{pool}", json=defaults, headers=self.admin())
            assert r.status_code == 200, r.text
            body = "".join(json.dumps(row) + "\n" for row in rows)
            r = self.http.post(
                f"/v1/pools/{pool}/examples?mode=replace",
                content=body.encode(),
                headers={**self.admin(), "content-type": "application/x-ndjson"},
            )
            self._finish(r)
        pool = POOLS[0]
        subset = self.http.get(f"/v1/pools/{pool}/subsets/{SUBSET}", headers=self.admin())
        if subset.is_error or subset.json().get("stale"):
            r = self.http.post(
                f"/v1/pools/{pool}/subsets",
                json={"name": SUBSET, "method": "diversity", "budget": 8},
                headers=self.admin(),
            )
            self._finish(r)
        preset = self.http.get(f"/v1/pools/{pool}/presets/{PRESET}", headers=self.admin())
        if preset.is_error or preset.json().get("stale"):
            r = self.http.post(
                f"/v1/pools/{pool}/presets",
                json={
                    "name": PRESET,
                    "method": "random_search",
                    "k": 2,
                    "model": "fake-model",
                    "budget": 8,
                    "bank_size": 10,
                    "validation": {
                        "examples": [
                            {"input": "the striker scored twice", "output": "sports"},
                            {"input": "rates rose again", "output": "finance"},
                        ]
                    },
                },
                headers=self.admin(),
            )
            self._finish(r)

    def _finish(self, started: httpx.Response) -> None:
        assert started.status_code == 202, started.text
        job_id = started.json()["job"]["id"]
        self.job_ids.append(job_id)
        job = self.wait_job(job_id)
        assert job["status"] == "succeeded", job


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    root = tmp_path_factory.mktemp("fuzz")
    with FakeUpstream(models=["fake-model", "fake-other"]) as fake:
        server = Server(
            root / "data",
            fake,
            env={
                "ICLSERVE_ADMIN_KEYS": ADMIN_KEY,
                "ICLSERVE_CLIENT_KEYS": CLIENT_KEY,
                # Generated subset and preset jobs run behind the fuzzing; keep them small so
                # that they do not starve it (the caps are what a deployment would set too).
                "ICLSERVE_LIMITS__MAX_SUBSET_BUDGET": "32",
                "ICLSERVE_LIMITS__MAX_PRESET_CALLS": "64",
            },
        )
        server.start()
        try:
            with httpx.Client(base_url=server.url, timeout=30.0) as http:
                found = Target(server, http)
                found.ensure_fixtures()
                yield found
        finally:
            server.stop()


def _steer(case: Case, choice: int, mode: GenerationMode, target: Target) -> None:
    """Point some cases at the published fixtures instead of generated names.

    A generated value is replaced only when it is valid, so that a negative case keeps the
    part that schemathesis broke.
    """
    if choice == 0:
        return
    params = case.path_parameters or {}
    pool = params.get("pool")
    if isinstance(pool, str) and _valid_name(pool):
        params["pool"] = POOLS[choice % len(POOLS)] if choice < 3 else POOLS[0]
    name = params.get("name")
    if isinstance(name, str) and _valid_name(name):
        params["name"] = SUBSET if "/subsets/" in case.operation.path else PRESET
    job_id = params.get("job_id")
    if isinstance(job_id, str) and 0 < len(job_id) <= 64 and target.job_ids:
        params["job_id"] = target.job_ids[choice % len(target.job_ids)]
    body = case.body
    if mode == GenerationMode.POSITIVE and isinstance(body, dict):
        icl = body.get("icl")
        if isinstance(icl, dict):
            icl["pool"] = POOLS[0]
            if choice == 3:
                # Also a selector and subset that exist, so selection itself runs.
                icl.pop("selector", None)
                icl["subset"] = None
        messages = body.get("messages")
        if choice == 3 and isinstance(messages, list):
            messages.append({"role": "user", "content": "who won the match last night"})


def _valid_name(value: str) -> bool:
    return 0 < len(value) <= 64 and value[0].isalnum() and value.isascii()


@dataclass
class Tally:
    cases: Counter[str] = field(default_factory=Counter)
    by_mode: Counter[str] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)
    server_errors: int = 0
    slowest: tuple[float, str] = (0.0, "")
    failures: dict[str, str] = field(default_factory=dict)


def _fuzz_operation(
    operation: Any,
    mode: GenerationMode,
    examples: int,
    target: Target,
    tally: Tally,
    session: Any,
) -> None:
    label = operation.label
    checks = list(CHECKS)
    if mode == GenerationMode.NEGATIVE and label not in FORWARDING:
        checks.append(negative_data_rejection)

    @settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.generate],
    )
    @given(case=operation.as_strategy(generation_mode=mode), choice=st.integers(0, 3))
    def run(case: Case, choice: int) -> None:
        _steer(case, choice, mode, target)
        key_broken = mode == GenerationMode.NEGATIVE and operation.schema.is_security_param_negated(
            case
        )
        headers = None if key_broken else target.admin()
        started = time.perf_counter()
        response = case.call(
            base_url=target.server.url, session=session, headers=headers, timeout=30
        )
        took = time.perf_counter() - started
        tally.cases[label] += 1
        tally.by_mode[mode.name] += 1
        tally.statuses[response.status_code] += 1
        if response.status_code >= 500:
            tally.server_errors += 1
        if took > tally.slowest[0]:
            tally.slowest = (took, f"{label} -> {response.status_code}")
        problems: list[str] = []
        if took > RESPONSE_BOUND_S:
            problems.append(f"answered in {took:.1f}s (bound {RESPONSE_BOUND_S}s)")
        try:
            case.validate_response(response, checks=checks, headers=headers)
        except BaseException as exc:  # schemathesis raises a FailureGroup (an ExceptionGroup)
            problems.append(str(exc))
        if problems:
            key = f"{label} [{mode.name.lower()}] {response.status_code}"
            tally.failures.setdefault(key, "\n".join(problems)[:3000])

    try:
        run()
    except Unsatisfiable:
        # Hypothesis proved there is no such case at all (negative data for an operation
        # without inputs); any case it did produce was still checked.
        assert mode == GenerationMode.NEGATIVE and label in NO_INPUT, label


def test_every_operation_survives_generated_requests(target: Target, figures: Figures) -> None:
    config = schemathesis.Config.from_dict(
        {"checks": {"negative_data_rejection": {"expected-statuses": REJECTIONS}}}
    )
    schema = schemathesis.openapi.from_url(target.server.url + "/openapi.json", config=config)
    operations = [result.ok() for result in schema.get_all_operations()]
    documented = {
        f"{method.upper()} {path}"
        for path, item in target.http.get("/openapi.json").json()["paths"].items()
        for method in item
    }
    assert {op.label for op in operations} == documented
    tally = Tally()
    started = time.monotonic()
    with requests.Session() as session:
        for operation in operations:
            # Half negative data, as far as there is any, and positive data for the rest.
            target.ensure_fixtures()
            _fuzz_operation(
                operation, GenerationMode.NEGATIVE, EXAMPLES // 2, target, tally, session
            )
            target.ensure_fixtures()
            positive = EXAMPLES - tally.cases[operation.label]
            _fuzz_operation(operation, GenerationMode.POSITIVE, positive, target, tally, session)
    elapsed = time.monotonic() - started
    log = target.server.log.read_text(errors="replace")

    name = "test_every_operation_survives_generated_requests"
    with_inputs = [op.label for op in operations if op.label not in NO_INPUT]
    fewest = min(tally.cases[label] for label in with_inputs)
    total = sum(tally.cases.values())
    figures.record(
        "F1",
        f"schemathesis cases over {len(operations)} operations (positive + negative), "
        f"{elapsed:.0f} s",
        f"{total:,} cases ({tally.by_mode['POSITIVE']:,} positive, "
        f"{tally.by_mode['NEGATIVE']:,} negative); at least {fewest} per operation with inputs",
        f">= {EXAMPLES} per operation",
        fewest >= EXAMPLES,
        test=name,
    )
    figures.record(
        "F1",
        "5xx answers to generated requests",
        tally.server_errors,
        "0",
        tally.server_errors == 0,
        test=name,
    )
    figures.record(
        "F1",
        "schema violations (status, media type, error shape) and accepted invalid data",
        len(tally.failures),
        "0",
        not tally.failures,
        test=name,
    )
    figures.record(
        "F1",
        "slowest answer",
        f"{tally.slowest[0] * 1000:.0f} ms ({tally.slowest[1]})",
        f"<= {RESPONSE_BOUND_S:.0f} s",
        tally.slowest[0] <= RESPONSE_BOUND_S,
        test=name,
    )

    report = "\n\n".join(f"== {key}\n{text}" for key, text in sorted(tally.failures.items()))
    assert not tally.failures, f"{len(tally.failures)} failing operation/status pairs:\n{report}"
    assert tally.server_errors == 0, dict(tally.statuses)
    assert "Traceback" not in log, log[log.index("Traceback") - 2000 :][:6000]
    for label in with_inputs:
        assert tally.cases[label] >= EXAMPLES, (label, tally.cases[label])
    for label in NO_INPUT:
        assert tally.cases[label] >= 1, label
    # The steering reached the handlers behind the lookups: real pools answered.
    assert tally.statuses[200] + tally.statuses[202] > len(operations), dict(tally.statuses)
