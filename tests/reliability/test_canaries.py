"""S5 (with S3 and S1 over real HTTP, and S7's figure): canary keys never leave the server.

One real server (`iclserve serve`, uvicorn, MiniLM, logging at debug level into a file) holds
canary keys: an admin key (given through a key file), a client key, the key of its upstream
(a FakeUpstream that demands it), and a stale key configured for a second upstream alias
(which the fake refuses, echoing the key it was sent, as real providers do). Then:

* the authorization matrix of tests/api/test_authz_matrix.py runs over HTTP: every route
  with no key, eight kinds of wrong key, the client key and the admin key (S3);
* the injection corpus of tests/api/test_injection.py runs over HTTP, each template payload
  in each field each way (S1);
* upstream failures are provoked: the stale key's 401, and 400, 404, 422, 429 and 500
  answers whose messages or bodies carry the upstream key (whole, cut, in a raw body), on
  plain and streaming calls, and on the model listing;
* `/metrics`, `/openapi.json` and `/docs` are fetched, with and without a key.

The static scan of tests/unit/test_no_unsafe_loading.py (S7) is run here too, for its
figure.

Every response body and header (captured by an httpx response hook), `/metrics`,
`/openapi.json` and the server log are then searched for each canary and for the first 8
hex digits of its SHA-256: 0 hits. Keys are sent only where keys belong (the Authorization
header, server settings): a caller that pastes its key into a pool name gets it back in
the 404, which is its own text, not a leak.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from app.settings import EmbeddingSettings, Settings
from tests.api.test_authz_matrix import route_table, run_matrix, wrong_keys
from tests.api.test_injection import PAYLOADS, run_corpus
from tests.e2e.server import Server
from tests.fakes.upstream import FakeUpstream
from tests.reliability.figures import Figures
from tests.unit.test_no_unsafe_loading import ALLOWED, scan_packages

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(900)]

ADMIN = "sk-admin-CANARY-7c1e4f9a2b58d3"
CLIENT = "sk-client-CANARY-3d8b6e0c51a7f2"
UPSTREAM = "sk-upstream-CANARY-9a4f2c7e13b6d0"
STALE = "sk-stale-CANARY-b2e81d0f66c94a"
CANARIES = {"admin": ADMIN, "client": CLIENT, "upstream": UPSTREAM, "stale upstream": STALE}


def traces(secret: str) -> dict[str, str]:
    """The forms a leak could take: the key, and the start of its SHA-256 in hex."""
    digest = hashlib.sha256(secret.encode()).hexdigest()
    return {
        "the key": secret,
        "SHA-256 prefix": digest[:8],
        "SHA-256 prefix (upper)": digest[:8].upper(),
    }


@dataclass
class Capture:
    texts: list[tuple[str, str]] = field(default_factory=list)  # (where, text)

    def response(self, response: httpx.Response) -> None:
        response.read()
        where = f"{response.request.method} {response.request.url.path} -> {response.status_code}"
        headers = "\n".join(f"{k}: {v}" for k, v in response.headers.items())
        self.texts.append((where, headers + "\n\n" + response.text))


@dataclass
class Session:
    server: Server
    fake: FakeUpstream
    client: httpx.Client
    capture: Capture
    data_dir: Path


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Session]:
    root = tmp_path_factory.mktemp("canaries")
    (root / "admin.keys").write_text(ADMIN + "\n")
    with FakeUpstream(models=["fake-model", "fake-other"], api_key=UPSTREAM) as fake:
        server = Server(
            root / "data",
            fake,
            env={
                "ICLSERVE_ADMIN_KEYS_FILE": str(root / "admin.keys"),
                "ICLSERVE_CLIENT_KEYS": CLIENT,
                "ICLSERVE_LOG_LEVEL": "debug",
                "ICLSERVE_UPSTREAMS": json.dumps(
                    [
                        {
                            "name": "good",
                            "base_url": fake.base_url,
                            "api_key": UPSTREAM,
                            "models": ["fake-model"],
                            "max_retries": 1,
                            "max_retry_wait": 1,
                        },
                        {
                            "name": "stale",
                            "base_url": fake.base_url,
                            "api_key": STALE,
                            "models": ["fake-other"],
                            "max_retries": 0,
                        },
                    ]
                ),
            },
        )
        server.start()
        capture = Capture()
        try:
            with httpx.Client(
                base_url=server.url, timeout=60.0, event_hooks={"response": [capture.response]}
            ) as client:
                yield Session(server, fake, client, capture, root / "data")
        finally:
            server.stop()


def _admin() -> dict[str, str]:
    return {"authorization": f"Bearer {ADMIN}"}


def test_authorization_matrix_over_http(session: Session, figures: Figures) -> None:
    settings = Settings(
        _env_file=None, data_dir=session.data_dir, embedding=EmbeddingSettings(kind="hash")
    )
    routes = route_table(settings)
    report = run_matrix(session.client, routes, ADMIN, CLIENT)
    kinds = 3 + len(wrong_keys(ADMIN, CLIENT))
    figures.record(
        "S3",
        f"authorization matrix from the route table over HTTP: {report.routes} routes x "
        f"{kinds} kinds of key (none, {kinds - 3} wrong, client, admin)",
        f"{report.calls} calls, {len(report.unexpected)} unexpected; "
        f"{report.authorized_ok} authorized calls succeeded",
        "0 unexpected (no 2xx without the right key), 100% of routes",
        not report.unexpected,
        test="test_authorization_matrix_over_http",
    )
    assert not report.unexpected, "\n".join(report.unexpected)


def test_injection_corpus_over_http(session: Session, figures: Figures) -> None:
    report = run_corpus(session.client, _admin(), lambda: session.fake.requests, thorough=True)
    figures.record(
        "S1",
        f"{len(PAYLOADS)} injection payloads in example fields, queries and all six template "
        "fields (pool template, /select override, icl.template), over HTTP",
        f"{report.renderings} renderings compared whole, {report.accepted} template uses "
        f"rendered by the rules, {report.refused} refused with 400; "
        f"{len(report.evaluated)} evaluated, {report.server_errors} 5xx",
        "0 evaluated; literal output or 400; 0 5xx",
        not report.evaluated and report.server_errors == 0,
        test="test_injection_corpus_over_http",
    )
    assert not report.evaluated and report.server_errors == 0


def test_upstream_failures_carrying_the_key(session: Session) -> None:
    client, fake = session.client, session.fake
    chat = {"model": "fake-model", "messages": [{"role": "user", "content": "hello"}]}
    # The stale alias: the fake answers 401 and echoes the key it was sent.
    stale = client.post(
        "/v1/chat/completions", json={**chat, "model": "fake-other"}, headers=_admin()
    )
    assert stale.status_code == 502, stale.text
    stream = client.post(
        "/v1/chat/completions",
        json={**chat, "model": "fake-other", "stream": True},
        headers=_admin(),
    )
    assert stream.status_code == 502, stream.text
    cut = UPSTREAM[:-3]
    for code, message in (
        (400, f"Incorrect API key provided: {UPSTREAM}."),
        (400, f"key {UPSTREAM} is not valid for model fake-model; " + "x" * 600),
        (400, "x" * 490 + UPSTREAM),  # cut by the truncation in the middle of the key
        (404, f"model not found for key {UPSTREAM}"),
        (422, f"cannot process for {cut}"),
        (429, f"rate limit for {UPSTREAM}"),
        (500, f"internal error with {UPSTREAM}"),
    ):
        for stream_it in (False, True):
            # Enough times for the retries of 429 and 5xx to fail too.
            fake.set_fault("status", code=code, message=message, times=5, retry_after=0)
            r = client.post(
                "/v1/chat/completions", json={**chat, "stream": stream_it}, headers=_admin()
            )
            assert 400 <= r.status_code < 600, r.text
            if code == 400 and not stream_it:
                # The upstream's message was relayed, so the redaction is what kept it out.
                assert "[redacted]" in r.json()["error"]["message"], r.text
            fake.clear_faults()
    fake.set_fault("status", code=503, body=f"upstream down; key={UPSTREAM}", times=5)
    r = client.post(
        "/v1/completions", json={"model": "fake-model", "prompt": "x"}, headers=_admin()
    )
    assert r.status_code >= 500
    fake.clear_faults()
    fake.set_fault("close_mid_stream", chunks=2, times=1)
    r = client.post("/v1/chat/completions", json={**chat, "stream": True}, headers=_admin())
    assert r.status_code == 200 and "error" in r.text
    fake.clear_faults()
    fake.set_fault(
        "status", code=500, message=f"models broke {UPSTREAM}", path="/v1/models", times=3
    )
    assert (
        client.get("/v1/models", headers={"authorization": f"Bearer {CLIENT}"}).status_code == 200
    )
    fake.clear_faults()
    # Keys of the wrong kind where keys belong: the upstream's key is no key of ours.
    for presented in (UPSTREAM, STALE, ADMIN.upper(), CLIENT + " " + ADMIN):
        r = client.get("/v1/pools", headers={"authorization": f"Bearer {presented}"})
        assert r.status_code == 401, r.text


def test_no_canary_anywhere(session: Session, figures: Figures) -> None:
    client = session.client
    extra = [
        ("GET /metrics (no key)", client.get("/metrics").text),
        ("GET /metrics (admin)", client.get("/metrics", headers=_admin()).text),
        ("GET /openapi.json", client.get("/openapi.json").text),
        ("GET /docs", client.get("/docs").text),
    ]
    session.server.stop()  # flush and close the log
    log = session.server.log.read_text(errors="replace")
    assert "DEBUG" in log, "the server logged at debug level"
    texts = [*session.capture.texts, *extra, ("server log", log)]
    hits: list[str] = []
    for name, secret in CANARIES.items():
        for form, trace in traces(secret).items():
            for where, text in texts:
                if trace in text:
                    at = text.index(trace)
                    hits.append(
                        f"{name} ({form}) in {where}: ...{text[max(0, at - 80) : at + 40]!r}"
                    )
    figures.record(
        "S5",
        f"canary keys ({len(CANARIES)}: admin, client, upstream, stale upstream) and their "
        f"SHA-256 prefixes in {len(session.capture.texts)} responses (bodies and headers), "
        "/metrics, /openapi.json and the debug-level server log",
        f"{len(hits)} hits",
        "0",
        not hits,
        test="test_no_canary_anywhere",
    )
    assert len(session.capture.texts) > 1000
    assert not hits, "\n".join(hits[:20])


def test_static_scan(figures: Figures) -> None:
    result = scan_packages()
    figures.record(
        "S7",
        f"AST scan of app/, retrievers/, selection/ ({result.files} files) for pickle, "
        "allow_pickle, torch/joblib loads, FAISS index reads, eval/exec, and templating of "
        "user text",
        f"{len(result.problems)} findings; {len(result.loaders)} loader call(s), all in the "
        f"allow-list ({', '.join(function for _, function in ALLOWED)})",
        "0 findings",
        not result.problems,
        test="test_static_scan",
    )
    assert not result.problems, result.problems
