"""S6: size caps and limits on a real uvicorn, answered at once and without reading the rest.

The server runs with small caps (LIMITS below), so that each can be crossed cheaply:

* a body declared larger than `max_body_bytes` (an honest Content-Length) gets 413 while the
  client has sent only the headers: it waits for the answer before sending any of the body;
* a chunked body is cut off with 413 once it passes the cap: the client keeps sending until
  the answer arrives, and the answer must come before it has sent the rest;
* bad rows get 422 naming their lines; `k`, `fetch_k`, rows per upload, rows per pool, the
  number of pools, field and query lengths get their 400/409/413/422.

Every answer is in the OpenAI error shape and comes within ANSWER_BOUND_S of the request (the
time to the first byte of the answer, measured on the raw socket); RELIABILITY.md's target
is 100 ms, recorded as a figure.

`raw_request` (a bare HTTP/1.1 client on a socket, which notices an early answer while it is
still sending) is also used by test_hostile_uploads.
"""

from __future__ import annotations

import json
import select
import socket
import statistics
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.server import Server
from tests.fakes.upstream import FakeUpstream
from tests.reliability.figures import Figures

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(600)]

ADMIN_KEY = "sk-limits-admin-3e81d0"
CAP = 1024 * 1024
LIMITS = {
    "MAX_BODY_BYTES": CAP,
    "MAX_K": 8,
    "MAX_FETCH_K": 64,
    "MAX_ROWS_PER_UPLOAD": 50,
    "MAX_POOL_ROWS": 80,
    "MAX_POOLS": 3,
    "MAX_FIELD_CHARS": 200,
}
# The 100 ms target with room for a loaded 2-core machine; a handler that reads a whole
# body or hangs still fails it.
ANSWER_BOUND_S = 1.0
TARGET_S = 0.1


@dataclass
class RawAnswer:
    status: int
    headers: dict[str, str]
    body: bytes
    sent: int  # body bytes handed to the socket when the answer was noticed
    seconds: float  # from `started` (see raw_request) to the first byte of the answer

    def json(self) -> Any:
        return json.loads(self.body)


def raw_request(
    port: int,
    method: str,
    path: str,
    headers: dict[str, str],
    body: Iterable[bytes] = (),
    *,
    chunked: bool = False,
    start_after: int = 0,
    timeout: float = 30.0,
) -> RawAnswer:
    """Send a request on a bare socket, stopping the body as soon as an answer arrives.

    The clock starts once `start_after` body bytes are sent (0: after the headers). The body
    is sent in its pieces (as chunks when `chunked`), and before each piece the socket is
    checked for an answer; a reset while sending ends the sending too.
    """
    deadline = time.monotonic() + timeout
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        head = [f"{method} {path} HTTP/1.1", f"host: 127.0.0.1:{port}"]
        head += [f"{name}: {value}" for name, value in headers.items()]
        if chunked:
            head.append("transfer-encoding: chunked")
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        started = time.monotonic() if start_after == 0 else None
        sent = 0
        answered = False
        for piece in body:
            if _readable(sock, 0.0):
                answered = True
                break
            data = b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece
            try:
                _send(sock, data, deadline)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(piece)
            if started is None and sent >= start_after:
                started = time.monotonic()
        else:
            if chunked and not answered:
                try:
                    _send(sock, b"0\r\n\r\n", deadline)
                except (BrokenPipeError, ConnectionResetError):
                    pass
        if started is None:
            started = time.monotonic()
        raw = b""
        first_byte: float | None = None
        while time.monotonic() < deadline:
            if not _readable(sock, max(0.0, deadline - time.monotonic())):
                break
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            if first_byte is None:
                first_byte = time.monotonic()
            raw += chunk
            if _complete(raw):
                break
    assert raw, f"no answer to {method} {path} within {timeout}s"
    head_text, _, payload = raw.partition(b"\r\n\r\n")
    lines = head_text.decode("latin-1").split("\r\n")
    found = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    assert first_byte is not None
    return RawAnswer(int(lines[0].split()[1]), found, payload, sent, first_byte - started)


def _readable(sock: socket.socket, wait: float) -> bool:
    return bool(select.select([sock], [], [], wait)[0])


def _send(sock: socket.socket, data: bytes, deadline: float) -> None:
    view = memoryview(data)
    while view:
        if time.monotonic() > deadline:
            raise TimeoutError("sending took too long")
        if not select.select([], [sock], [], 0.05)[1]:
            if _readable(sock, 0.0):
                raise BrokenPipeError("the server answered while the body was being sent")
            continue
        view = view[sock.send(view) :]


def _complete(raw: bytes) -> bool:
    head, sep, payload = raw.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(payload) >= int(value)
    return False


# --- the server --------------------------------------------------------------------------


