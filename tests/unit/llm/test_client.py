"""UpstreamClient against a real fake upstream on loopback (and MockTransport for framing)."""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import pytest
from pydantic import SecretStr

from app.errors import InvalidRequest, RateLimited, UpstreamError, UpstreamTimeout
from app.llm.client import (
    UpstreamClient,
    UpstreamRejected,
    UpstreamRejectedNotFound,
    UpstreamRejectedUnprocessable,
    UpstreamStream,
)
from app.server import quiet_http_client_logs
from app.settings import Upstream
from tests.fakes.upstream import FakeUpstream, answer_chat
from tests.unit.llm.helpers import make_upstream

pytestmark = pytest.mark.anyio

KEY = "sk-canary-0123456789abcdef"

DEMOS = [
    {"role": "system", "content": "Answer with one word."},
    {"role": "user", "content": "What sound does a cat make?"},
    {"role": "assistant", "content": "meow"},
    {"role": "user", "content": "What sound does a dog make?"},
    {"role": "assistant", "content": "woof"},
    {"role": "user", "content": "Tell me: the dog, what sound?"},
]


def chat(model: str = "fake-model", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": DEMOS, **extra}


class Results:
    """Collects on_result calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, float]] = []

    def __call__(self, name: str, outcome: str, seconds: float) -> None:
        self.calls.append((name, outcome, seconds))

    @property
    def outcomes(self) -> list[str]:
        return [outcome for _, outcome, _ in self.calls]


async def collect(stream: UpstreamStream) -> list[bytes]:
    async with stream:
        return [chunk async for chunk in stream]


def error_event(chunk: bytes) -> dict[str, Any]:
    assert chunk.startswith(b"data: ") and chunk.endswith(b"\n\n")
    payload: dict[str, Any] = json.loads(chunk[len(b"data: ") :])
    error: dict[str, Any] = payload["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


# -- routing ------------------------------------------------------------------------------


async def test_route_picks_first_matching_pattern(fake: FakeUpstream) -> None:
    first = make_upstream(fake, name="first", models=["gpt-*", "exact-model"])
    catch_all = make_upstream(fake, name="rest", models=["*"])
    async with UpstreamClient([first, catch_all]) as client:
        assert client.route("gpt-4o").name == "first"
        assert client.route("exact-model").name == "first"
        assert client.route("llama-3").name == "rest"


async def test_route_rejects_unknown_and_missing_models(fake: FakeUpstream) -> None:
    async with UpstreamClient([make_upstream(fake, models=["gpt-*"])]) as client:
        with pytest.raises(InvalidRequest) as info:
            client.route("llama-3")
        assert info.value.code == "model_not_found"
        assert info.value.param == "model"
        assert "llama-3" in info.value.message
        for missing in ("", None, 42):
            with pytest.raises(InvalidRequest) as info:
                client.route(missing)
            assert info.value.param == "model"
        with pytest.raises(InvalidRequest):
            await client.complete("/chat/completions", chat(model="llama-3"))
    assert fake.requests == []


async def test_paths_cannot_leave_the_base_url(fake: FakeUpstream) -> None:
    async with UpstreamClient([make_upstream(fake)]) as client:
        for path in ("//evil.example/v1/chat", "http://evil.example/x", "/../admin", "/a?b=1"):
            with pytest.raises(ValueError):
                await client.complete(path, chat())
    assert fake.requests == []


# -- non-streaming ------------------------------------------------------------------------


async def test_complete_forwards_body_unchanged(fake: FakeUpstream) -> None:
    results = Results()
    body = chat(temperature=0.0, extra_field={"nested": [1, 2]})
    async with UpstreamClient([make_upstream(fake)], on_result=results) as client:
        answer = await client.complete("/chat/completions", body)
    assert answer["choices"][0]["message"]["content"] == "woof" == answer_chat(DEMOS)
    assert answer["object"] == "chat.completion"
    assert answer["usage"]["prompt_tokens"] == sum(len(m["content"].split()) for m in DEMOS)
    (request,) = fake.requests
    assert request.path == "/v1/chat/completions"
    assert request.body == body
    assert "authorization" not in request.headers
    assert results.outcomes == ["ok"]


async def test_text_completion(fake: FakeUpstream) -> None:
    prompt = (
        "Input: red apple\nOutput: fruit\n\n"
        "Input: blue car\nOutput: vehicle\n\n"
        "Input: a red car\nOutput:"
    )
    async with UpstreamClient([make_upstream(fake)]) as client:
        answer = await client.complete("/completions", {"model": "fake-model", "prompt": prompt})
    # "a red car" shares "car" with "blue car" and "red" with "red apple": a tie, later wins.
    assert answer["choices"][0]["text"] == "vehicle"


async def test_authorization_sent_only_when_configured() -> None:
    with FakeUpstream(api_key=KEY) as fake:
        keyed = make_upstream(fake, api_key=SecretStr(KEY))
        async with UpstreamClient([keyed]) as client:
            await client.complete("/chat/completions", chat())
        assert fake.requests[-1].headers["authorization"] == f"Bearer {KEY}"

        # A wrong key: the fake echoes it back; none of that may reach our error.
        wrong = make_upstream(fake, api_key=SecretStr("sk-wrong-key-987654321"))
        async with UpstreamClient([wrong]) as client:
            with pytest.raises(UpstreamError) as info:
                await client.complete("/chat/completions", chat())
        assert info.value.status_code == 502
        assert info.value.message == "upstream authentication failed"
        assert "sk-wrong" not in json.dumps(info.value.body())
        assert len(fake.requests) == 2  # 401 is not retried


@pytest.mark.parametrize("transport", ["lean", "httpx"])
async def test_cookies_an_upstream_sets_are_never_sent_back(
    fake: FakeUpstream, transport: str
) -> None:
    # One connection pool serves every client of the proxy: a cookie set in answer to one
    # request must not travel with the next one, whoever sends it.
    fake.response_headers = [
        ("set-cookie", "session=client-a; Path=/"),
        ("set-cookie", "__cf_bm=abc; Path=/; HttpOnly"),
    ]
    chosen = None if transport == "lean" else httpx.AsyncHTTPTransport()
    async with UpstreamClient([make_upstream(fake)], transport=chosen) as client:
        await client.complete("/chat/completions", chat())
        await client.complete("/chat/completions", chat())
        await collect(await client.open_stream("/chat/completions", chat()))
        await client.list_models()
    assert len(fake.requests) == 4
    assert all("cookie" not in request.headers for request in fake.requests)


@pytest.mark.parametrize(
    "base_url",
    ["http://127.0.0.1:9/v1", "http://127.0.0.1:9/v1/", "https://api.example.com/openai/v1"],
)
@pytest.mark.parametrize("api_key", [None, KEY])
async def test_requests_are_what_httpx_would_build(base_url: str, api_key: str | None) -> None:
    # The oracle: httpx's own build_request, which the client's cached parts stand in for.
    upstream = Upstream(
        name="u", base_url=base_url, models=["*"], api_key=api_key and SecretStr(api_key)
    )
    async with UpstreamClient([upstream]) as client:
        http = client._clients["u"]
        for path in ("/chat/completions", "/completions", "/chat/completions"):
            content = json.dumps({"model": "m", "path": path}).encode()
            got = client._build_request(upstream, http, "POST", path, content)
            want = http.build_request(
                "POST", path, content=content, headers={"Content-Type": "application/json"}
            )
            assert got.url == want.url and got.method == want.method
            assert got.headers.multi_items() == want.headers.multi_items()
            assert got.extensions == want.extensions
            assert got.read() == want.read() == content


async def test_invalid_json_from_upstream(fake: FakeUpstream) -> None:
    fake.set_fault("status", code=200, body="<html>not json</html>")
    async with UpstreamClient([make_upstream(fake)]) as client:
        with pytest.raises(UpstreamError) as info:
            await client.complete("/chat/completions", chat())
    assert "invalid JSON" in info.value.message
    assert "html" not in info.value.message


async def test_nan_in_body_is_a_client_error(fake: FakeUpstream) -> None:
    async with UpstreamClient([make_upstream(fake)]) as client:
        with pytest.raises(InvalidRequest):
            await client.complete("/chat/completions", chat(temperature=float("nan")))
    assert fake.requests == []


# -- upstream rejections ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "error_class"),
    [
        (400, UpstreamRejected),
        (404, UpstreamRejectedNotFound),
        (422, UpstreamRejectedUnprocessable),
    ],
)
async def test_upstream_4xx_is_mapped_and_sanitised(
    fake: FakeUpstream, code: int, error_class: type[UpstreamRejected]
) -> None:
    hostile = f"max_tokens is too large; your key {KEY} was used. " + "x" * 2000
    fake.set_fault("status", code=code, message=hostile)
    upstream = make_upstream(fake, api_key=SecretStr(KEY))
    results = Results()
    async with UpstreamClient([upstream], on_result=results) as client:
        with pytest.raises(error_class) as info:
            await client.complete("/chat/completions", chat())
    error = info.value
    assert type(error) is error_class
    assert error.status_code == code
    assert error.error_type == "invalid_request_error"
    assert error.message.startswith("upstream rejected the request: max_tokens is too large")
    assert KEY not in error.message and "[redacted]" in error.message
    assert len(error.message) < 600
    assert len(fake.requests) == 1  # a 4xx is never retried
    assert results.outcomes == ["rejected"]


async def test_4xx_without_json_message(fake: FakeUpstream) -> None:
    fake.set_fault("status", code=400, body="Bad Request: secret internals")
    async with UpstreamClient([make_upstream(fake)]) as client:
        with pytest.raises(UpstreamRejected) as info:
            await client.complete("/chat/completions", chat())
    assert info.value.message == "upstream rejected the request: HTTP 400"


# -- retries ------------------------------------------------------------------------------


async def test_5xx_is_retried_then_succeeds(fake: FakeUpstream) -> None:
    fake.set_fault("status", code=503, times=2)
    results = Results()
    async with UpstreamClient([make_upstream(fake)], on_result=results) as client:
        answer = await client.complete("/chat/completions", chat())
    assert answer["choices"][0]["message"]["content"] == "woof"
    assert len(fake.requests) == 3
    assert all(r.body == chat() for r in fake.requests)
    assert results.outcomes == ["ok"]


async def test_5xx_after_retries_is_502_without_upstream_text(fake: FakeUpstream) -> None:
    fake.set_fault("status", code=500, message="database password is hunter2")
    results = Results()
    async with UpstreamClient([make_upstream(fake, max_retries=1)], on_result=results) as client:
        with pytest.raises(UpstreamError) as info:
            await client.complete("/chat/completions", chat())
    assert info.value.status_code == 502
    assert info.value.message == "upstream returned HTTP 500"
    assert len(fake.requests) == 2
    assert results.outcomes == ["error"]


@pytest.mark.timeout(30)
async def test_429_retry_after_is_honoured(fake: FakeUpstream) -> None:
    fake.set_fault("status", code=429, retry_after=1, times=1)
    async with UpstreamClient([make_upstream(fake)]) as client:
        await client.complete("/chat/completions", chat())
    first, second = fake.requests
    assert 0.95 <= second.time - first.time < 2.0


@pytest.mark.timeout(30)
async def test_429_after_retries_is_rate_limited_with_retry_after(fake: FakeUpstream) -> None:
    fake.set_fault("status", code=429, retry_after=1)
    results = Results()
    started = time.monotonic()
    async with UpstreamClient([make_upstream(fake)], on_result=results) as client:
        with pytest.raises(RateLimited) as info:
            await client.complete("/chat/completions", chat())
    elapsed = time.monotonic() - started
    assert info.value.status_code == 429
    assert info.value.headers == {"Retry-After": "1"}
    assert len(fake.requests) == 3  # max_retries=2
    assert 1.9 <= elapsed < 4.0
    assert results.outcomes == ["rate_limited"]


async def test_retry_after_beyond_the_cap_fails_at_once(fake: FakeUpstream) -> None:
    fake.set_fault("status", code=429, retry_after=30)
    started = time.monotonic()
    async with UpstreamClient([make_upstream(fake, max_retry_wait=10)]) as client:
        with pytest.raises(RateLimited) as info:
            await client.complete("/chat/completions", chat())
    assert time.monotonic() - started < 1.0
    assert info.value.headers == {"Retry-After": "30"}
    assert len(fake.requests) == 1


async def test_connection_dropped_before_response_is_retried() -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise httpx.RemoteProtocolError("Server disconnected without sending a response.")
        return httpx.Response(200, json={"ok": True})

    upstream = Upstream(name="mock", base_url="http://upstream.test/v1")
    async with UpstreamClient([upstream], transport=httpx.MockTransport(handler)) as client:
        assert await client.complete("/chat/completions", chat()) == {"ok": True}
    assert calls == 2


async def test_reset_before_headers_is_retried(fake: FakeUpstream) -> None:
    fake.set_fault("reset", times=1)  # a real RST from the peer, not a mocked exception
    results = Results()
    async with UpstreamClient([make_upstream(fake)], on_result=results) as client:
        answer = await client.complete("/chat/completions", chat())
        assert answer["choices"][0]["message"]["content"] == "woof"
        fake.set_fault("reset", times=1)
        chunks = await collect(await client.open_stream("/chat/completions", chat()))
        assert chunks[-1] == b"data: [DONE]\n\n"
    assert len(fake.requests) == 4
    assert results.outcomes == ["ok", "ok"]


async def test_reset_on_every_attempt_is_502(fake: FakeUpstream) -> None:
    fake.set_fault("reset")
    results = Results()
    async with UpstreamClient([make_upstream(fake)], on_result=results) as client:
        with pytest.raises(UpstreamError) as info:
            await client.complete("/chat/completions", chat())
    assert info.value.status_code == 502
    assert info.value.message == "upstream closed the connection"
    assert len(fake.requests) == 3  # max_retries=2
    assert results.outcomes == ["error"]


async def test_reset_mid_body_is_not_retried(fake: FakeUpstream) -> None:
    fake.set_fault("reset", chunks=1)
    results = Results()
    async with UpstreamClient([make_upstream(fake)], on_result=results) as client:
        with pytest.raises(UpstreamError) as info:
            await client.complete("/chat/completions", chat())
        assert "broke" in info.value.message
        fake.set_fault("reset", chunks=2)
        chunks = await collect(await client.open_stream("/chat/completions", chat()))
    assert len(fake.requests) == 2
    assert len(chunks) <= 3 and b"[DONE]" not in b"".join(chunks)
    error = error_event(chunks[-1])
    assert error["type"] == "upstream_error"
    assert error["message"] == "upstream connection broke mid-stream"
    assert results.outcomes == ["error", "error"]


async def test_connect_error_is_502() -> None:
    with socket.socket() as sock:  # bound, never listening: connections are refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        upstream = Upstream(
            name="down", base_url=f"http://127.0.0.1:{port}/v1", max_retries=1, max_retry_wait=0.1
        )
        results = Results()
        async with UpstreamClient([upstream], on_result=results) as client:
            with pytest.raises(UpstreamError) as info:
                await client.complete("/chat/completions", chat())
            with pytest.raises(UpstreamError):
                await client.open_stream("/chat/completions", chat())
    assert info.value.message == "could not connect to upstream"
    assert results.outcomes == ["error", "error"]


# -- clocks -------------------------------------------------------------------------------


@pytest.mark.timeout(30)
async def test_stall_before_headers_is_504_within_first_byte_timeout(fake: FakeUpstream) -> None:
    fake.set_fault("stall_before_headers", seconds=20)
    results = Results()
    upstream = make_upstream(fake, first_byte_timeout=0.5)
    async with UpstreamClient([upstream], on_result=results) as client:
        started = time.monotonic()
        with pytest.raises(UpstreamTimeout) as info:
            await client.complete("/chat/completions", chat())
        assert time.monotonic() - started < 0.5 + 1.0
        started = time.monotonic()
        with pytest.raises(UpstreamTimeout):
            await client.open_stream("/chat/completions", chat())
        assert time.monotonic() - started < 0.5 + 1.0
    assert info.value.status_code == 504
    assert len(fake.requests) == 2  # a silent upstream is not retried
    assert results.outcomes == ["timeout", "timeout"]
    assert fake.wait_for_disconnect(1.0)  # and the abandoned request was closed


@pytest.mark.timeout(30)
async def test_stall_after_headers_trips_idle_clock_non_streaming(fake: FakeUpstream) -> None:
    fake.set_fault("stall_after_chunks", chunks=1, seconds=20)
    async with UpstreamClient([make_upstream(fake, idle_timeout=0.5)]) as client:
        started = time.monotonic()
        with pytest.raises(UpstreamTimeout) as info:
            await client.complete("/chat/completions", chat())
    assert time.monotonic() - started < 0.5 + 1.0
    assert "0.5s" in info.value.message


@pytest.mark.timeout(30)
async def test_drip_trips_total_deadline_non_streaming(fake: FakeUpstream) -> None:
    # One byte every 50 ms never trips the 0.5 s idle clock; only the deadline stops it.
    fake.set_fault("drip", interval=0.05)
    upstream = make_upstream(fake, idle_timeout=0.5, total_timeout=1.5)
    async with UpstreamClient([upstream]) as client:
        started = time.monotonic()
        with pytest.raises(UpstreamTimeout) as info:
            await client.complete("/chat/completions", chat())
    assert 1.4 <= time.monotonic() - started < 1.5 + 1.0
    assert "1.5s" in info.value.message


async def test_connection_broken_mid_body_non_streaming(fake: FakeUpstream) -> None:
    fake.set_fault("close_mid_stream", chunks=1)
    async with UpstreamClient([make_upstream(fake)]) as client:
        with pytest.raises(UpstreamError) as info:
            await client.complete("/chat/completions", chat())
    assert len(fake.requests) == 1  # the body had begun: never retried
    assert "broke" in info.value.message


# -- streaming ----------------------------------------------------------------------------


async def test_stream_passes_chunks_through_until_done(fake: FakeUpstream) -> None:
    results = Results()
    async with UpstreamClient([make_upstream(fake)], on_result=results) as client:
        stream = await client.open_stream("/chat/completions", chat(stream=True))
        assert stream.status_code == 200 and stream.upstream == "fake"
        chunks = await collect(stream)
    assert len(chunks) >= 4
    assert all(chunk.startswith(b"data: ") and chunk.endswith(b"\n\n") for chunk in chunks)
    assert chunks[-1] == b"data: [DONE]\n\n"
    events = [json.loads(chunk[6:]) for chunk in chunks[:-1]]
    content = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
    assert content == "woof"
    assert fake.requests[0].body == chat(stream=True)
    assert results.outcomes == ["ok"]


async def test_open_stream_sets_stream_true(fake: FakeUpstream) -> None:
    async with UpstreamClient([make_upstream(fake)]) as client:
        chunks = await collect(
            await client.open_stream("/completions", {"model": "m", "prompt": "x"})
        )
    assert fake.requests[0].body == {"model": "m", "prompt": "x", "stream": True}
    assert chunks[-1] == b"data: [DONE]\n\n"


async def test_stream_error_before_headers_is_raised(fake: FakeUpstream) -> None:
    fake.set_fault("status", code=400, message="bad stream request")
    async with UpstreamClient([make_upstream(fake)]) as client:
        with pytest.raises(UpstreamRejected) as info:
            await client.open_stream("/chat/completions", chat())
    assert info.value.message == "upstream rejected the request: bad stream request"


async def test_stream_5xx_retried_before_headers(fake: FakeUpstream) -> None:
    fake.set_fault("status", code=502, times=1)
    async with UpstreamClient([make_upstream(fake)]) as client:
        chunks = await collect(await client.open_stream("/chat/completions", chat()))
    assert chunks[-1] == b"data: [DONE]\n\n"
    assert len(fake.requests) == 2


@pytest.mark.timeout(30)
async def test_stall_mid_stream_yields_timeout_event(fake: FakeUpstream) -> None:
    fake.set_fault("stall_after_chunks", chunks=2, seconds=20)
    results = Results()
    upstream = make_upstream(fake, idle_timeout=0.5)
    async with UpstreamClient([upstream], on_result=results) as client:
        stream = await client.open_stream("/chat/completions", chat())
        started = time.monotonic()
        chunks = await collect(stream)
    assert time.monotonic() - started < 0.5 + 1.0
    assert len(chunks) == 3 and b"[DONE]" not in b"".join(chunks)
    error = error_event(chunks[-1])
    assert error["type"] == "timeout_error"
    assert "0.5s" in error["message"]
    assert results.outcomes == ["timeout"]
    assert fake.wait_for_disconnect(1.0)


@pytest.mark.timeout(30)
async def test_drip_mid_stream_hits_total_deadline(fake: FakeUpstream) -> None:
    fake.set_fault("drip", interval=0.05)
    upstream = make_upstream(fake, idle_timeout=0.5, total_timeout=1.5)
    async with UpstreamClient([upstream]) as client:
        started = time.monotonic()
        chunks = await collect(await client.open_stream("/chat/completions", chat()))
    elapsed = time.monotonic() - started
    assert 1.4 <= elapsed < 1.5 + 1.0
    error = error_event(chunks[-1])
    assert error["type"] == "timeout_error"
    assert "deadline" in error["message"]


async def test_abrupt_close_mid_stream_yields_error_event(fake: FakeUpstream) -> None:
    fake.set_fault("close_mid_stream", chunks=2)
    results = Results()
    async with UpstreamClient([make_upstream(fake)], on_result=results) as client:
        chunks = await collect(await client.open_stream("/chat/completions", chat()))
    assert len(chunks) == 3
    error = error_event(chunks[-1])
    assert error["type"] == "upstream_error"
    assert results.outcomes == ["error"]
    assert len(fake.requests) == 1


@pytest.mark.timeout(30)
async def test_aclose_cancels_the_upstream_request(fake: FakeUpstream) -> None:
    fake.set_fault("stall_after_chunks", chunks=2, seconds=20)
    results = Results()
    async with UpstreamClient([make_upstream(fake, idle_timeout=10)], on_result=results) as client:
        stream = await client.open_stream("/chat/completions", chat())
        assert (await stream.__anext__()).startswith(b"data: ")
        assert (await stream.__anext__()).startswith(b"data: ")
        closed_at = time.monotonic()
        await stream.aclose()
        await stream.aclose()  # idempotent
        assert fake.wait_for_disconnect(1.0)
        assert fake.disconnects[0].time - closed_at < 1.0
        with pytest.raises(StopAsyncIteration):
            await stream.__anext__()
    assert results.outcomes == ["cancelled"]


@pytest.mark.timeout(30)
async def test_cancelled_consumer_closes_the_upstream_in_finally(fake: FakeUpstream) -> None:
    """What the app does when its client disconnects: its task is cancelled mid-iteration."""
    fake.set_fault("stall_after_chunks", chunks=2, seconds=20)
    results = Results()
    received: list[bytes] = []
    two_chunks = anyio.Event()
    async with UpstreamClient([make_upstream(fake, idle_timeout=10)], on_result=results) as client:
        stream = await client.open_stream("/chat/completions", chat())

        async def consume() -> None:
            try:
                async for chunk in stream:
                    received.append(chunk)
                    if len(received) == 2:
                        two_chunks.set()
            finally:
                await stream.aclose()

        async with anyio.create_task_group() as group:
            group.start_soon(consume)
            await two_chunks.wait()
            group.cancel_scope.cancel()
        assert fake.wait_for_disconnect(1.0)
    assert len(received) == 2
    assert results.outcomes == ["cancelled"]


# -- SSE framing (MockTransport: exact control of the byte chunks) ---------------------------


class ByteStream(httpx.AsyncByteStream):
    def __init__(self, chunks: list[bytes], *, then_hang: bool = False) -> None:
        self.chunks = chunks
        self.then_hang = then_hang

    async def __aiter__(self) -> AsyncIterator[bytes]:
        import asyncio

        for chunk in self.chunks:
            yield chunk
        if self.then_hang:  # a keep-alive upstream that lingers after [DONE]
            await asyncio.sleep(60)


def mock_client(chunks: list[bytes], *, then_hang: bool = False) -> UpstreamClient:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200,
            headers={"content-type": "text/event-stream"},
            stream=ByteStream(chunks, then_hang=then_hang),
        )

    upstream = Upstream(name="mock", base_url="http://upstream.test/v1", idle_timeout=5)
    return UpstreamClient([upstream], transport=httpx.MockTransport(handler))


async def test_chunks_are_cut_at_event_boundaries() -> None:
    raw = [b'data: {"a": 1}\n\ndata: {"b"', b": 2}\n", b"\ndata: [DO", b"NE]\n\n"]
    async with mock_client(raw) as client:
        chunks = await collect(await client.open_stream("/chat/completions", chat()))
    assert chunks == [b'data: {"a": 1}\n\n', b'data: {"b": 2}\n\n', b"data: [DONE]\n\n"]


async def test_stream_ends_at_done_even_if_upstream_lingers() -> None:
    async with mock_client(
        [b"data: {}\r\n\r\n", b"data: [DONE]\r\n\r\n"], then_hang=True
    ) as client:
        started = time.monotonic()
        chunks = await collect(await client.open_stream("/chat/completions", chat()))
    assert time.monotonic() - started < 1.0
    assert chunks == [b"data: {}\r\n\r\n", b"data: [DONE]\r\n\r\n"]


async def test_clean_close_without_done_is_an_error() -> None:
    async with mock_client([b"data: {}\n\n", b'data: {"partial'], then_hang=False) as client:
        chunks = await collect(await client.open_stream("/chat/completions", chat()))
    assert chunks[0] == b"data: {}\n\n"
    assert error_event(chunks[1])["message"] == "upstream ended the stream without [DONE]"
    assert len(chunks) == 2  # the incomplete event is dropped, not glued to ours


async def test_done_without_blank_line_counts_as_done() -> None:
    async with mock_client([b"data: {}\n\n", b"data: [DONE]\n"]) as client:
        chunks = await collect(await client.open_stream("/chat/completions", chat()))
    assert chunks == [b"data: {}\n\n", b"data: [DONE]\n\n"]


# -- models -------------------------------------------------------------------------------


async def test_list_models_merges_and_falls_back() -> None:
    with (
        FakeUpstream(models=["a-1", "shared"], owned_by=None) as alpha_fake,
        FakeUpstream(models=["b-1", "shared", "a-2"], owned_by="vendor") as beta_fake,
    ):
        alpha = make_upstream(alpha_fake, name="alpha", models=["a-*", "shared"])
        beta = make_upstream(beta_fake, name="beta", models=["b-fixed", "*"])
        async with UpstreamClient([alpha, beta]) as client:
            models = await client.list_models()
            assert [(m["id"], m["owned_by"]) for m in models] == [
                ("a-1", "alpha"),
                ("shared", "alpha"),
                ("b-1", "vendor"),
                # "shared" from beta is a duplicate; "a-2" would be routed to alpha.
            ]
            assert all(m["object"] == "model" for m in models)

            beta_fake.set_fault("status", code=500, path="/v1/models")
            alpha_fake.set_fault("stall_before_headers", seconds=0.2)  # slow, still in time
            models = await client.list_models()
            assert [(m["id"], m["owned_by"]) for m in models] == [
                ("a-1", "alpha"),
                ("shared", "alpha"),
                ("b-fixed", "beta"),  # configured, non-wildcard names only
            ]


# -- secrets ------------------------------------------------------------------------------


async def test_key_never_reaches_errors_or_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with FakeUpstream(api_key="sk-other-key-0000000000") as fake:
        upstream = make_upstream(fake, api_key=SecretStr(KEY), max_retries=1, max_retry_wait=0)
        async with UpstreamClient([upstream]) as client:
            with pytest.raises(UpstreamError) as auth_error:
                await client.complete("/chat/completions", chat())  # 401 echoing our key
            fake.set_fault("status", code=400, message=f"key {KEY} over quota")
            with pytest.raises(UpstreamRejected) as rejected:
                await client.complete("/chat/completions", chat())
            fake.set_fault("status", code=503, message=f"key {KEY} overloaded")
            with pytest.raises(UpstreamError) as server_error:
                await client.open_stream("/chat/completions", chat())
    for error in (auth_error.value, rejected.value, server_error.value):
        assert KEY not in json.dumps(error.body())
        assert KEY[:12] not in str(error)
    assert KEY not in caplog.text
    assert caplog.records  # the client did log: name, status, timing


# -- logging ------------------------------------------------------------------------------


async def test_successful_calls_log_at_debug_and_failures_at_info(
    fake: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="iclserve.upstream")
    upstream = make_upstream(fake, max_retries=0)
    async with UpstreamClient([upstream]) as client:
        await client.complete("/chat/completions", chat())
        await collect(await client.open_stream("/chat/completions", chat()))
        fake.set_fault("status", code=503, times=1)
        with pytest.raises(UpstreamError):
            await client.complete("/chat/completions", chat())
    levels = [(r.levelno, r.getMessage().split(" in ")[0]) for r in caplog.records]
    assert levels.count((logging.DEBUG, "upstream fake: HTTP 200")) == 2
    assert (logging.INFO, "upstream fake: HTTP 503") in levels
    assert all(level == logging.INFO for level, text in levels if "503" in text)


def test_server_keeps_httpx_request_lines_out_of_its_logs(
    fake: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    # httpx logs every request with its full URL at INFO; the server's log config drops it.
    loggers = [logging.getLogger(name) for name in ("httpx", "httpcore")]
    before = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.NOTSET)
        quiet_http_client_logs()
        caplog.set_level(logging.INFO)
        assert httpx.get(f"{fake.base_url}/models?key=canary").status_code == 200
        assert not [r for r in caplog.records if r.name.startswith(("httpx", "httpcore"))]
    finally:
        for lg, level in zip(loggers, before, strict=True):
            lg.setLevel(level)
