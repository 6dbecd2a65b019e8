"""FastHTTPTransport against real loopback servers, on asyncio and on uvloop.

The reference is httpx's own transport: for the same requests to the fake upstream, both give
the same status, body and headers. Raw scripted servers cover what the fake cannot do: every
way of framing a body, connection reuse and loss, broken and stalled responses.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager

import httpx
import pytest

from app.llm.transport import FastHTTPTransport
from tests.fakes.upstream import FakeUpstream

pytestmark = pytest.mark.anyio


@pytest.fixture(
    params=[
        pytest.param(("asyncio", {"use_uvloop": False}), id="asyncio"),
        pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, bool]]:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeUpstream]:
    with FakeUpstream(models=["m"]) as upstream:
        yield upstream


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawServer:
    """A loopback server that runs `handler` on every connection and counts connections."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.url = ""

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


@asynccontextmanager
async def raw_server(handler: Handler) -> AsyncIterator[RawServer]:
    server = RawServer(handler)
    listener = await asyncio.start_server(server._serve, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    server.url = f"http://127.0.0.1:{port}"
    try:
        yield server
    finally:
        listener.close()


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, dict[bytes, bytes], bytes]:
    """(request line, headers lower-cased, body by Content-Length)."""
    head = await reader.readuntil(b"\r\n\r\n")
    line, *header_lines = head[:-4].split(b"\r\n")
    headers = {}
    for raw in header_lines:
        name, _, value = raw.partition(b":")
        headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get(b"content-length", b"0")))
    return line, headers, body