@dataclass
class Limited:
    server: Server
    port: int
    times: dict[str, float]

    def auth(self, **extra: str) -> dict[str, str]:
        return {"authorization": f"Bearer {ADMIN_KEY}", **extra}

    def json_request(
        self, method: str, path: str, payload: Any, *, what: str, content_type: str | None = None
    ) -> RawAnswer:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        headers = self.auth(**{"content-type": content_type or "application/json"})
        headers["content-length"] = str(len(data))
        answer = raw_request(self.port, method, path, headers, [data])
        self.times[what] = answer.seconds
        return answer


def _upload(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def _rows(n: int, prefix: str = "row") -> list[dict[str, Any]]:
    return [{"input": f"{prefix} {i} about the match", "output": "sports"} for i in range(n)]


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Limited]:
    root = tmp_path_factory.mktemp("limits")
    with FakeUpstream(models=["fake-model"]) as fake:
        env = {f"ICLSERVE_LIMITS__{name}": str(value) for name, value in LIMITS.items()}
        server = Server(root / "data", fake, env={**env, "ICLSERVE_ADMIN_KEYS": ADMIN_KEY})
        server.start()
        try:
            found = Limited(server, server.port, {})
            answer = found.json_request(
                "POST",
                "/v1/pools/capped/examples",
                _upload(_rows(40)),
                what="setup",
                content_type="application/x-ndjson",
            )
            assert answer.status == 202, answer.body
            _wait(found, answer.json()["job"]["id"])
            yield found
        finally:
            server.stop()


def _wait(limited: Limited, job_id: str) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        answer = raw_request(limited.port, "GET", f"/v1/jobs/{job_id}", limited.auth())
        if answer.json()["status"] not in ("queued", "running"):
            assert answer.json()["status"] == "succeeded", answer.json()
            return
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish")


def _assert_error(answer: RawAnswer, status: int, what: str) -> dict[str, Any]:
    assert answer.status == status, (what, answer.status, answer.body[:500])
    error: dict[str, Any] = answer.json()["error"]
    assert {"message", "type", "param", "code"} <= set(error), error
    assert answer.seconds < ANSWER_BOUND_S, (what, answer.seconds)
    return error


# --- the tests ---------------------------------------------------------------------------


def test_declared_oversized_body_is_refused_before_it_is_sent(limited: Limited) -> None:
    for path in ("/v1/pools/capped/examples", "/v1/pools/capped/select", "/v1/chat/completions"):
        headers = limited.auth(**{"content-type": "application/json"})
        headers["content-length"] = str(CAP + 1)
        # No body at all: the answer has to come from the headers alone.
        answer = raw_request(limited.port, "POST", path, headers, [], timeout=5.0)
        limited.times[f"Content-Length over the cap ({path})"] = answer.seconds
        error = _assert_error(answer, 413, path)
        assert error["code"] == "body_too_large"
        assert answer.sent == 0


