"""S3: the authorization matrix, generated from the app's route table.

Every route of `create_app(...)` (FastAPI's own documentation routes included) must be in
exactly one of PUBLIC, CLIENT and ADMIN; a new route that is not fails the suite until it
is classified here. Each route is then called with no key, with several wrong keys, with a
client key and with an admin key, with keys configured:

* PUBLIC routes answer 200 whatever the key;
* no key or a wrong key gets 401 (`authentication_error`) on every other route, also with a
  body that does not parse (the key is checked before the body is judged);
* a client key gets 403 (`permission_error`) on ADMIN routes, and on CLIENT routes neither 401
  nor 403;
* an admin key never gets 401 or 403.

The authorized calls carry valid requests (REQUESTS), so they must also succeed (2xx), which
shows that the route behind the check ran; no call may get a 5xx. Routes are visited with
the deleting ones last, so that the fixtures survive until then.

Why the public routes are public: `/healthz` and `/readyz` are called by container health
checks and orchestrators, which hold no key; `/metrics` by Prometheus scrapers (README,
"HTTP API": open; it shows counters and pool names, never keys or example text);
`/openapi.json`, `/docs`, `/docs/oauth2-redirect` and `/redoc` describe the API, which is
public (tests/reliability/test_canaries.py checks that no key appears there).

`run_matrix` takes any httpx client: a TestClient here, a real server in
tests/reliability/test_canaries.py.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.routing import iter_route_contexts
from fastapi.testclient import TestClient
from pydantic import SecretStr

from app.main import create_app
from app.settings import Settings
from tests.conftest import ADMIN_KEY, CLIENT_KEY, make_settings
from tests.fakes.upstream import FakeUpstream

Route = tuple[str, str]

PUBLIC: set[Route] = {
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    *((m, p) for m in ("GET", "HEAD") for p in ("/openapi.json", "/docs", "/redoc")),
    ("GET", "/docs/oauth2-redirect"),
    ("HEAD", "/docs/oauth2-redirect"),
}
CLIENT: set[Route] = {
    ("GET", "/v1/pools"),
    ("GET", "/v1/pools/{pool}"),
    ("GET", "/v1/pools/{pool}/examples"),
    ("POST", "/v1/pools/{pool}/select"),
    ("GET", "/v1/pools/{pool}/subsets"),
    ("GET", "/v1/pools/{pool}/subsets/{name}"),
    ("GET", "/v1/pools/{pool}/presets"),
    ("GET", "/v1/pools/{pool}/presets/{name}"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("GET", "/v1/models"),
}
ADMIN: set[Route] = {
    ("PUT", "/v1/pools/{pool}"),
    ("DELETE", "/v1/pools/{pool}"),
    ("POST", "/v1/pools/{pool}/examples"),
    ("PATCH", "/v1/pools/{pool}/examples"),
    ("POST", "/v1/pools/{pool}/subsets"),
    ("DELETE", "/v1/pools/{pool}/subsets/{name}"),
    ("POST", "/v1/pools/{pool}/presets"),
    ("DELETE", "/v1/pools/{pool}/presets/{name}"),
    ("GET", "/v1/jobs/{job_id}"),
    ("DELETE", "/v1/jobs/{job_id}"),
    ("GET", "/v1/jobs"),
}
POOL, SUBSET, PRESET = "authz-pool", "authz-subset", "authz-preset"
ROWS = [{"input": f"match report number {n}", "output": "sports"} for n in range(12)]
VALIDATION = {"examples": [{"input": "the final whistle", "output": "sports"}]}
# Valid requests, so that an authorized call must succeed. `{example_id}` is filled in.
REQUESTS: dict[Route, dict[str, Any]] = {
    ("PUT", "/v1/pools/{pool}"): {"json": {"description": "matrix"}},
    ("POST", "/v1/pools/{pool}/examples"): {
        "content": b'{"input": "one more match report", "output": "sports"}\n',
        "headers": {"content-type": "application/x-ndjson"},
    },
    ("PATCH", "/v1/pools/{pool}/examples"): {
        "json": {"examples": [{"id": "{example_id}", "output": "sports"}]}
    },
    ("POST", "/v1/pools/{pool}/select"): {"json": {"query": "match report", "k": 2}},
    ("POST", "/v1/pools/{pool}/subsets"): {
        "json": {"name": "authz-other", "method": "random", "budget": 2}
    },
    ("POST", "/v1/pools/{pool}/presets"): {
        "json": {
            "name": "authz-other",
            "method": "random_search",
            "k": 1,
            "model": "fake-model",
            "budget": 2,
            "validation": VALIDATION,
        }
    },
    ("POST", "/v1/chat/completions"): {
        "json": {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}
    },
    ("POST", "/v1/completions"): {"json": {"model": "fake-model", "prompt": "hi"}},
}
# Authorized calls that may end in a 4xx: cancelling a job that has already finished.
MAY_REFUSE: set[Route] = {("DELETE", "/v1/jobs/{job_id}")}


def wrong_keys(admin_key: str, client_key: str) -> dict[str, dict[str, str]]:
    """Authorization headers that must all count as no key or an unknown key."""
    basic = base64.b64encode(f"{admin_key}:".encode()).decode()
    values = {
        "unknown key": "Bearer sk-not-a-key",
        "admin key cut short": f"Bearer {admin_key[:-1]}",
        "admin key plus a character": f"Bearer {admin_key}x",
        "client key cut short": f"Bearer {client_key[:-1]}",
        "key without a scheme": admin_key,
        "basic scheme": f"Basic {basic}",
        "token scheme": f"Token {admin_key}",
        "bearer without a key": "Bearer",
    }
    return {name: {"authorization": value} for name, value in values.items()}


def route_table(settings: Settings) -> list[Route]:
    """Every (method, path) the app serves, from its route table."""
    app = create_app(settings)
    found = {
        (method, route.path_format)
        for route in iter_route_contexts(app.routes)
        for method in route.methods or ()
        if route.path_format
    }
    return sorted(found)


def _visiting_order(route: Route) -> tuple[int, str, str]:
    # Deleting routes last, the pool itself at the very end.
    method, path = route
    last = 2 if route == ("DELETE", "/v1/pools/{pool}") else int(method == "DELETE")
    return last, path, method


@dataclass
class MatrixReport:
    routes: int = 0
    calls: int = 0
    authorized_ok: int = 0
    unexpected: list[str] = field(default_factory=list)


def prepare(client: httpx.Client, admin: dict[str, str]) -> dict[str, str]:
    """Publish the pool, subset and preset the matrix calls; the values for the paths."""
    body = "".join(json.dumps(row) + "\n" for row in ROWS).encode()
    r = client.post(
        f"/v1/pools/{POOL}/examples",
        content=body,
        headers={**admin, "content-type": "application/x-ndjson"},
    )
    assert r.status_code == 202, r.text
    job_id = r.json()["job"]["id"]
    _wait(client, job_id, admin)
    for path, payload in (
        (f"/v1/pools/{POOL}/subsets", {"name": SUBSET, "method": "random", "budget": 3}),
        (
            f"/v1/pools/{POOL}/presets",
            {
                "name": PRESET,
                "method": "random_search",
                "k": 1,
                "model": "fake-model",
                "budget": 2,
                "validation": VALIDATION,
            },
        ),
    ):
        r = client.post(path, json=payload, headers=admin)
        assert r.status_code == 202, r.text
        _wait(client, r.json()["job"]["id"], admin)
    page = client.get(f"/v1/pools/{POOL}/examples", headers=admin).json()
    return {"job_id": job_id, "example_id": str(page["examples"][0]["id"])}


def _wait(client: httpx.Client, job_id: str, admin: dict[str, str]) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}", headers=admin).json()
        if job["status"] not in ("queued", "running"):
            assert job["status"] == "succeeded", job
            return
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} did not finish")


def _concrete(route: Route, ids: dict[str, str]) -> str:
    path = route[1]
    name = SUBSET if "/subsets/" in path else PRESET
    return path.format(pool=POOL, name=name, job_id=ids["job_id"])


def _request(route: Route, ids: dict[str, str]) -> dict[str, Any]:
    spec = REQUESTS.get(route, {})
    if "json" in spec and route == ("PATCH", "/v1/pools/{pool}/examples"):
        return {"json": {"examples": [{"id": int(ids["example_id"]), "output": "sports"}]}}
    return {key: value for key, value in spec.items() if key != "headers"}


def run_matrix(
    client: httpx.Client, routes: list[Route], admin_key: str, client_key: str
) -> MatrixReport:
    """Call every route with every kind of key; collect what differs from the rules."""
    report = MatrixReport(routes=len(routes))
    admin = {"authorization": f"Bearer {admin_key}"}
    ids = prepare(client, admin)
    keys: dict[str, dict[str, str]] = {
        "no key": {},
        **wrong_keys(admin_key, client_key),
        "client key": {"authorization": f"Bearer {client_key}"},
        "admin key": admin,
    }
    for route in sorted(routes, key=_visiting_order):
        method, _ = route
        url = _concrete(route, ids)
        request = _request(route, ids)
        extra_headers = REQUESTS.get(route, {}).get("headers", {})
        for who, headers in keys.items():
            variants = [request]
            if who not in ("client key", "admin key") and method in ("POST", "PUT", "PATCH"):
                variants.append({"content": b"{not json"})  # the key still comes first
            for variant in variants:
                content_type = {"content-type": "application/json"} if "content" in variant else {}
                answer = client.request(
                    method, url, headers={**content_type, **extra_headers, **headers}, **variant
                )
                report.calls += 1
                problem = _judge(route, who, answer)
                if problem:
                    report.unexpected.append(f"{method} {url} [{who}]: {problem}")
                elif route not in PUBLIC and (
                    who == "admin key" or (who == "client key" and route in CLIENT)
                ):
                    report.authorized_ok += 1
    return report


def _judge(route: Route, who: str, answer: httpx.Response) -> str | None:
    status = answer.status_code
    if status >= 500:
        return f"{status} {answer.text[:200]}"
    if route in PUBLIC:
        return None if status == 200 else f"{status} on a public route"
    authorized = who == "admin key" or (who == "client key" and route in CLIENT)
    if not authorized:
        wanted = 403 if who == "client key" else 401
        if status != wanted:
            return f"{status}, expected {wanted}: {answer.text[:200]}"
        kind = "permission_error" if wanted == 403 else "authentication_error"
        error = answer.json()["error"]
        if error["type"] != kind or set(error) < {"message", "type", "param", "code"}:
            return f"error body {error}"
        return None
    if status in (401, 403):
        return f"{status} for an authorized caller"
    if not 200 <= status < 300 and route not in MAY_REFUSE:
        return f"{status} for a valid request: {answer.text[:200]}"
    return None


# --- the tests -----------------------------------------------------------------------------


@pytest.fixture
def keyed(tmp_path: Path, upstream: FakeUpstream) -> Iterator[tuple[TestClient, Settings]]:
    settings = make_settings(
        tmp_path, upstream, admin_keys=[SecretStr(ADMIN_KEY)], client_keys=[SecretStr(CLIENT_KEY)]
    )
    with TestClient(create_app(settings)) as client:
        yield client, settings


def test_every_route_is_classified(keyed: tuple[TestClient, Settings]) -> None:
    _, settings = keyed
    routes = set(route_table(settings))
    tables = {"PUBLIC": PUBLIC, "CLIENT": CLIENT, "ADMIN": ADMIN}
    unclassified = sorted(routes - PUBLIC - CLIENT - ADMIN)
    assert not unclassified, f"classify these routes in PUBLIC, CLIENT or ADMIN: {unclassified}"
    stale = sorted((PUBLIC | CLIENT | ADMIN) - routes)
    assert not stale, f"these classified routes no longer exist: {stale}"
    for a, b in (("PUBLIC", "CLIENT"), ("PUBLIC", "ADMIN"), ("CLIENT", "ADMIN")):
        assert not tables[a] & tables[b], (a, b, tables[a] & tables[b])
    assert set(REQUESTS) <= CLIENT | ADMIN


def test_matrix(keyed: tuple[TestClient, Settings]) -> None:
    client, settings = keyed
    routes = route_table(settings)
    report = run_matrix(client, routes, ADMIN_KEY, CLIENT_KEY)
    assert not report.unexpected, "\n".join(report.unexpected)
    # Every protected route ran for the admin, and every client route for the client too.
    protected = len([r for r in routes if r not in PUBLIC])
    assert report.authorized_ok == protected + len(CLIENT)
    assert report.calls >= len(routes) * (2 + len(wrong_keys(ADMIN_KEY, CLIENT_KEY)))


def test_without_keys_everyone_is_admin(tmp_path: Path, upstream: FakeUpstream) -> None:
    # The documented loopback mode: no keys configured, every caller may do everything.
    settings = make_settings(tmp_path, upstream)
    with TestClient(create_app(settings)) as client:
        assert client.put("/v1/pools/open", json={}).status_code == 200
        assert client.get("/v1/jobs").status_code == 200


def test_openapi_marks_exactly_the_routes_behind_a_key(keyed: tuple[TestClient, Settings]) -> None:
    client, _ = keyed
    document = client.get("/openapi.json").json()
    assert document["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    marked = {
        (method.upper(), path)
        for path, operations in document["paths"].items()
        for method, operation in operations.items()
        if operation.get("security") == [{"bearer": []}]
    }
    documented = {
        (method.upper(), path)
        for path, operations in document["paths"].items()
        for method in operations
    }
    assert marked == documented & (CLIENT | ADMIN)
    assert documented & PUBLIC and not marked & PUBLIC
