"""A lean HTTP/1.1 transport for httpx, used for plain-HTTP upstreams.

Every chat completion with `icl` pays the upstream client's own cost on top of the model's.
httpx's default transport (httpcore and the pure-Python h11 parser) takes about 0.7 ms of CPU
per call on a 2-core machine, against about 0.1 ms for the same request written in one piece
and parsed by a C parser. This transport does the latter: HTTP/1.1 over asyncio, responses
parsed by httptools (the parser uvicorn already uses), connections kept alive per host.

Scope: `http://` URLs. The upstream client keeps httpx's own transport for `https://`
upstreams (TLS stays with the library that owns it), and httpx still routes proxied URLs to
its proxy transports, since those are mounted above the default transport. What httpx does
above the transport (default headers, gzip/deflate decoding, the `Response`) is unchanged.

Errors are httpx's, so callers handle this transport as they handle the default one:
`ConnectError`/`ConnectTimeout` while connecting, `WriteError`/`WriteTimeout` while
sending, `ReadError`/`ReadTimeout`/`RemoteProtocolError` while receiving, and
`LocalProtocolError` for a request that cannot be written (a header with CR or LF).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import deque
from collections.abc import AsyncIterator
from typing import cast

import httptools
import httpx

__all__ = ["CookielessAsyncClient", "CookielessClient", "FastHTTPTransport"]

# The upstream client's logger. Debug lines name the host and port only: never a header,
# a body or a key.
logger = logging.getLogger("iclserve.upstream")

_HIGH_WATER = 256 * 1024
"""Unread response bytes at which the socket stops being read (resumed at a quarter)."""

_MAX_IDLE_PER_HOST = 32


class _NoCookies(httpx.Cookies):
    """Always empty: a `Set-Cookie` is not even parsed, and no `Cookie` header is added."""

    def extract_cookies(self, response: httpx.Response) -> None:
        pass

    def set_cookie_header(self, request: httpx.Request) -> None:
        pass

    def set(self, name: str, value: str, domain: str = "", path: str = "/") -> None:
        raise TypeError("this client keeps no cookies")


class _WithoutCookies:
    """Mixed into an httpx client ahead of it: its `cookies` is always empty."""

    _no_cookies = _NoCookies()

    @property
    def cookies(self) -> httpx.Cookies:
        return self._no_cookies

    @cookies.setter
    def cookies(self, cookies: object) -> None:
        raise TypeError("this client keeps no cookies")


class CookielessAsyncClient(_WithoutCookies, httpx.AsyncClient):
    """An `httpx.AsyncClient` that neither keeps nor sends cookies.

    One client serves every request of the server: a cookie that an upstream sets in answer
    to one request must not travel with the next, whoever sends it. httpx's own jar also
    copied each response's request and headers into urllib objects to look for cookies:
    about 0.2 ms per call on an idle 2-core server.
    """


class CookielessClient(_WithoutCookies, httpx.Client):
    """The synchronous `CookielessAsyncClient` (for the embeddings service)."""


class _Connection(asyncio.Protocol):
    """One TCP connection: writes requests, parses one response at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._writable: asyncio.Future[None] | None = None
        self.lost = False
        self._reset()

    def _reset(self) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.headers_done = False
        self.complete = False
        self.keep_alive = False
        self.error: httpx.TransportError | None = None
        self._framed = False
        self._interim = False
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._reading_paused = False

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # Requests go out in one write; Nagle would hold a small one back for an ACK.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(httpx.RemoteProtocolError("upstream switched protocols"))
        except httptools.HttpParserError as exc:
            self._fail(httpx.RemoteProtocolError(f"invalid HTTP response from upstream ({exc})"))
        if self._buffered > _HIGH_WATER and not self._reading_paused and not self.lost:
            self._reading_paused = True
            assert self._transport is not None
            self._transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        return False  # close our side too; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.error is None and not self.complete:
            if self.headers_done and not self._framed and exc is None:
                self.complete = True  # a body delimited by the end of the connection
            elif exc is not None:
                self.error = httpx.ReadError(str(exc) or type(exc).__name__)
            elif self.headers_done:
                self.error = httpx.RemoteProtocolError(
                    "upstream closed the connection before the response was complete"
                )
            else:
                self.error = httpx.RemoteProtocolError(
                    "upstream closed the connection without sending a response"
                )
        self._wake()
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    def pause_writing(self) -> None:
        self._writable = self._loop.create_future()

    def resume_writing(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        self._writable = None

    # httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200:
            # An interim response (100 Continue, 103 Early Hints): the real one follows.
            self._interim = True
            self.headers = []
            return
        self.status = status
        self.headers_done = True
        for name, value in self.headers:
            lowered = name.lower()
            if lowered == b"content-length" or (
                lowered == b"transfer-encoding" and b"chunked" in value.lower()
            ):
                self._framed = True

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        self.complete = True
        # Read now: once this callback returns the parser has reset for the next message.
        self.keep_alive = self._parser.should_keep_alive()

    # use

    def _fail(self, error: httpx.TransportError) -> None:
        if self.error is None:
            self.error = error
        self.close()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _wait(self, timeout: float | None) -> None:
        self._waiter = self._loop.create_future()
        try:
            async with asyncio.timeout(timeout):
                await self._waiter
        except TimeoutError as exc:
            raise httpx.ReadTimeout("timed out waiting for the upstream") from exc
        finally:
            self._waiter = None

    @property
    def reusable(self) -> bool:
        return (
            not self.lost
            and self.complete
            and not self._chunks
            and self._transport is not None
            and not self._transport.is_closing()
            and self.keep_alive
        )

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    async def send(self, data: bytes, timeout: float | None) -> None:
        self._reset()
        assert self._transport is not None
        if self.lost or self._transport.is_closing():
            raise httpx.WriteError("the connection to the upstream is closed")
        self._transport.write(data)
        if self._writable is not None:
            try:
                async with asyncio.timeout(timeout):
                    await self._writable
            except TimeoutError as exc:
                raise httpx.WriteTimeout("timed out sending the request upstream") from exc

    async def read_headers(self, timeout: float | None) -> None:
        while not self.headers_done:
            if self.error is not None:
                raise self.error
            await self._wait(timeout)

    async def body(self, timeout: float | None) -> AsyncIterator[bytes]:
        while True:
            while self._chunks:
                chunk = self._chunks.popleft()
                self._buffered -= len(chunk)
                if self._reading_paused and self._buffered <= _HIGH_WATER // 4:
                    self._reading_paused = False
                    if self._transport is not None and not self.lost:
                        self._transport.resume_reading()
                yield chunk
            if self.error is not None:
                raise self.error
            if self.complete:
                return
            await self._wait(timeout)


class _ResponseStream(httpx.AsyncByteStream):
    def __init__(
        self,
        pool: FastHTTPTransport,
        key: tuple[str, int],
        conn: _Connection,
        timeout: float | None,
    ) -> None:
        self._pool = pool
        self._key = key
        self._conn: _Connection | None = conn
        self._timeout = timeout

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if self._conn is None:
            raise httpx.StreamClosed()
        async for chunk in self._conn.body(self._timeout):
            yield chunk

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not self._pool._release(self._key, conn):
            # asyncio closes the socket on the loop's next turn: take that turn, so that
            # the upstream sees the connection end (and stops working) when this returns.
            await asyncio.sleep(0)


class FastHTTPTransport(httpx.AsyncBaseTransport):
    """HTTP/1.1 for `http://` URLs, with keep-alive connections per (host, port).

    Honours the request's `timeout` extension (connect, read between bytes, write). At most
    `max_idle_per_host` idle connections are kept per host; a connection is reused only
    after its previous response was read to the end, newest first. Unlimited concurrent
    connections: the caller bounds its own concurrency.
    """

    def __init__(self, *, max_idle_per_host: int = _MAX_IDLE_PER_HOST) -> None:
        if max_idle_per_host < 0:
            raise ValueError("max_idle_per_host must be >= 0")
        self._max_idle = max_idle_per_host
        self._idle: dict[tuple[str, int], list[_Connection]] = {}
        self._closed = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        if url.scheme != "http":
            raise httpx.UnsupportedProtocol(f"FastHTTPTransport serves http:// only, not {url}")
        if self._closed:
            raise httpx.ConnectError("the transport is closed")
        timeouts = request.extensions.get("timeout") or {}
        key = (url.host, url.port or 80)
        head = _request_head(request)
        body = await request.aread()
        conn = self._checkout(key) or await self._connect(key, timeouts.get("connect"))
        try:
            await conn.send(head + body, timeouts.get("write"))
            await conn.read_headers(timeouts.get("read"))
        except BaseException:
            conn.close()
            raise
        return httpx.Response(
            conn.status,
            headers=conn.headers,
            stream=_ResponseStream(self, key, conn, timeouts.get("read")),
            extensions={"http_version": b"HTTP/1.1"},
        )

    async def aclose(self) -> None:
        self._closed = True
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()

    def _checkout(self, key: tuple[str, int]) -> _Connection | None:
        conns = self._idle.get(key)
        while conns:
            conn = conns.pop()
            if conn.reusable:
                return conn
            conn.close()
        return None

    async def _connect(self, key: tuple[str, int], timeout: float | None) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                _, conn = await loop.create_connection(lambda: _Connection(loop), *key)
        except TimeoutError as exc:
            raise httpx.ConnectTimeout(f"connecting to {key[0]}:{key[1]} timed out") from exc
        except OSError as exc:
            raise httpx.ConnectError(str(exc) or type(exc).__name__) from exc
        logger.debug("opened a connection to %s:%d", *key)
        return conn

    def _release(self, key: tuple[str, int], conn: _Connection) -> bool:
        """Keep `conn` for reuse if it can be (True), else close it (False)."""
        conns = self._idle.setdefault(key, [])
        if not self._closed and conn.reusable and len(conns) < self._max_idle:
            conns.append(conn)
            return True
        conn.close()
        logger.debug("closed a connection to %s:%d (not reusable)", *key)
        return False


def _request_head(request: httpx.Request) -> bytes:
    target = request.url.raw_path or b"/"
    lines = [request.method.encode("ascii") + b" " + target + b" HTTP/1.1"]
    for name, value in request.headers.raw:
        if b"\r" in name or b"\n" in name or b"\r" in value or b"\n" in value:
            raise httpx.LocalProtocolError("a request header contains CR or LF")
        lines.append(name + b": " + value)
    lines.append(b"\r\n")
    return b"\r\n".join(lines)