def test_chunked_oversized_body_is_cut_off(limited: Limited, figures: Figures) -> None:
    piece = b'{"input": "' + b"x" * (64 * 1024 - 16) + b'"}\n'
    intended = 64 * CAP  # far more than the socket buffers of both ends can hold
    answer = raw_request(
        limited.port,
        "POST",
        "/v1/pools/capped/examples",
        limited.auth(**{"content-type": "application/x-ndjson"}),
        (piece for _ in range(intended // len(piece))),
        chunked=True,
        start_after=CAP + 1,
        timeout=20.0,
    )
    limited.times["chunked body past the cap"] = answer.seconds
    error = _assert_error(answer, 413, "chunked")
    assert "larger than the limit" in error["message"]
    # The server stopped reading at the cap: what the client managed to send beyond it is
    # what the kernel's buffers took, far short of the intended body.
    figures.record(
        "S6",
        f"chunked upload of {intended // CAP} MiB against a {CAP // 1024} KiB cap",
        f"413 after the client had sent {answer.sent / CAP:.1f} MiB, "
        f"{answer.seconds * 1000:.0f} ms after it passed the cap",
        "413 before the rest is sent",
        CAP < answer.sent < intended // 4,
        test="test_chunked_oversized_body_is_cut_off",
    )
    assert CAP < answer.sent < intended // 4, answer.sent


def test_bad_rows_are_named_by_line(limited: Limited) -> None:
    lines = [
        json.dumps({"input": "fine row", "output": "a"}),
        json.dumps({"output": "no input"}),
        json.dumps({"input": "also fine", "output": "b"}),
        "{not json",
        json.dumps({"input": "x" * 201}),
    ]
    answer = limited.json_request(
        "POST",
        "/v1/pools/capped/examples",
        ("\n".join(lines) + "\n").encode(),
        what="422 bad rows",
        content_type="application/x-ndjson",
    )
    error = _assert_error(answer, 422, "bad rows")
    assert [row["line"] for row in error["rows"]] == [2, 4, 5]
    assert error["bad_rows"] == 3
    assert "200" in error["rows"][2]["reason"]  # the field cap is named


def test_selection_limits(limited: Limited) -> None:
    cases: list[tuple[str, str, dict[str, Any], int, str]] = [
        ("k over max_k", "/v1/pools/capped/select", {"query": "goal", "k": 9}, 400, "k"),
        (
            "fetch_k over max_fetch_k",
            "/v1/pools/capped/select",
            {"query": "goal", "k": 4, "selector": {"method": "mmr", "fetch_k": 65}},
            400,
            "selector",
        ),
        (
            "query over max_field_chars",
            "/v1/pools/capped/select",
            {"query": "q" * 201},
            400,
            "query",
        ),
        (
            "icl.k over max_k (chat)",
            "/v1/chat/completions",
            {
                "model": "fake-model",
                "messages": [{"role": "user", "content": "goal"}],
                "icl": {"pool": "capped", "k": 9},
            },
            400,
            "k",
        ),
    ]
    for what, path, body, status, param in cases:
        error = _assert_error(limited.json_request("POST", path, body, what=what), status, what)
        assert error["param"] == param, (what, error)
    # At the caps themselves, the same requests succeed.
    ok = limited.json_request("POST", "/v1/pools/capped/select", {"query": "goal", "k": 8}, what="")
    assert ok.status == 200 and len(ok.json()["demonstrations"]) == 8
    limited.times.pop("")


def test_upload_and_pool_limits(limited: Limited) -> None:
    ndjson = "application/x-ndjson"
    too_many = limited.json_request(
        "POST",
        "/v1/pools/capped/examples",
        _upload(_rows(51, "extra")),
        what="rows over max_rows_per_upload",
        content_type=ndjson,
    )
    error = _assert_error(too_many, 422, "rows per upload")
    assert error["rows"][0]["line"] == 51 and "at most 50 rows" in error["rows"][0]["reason"]

    pool_full = limited.json_request(
        "POST",
        "/v1/pools/capped/examples",
        _upload(_rows(41, "more")),
        what="rows over max_pool_rows",
        content_type=ndjson,
    )
    error = _assert_error(pool_full, 422, "rows per pool")
    assert error["code"] == "pool_too_large"

    long_field = limited.json_request(
        "POST",
        "/v1/pools/capped/examples",
        _upload([{"input": "y" * 201, "output": "z"}]),
        what="field over max_field_chars",
        content_type=ndjson,
    )
    _assert_error(long_field, 422, "field")

    # max_pools = 3: "capped" plus two more, then the fourth is refused.
    for name in ("second", "third"):
        made = limited.json_request("PUT", f"/v1/pools/{name}", {}, what="")
        assert made.status == 200, made.body
    fourth = limited.json_request("PUT", "/v1/pools/fourth", {}, what="pools over max_pools")
    error = _assert_error(fourth, 409, "pools")
    assert error["code"] == "too_many_pools"
    upload_new = limited.json_request(
        "POST",
        "/v1/pools/fifth/examples",
        _upload(_rows(2)),
        what="upload creating a pool over max_pools",
        content_type=ndjson,
    )
    _assert_error(upload_new, 409, "pools by upload")
    limited.times.pop("")

    # Nothing of the refused uploads reached the pool.
    info = raw_request(limited.port, "GET", "/v1/pools/capped", limited.auth()).json()
    assert (info["version"], info["size"]) == (1, 40), info


def test_zz_record_answer_times(limited: Limited, figures: Figures) -> None:
    """One figure for all the refusals above (pytest runs a module's tests in file order)."""
    times = {what: t for what, t in limited.times.items() if what != "setup"}
    assert len(times) >= 12, sorted(times)
    slowest = max(times, key=times.__getitem__)
    median = statistics.median(times.values())
    figures.record(
        "S6",
        f"{len(times)} cap and limit refusals (413, 422, 400, 409) on uvicorn: answer time",
        f"median {median * 1000:.0f} ms, max {times[slowest] * 1000:.0f} ms ({slowest})",
        f"<= {TARGET_S * 1000:.0f} ms (test bound {ANSWER_BOUND_S:.0f} s)",
        median <= TARGET_S and times[slowest] <= ANSWER_BOUND_S,
        test="test_zz_record_answer_times",
    )
    assert times[slowest] <= ANSWER_BOUND_S, times


def test_server_log_has_no_traceback(limited: Limited) -> None:
    log = Path(limited.server.log).read_text(errors="replace")
    assert "Traceback" not in log, log[-4000:]