def answering(*responses: bytes, then_close: bool = False) -> Handler:
    """Answer each request on a connection with the next response of `responses`."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for response in responses:
            await read_request(reader)
            writer.write(response)
            await writer.drain()
        if not then_close:
            await reader.read()  # keep the connection until the client closes it

    return handler


def without_ids(body: bytes) -> bytes:
    """The fake numbers its completions; everything else in its answers is deterministic."""
    return re.sub(rb'"(id|created)": ("[^"]*"|\d+)', b"", body)


def client(url: str, **kwargs: object) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=url, transport=FastHTTPTransport(), **kwargs)  # type: ignore[arg-type]


OK_JSON = (
    b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{"a": true}'
)


async def test_same_answers_as_httpx_own_transport(fake: FakeUpstream) -> None:
    chat = {"model": "m", "messages": [{"role": "user", "content": "hello there"}]}
    calls = [
        ("POST", "/chat/completions", chat),
        ("POST", "/chat/completions", {**chat, "stream": True}),
        ("POST", "/completions", {"model": "m", "prompt": "Input: a\nOutput:"}),
        ("GET", "/models", None),
        ("POST", "/embeddings", {"model": "m", "input": ["a b", "c"]}),
    ]
    skip = {"date", "server"}
    async with client(fake.base_url) as fast, httpx.AsyncClient(base_url=fake.base_url) as ref:
        for method, path, body in calls:
            got = await fast.request(method, path, json=body)
            want = await ref.request(method, path, json=body)
            assert got.status_code == want.status_code == 200
            assert without_ids(got.content) == without_ids(want.content)
            assert {k: v for k, v in got.headers.items() if k not in skip} == {
                k: v for k, v in want.headers.items() if k not in skip
            }
    # The request the upstream saw is the one httpx built: same body and headers.
    fast_seen, ref_seen = fake.requests[-2], fake.requests[-1]
    assert fast_seen.body == ref_seen.body


async def test_keeps_the_connection_alive() -> None:
    async with raw_server(answering(*[OK_JSON] * 5)) as server, client(server.url) as http:
        for _ in range(5):
            response = await http.post("/x", content=b"{}")
            assert response.json() == {"a": True}
    assert server.connections == 1


async def test_concurrent_requests_use_separate_connections() -> None:
    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while not reader.at_eof():
            await read_request(reader)
            await asyncio.sleep(0.1)
            writer.write(OK_JSON)
            await writer.drain()

    async with raw_server(slow) as server, client(server.url) as http:
        responses = await asyncio.gather(*(http.post("/x", content=b"{}") for _ in range(4)))
        assert [r.status_code for r in responses] == [200] * 4
        # All four are idle now, and the next four calls reuse them.
        responses = await asyncio.gather(*(http.post("/x", content=b"{}") for _ in range(4)))
        assert [r.status_code for r in responses] == [200] * 4
    assert server.connections == 4


@pytest.mark.parametrize(
    "response, body",
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", b"hello"),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nhel\r\n2\r\nlo\r\n0\r\n\r\n",
            b"hello",
        ),
        (b"HTTP/1.1 204 No Content\r\n\r\n", b""),
        (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", b"ok"),
    ],
    ids=["content-length", "chunked", "no-body", "interim-response"],
)
async def test_framed_bodies_keep_the_connection(response: bytes, body: bytes) -> None:
    async with raw_server(answering(response, response)) as server, client(server.url) as http:
        for _ in range(2):
            assert (await http.post("/x", content=b"{}")).content == body
    assert server.connections == 1


async def test_body_delimited_by_close() -> None:
    response = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end"
    async with raw_server(answering(response, then_close=True)) as server:
        async with client(server.url) as http:
            assert (await http.post("/x", content=b"{}")).content == b"until the end"
            assert (await http.post("/x", content=b"{}")).content == b"until the end"
    assert server.connections == 2


async def test_gzip_is_decoded_by_httpx() -> None:
    packed = gzip.compress(b'{"zipped": 1}')
    response = (
        b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: "
        + str(len(packed)).encode()
        + b"\r\n\r\n"
        + packed
    )
    async with raw_server(answering(response)) as server, client(server.url) as http:
        assert (await http.post("/x", content=b"{}")).json() == {"zipped": 1}


async def test_large_body_arrives_whole() -> None:
    payload = bytes(range(256)) * 8192  # 2 MiB, past the read pause threshold
    response = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(payload) + payload
    async with raw_server(answering(response)) as server, client(server.url) as http:
        async with http.stream("POST", "/x", content=b"{}") as streamed:
            parts = [part async for part in streamed.aiter_raw()]
            await asyncio.sleep(0.05)  # let the socket fill while nothing is read
    assert b"".join(parts) == payload


async def test_sends_the_request_as_built() -> None:
    seen: list[tuple[bytes, dict[bytes, bytes], bytes]] = []

    async def recording(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await read_request(reader))
        writer.write(OK_JSON)
        await writer.drain()
        await reader.read()

    async with raw_server(recording) as server:
        async with client(server.url, headers={"Authorization": "Bearer k"}) as http:
            await http.post("/v1/chat?x=1", json={"q": "é"})
    line, headers, body = seen[0]
    assert line == b"POST /v1/chat?x=1 HTTP/1.1"
    assert headers[b"host"] == server.url.removeprefix("http://").encode()
    assert headers[b"authorization"] == b"Bearer k"
    assert headers[b"content-type"] == b"application/json"
    assert json.loads(body) == {"q": "é"}


async def test_idle_connection_closed_by_the_server_is_not_reused() -> None:
    async def one_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(OK_JSON)
        await writer.drain()

    async with raw_server(one_then_close) as server, client(server.url) as http:
        assert (await http.post("/x", content=b"{}")).status_code == 200
        await asyncio.sleep(0.05)  # the server's FIN arrives while the connection is idle
        assert (await http.post("/x", content=b"{}")).status_code == 200
    assert server.connections == 2


async def test_no_response_is_a_remote_protocol_error() -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)

    async with raw_server(hang_up) as server, client(server.url) as http:
        with pytest.raises(httpx.RemoteProtocolError, match="without sending a response"):
            await http.post("/x", content=b"{}")


async def test_truncated_body_is_a_remote_protocol_error() -> None:
    response = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part"
    async with raw_server(answering(response, then_close=True)) as server:
        async with client(server.url) as http:
            with pytest.raises(httpx.RemoteProtocolError, match="before the response was complete"):
                await http.post("/x", content=b"{}")


async def test_garbage_is_a_remote_protocol_error() -> None:
    async with raw_server(answering(b"SMTP ready\r\n\r\n")) as server, client(server.url) as http:
        with pytest.raises(httpx.RemoteProtocolError, match="invalid HTTP response"):
            await http.post("/x", content=b"{}")


async def test_connection_refused_is_a_connect_error() -> None:
    async with raw_server(answering()) as server:
        url = server.url
    async with client(url) as http:
        with pytest.raises(httpx.ConnectError):
            await http.post("/x", content=b"{}")


async def test_silence_is_a_read_timeout() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await reader.read()

    async with raw_server(silent) as server, client(server.url, timeout=0.2) as http:
        with pytest.raises(httpx.ReadTimeout):
            await http.post("/x", content=b"{}")


async def test_closing_a_stream_early_closes_the_connection() -> None:
    ended = asyncio.Event()

    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        try:
            for _ in range(1000):
                writer.write(b"5\r\nchunk\r\n")
                await writer.drain()
                await asyncio.sleep(0.01)
        finally:
            ended.set()

    async with raw_server(endless) as server, client(server.url) as http:
        for _ in range(2):
            async with http.stream("POST", "/x", content=b"{}") as streamed:
                async for _ in streamed.aiter_raw():
                    break
            # The server's writes fail once the connection is gone.
            await asyncio.wait_for(ended.wait(), 5)
            ended.clear()
    # The abandoned connection was not reused: the second call opened a new one.
    assert server.connections == 2


async def test_header_with_a_line_break_is_refused() -> None:
    async with raw_server(answering(OK_JSON)) as server, client(server.url) as http:
        request = http.build_request(
            "POST", "/x", content=b"{}", headers={"x-injected": "a\r\nX-Evil: 1"}
        )
        with pytest.raises(httpx.LocalProtocolError):
            await http.send(request)
    assert server.connections == 0


async def test_https_is_left_to_httpx() -> None:
    transport = FastHTTPTransport()
    with pytest.raises(httpx.UnsupportedProtocol):
        await transport.handle_async_request(httpx.Request("GET", "https://127.0.0.1:1/"))


async def test_logs_connections_at_debug_without_headers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="iclserve.upstream")
    async with raw_server(answering(OK_JSON)) as server:
        async with client(server.url, headers={"Authorization": "Bearer secret-key"}) as http:
            await http.post("/x", content=b"{}")
    host = server.url.removeprefix("http://")
    assert f"opened a connection to {host}" in caplog.text
    assert "secret-key" not in caplog.text
