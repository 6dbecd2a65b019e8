"""The one way out to the upstream LLMs: routing, clocks, retries and error mapping.

Only this module, its transport for plain-HTTP upstreams (`app/llm/transport.py`) and
`app/llm/embeddings.py` import httpx. Everything that leaves here is
either the upstream's answer (a parsed JSON body, or raw SSE bytes) or one of our own errors
from `app.errors`: never an upstream body, header or key.

Clocks of one call (all per upstream, from `Upstream` in the settings):

* `connect_timeout`: opening the TCP/TLS connection (httpx's connect timeout);
* `first_byte_timeout`: from sending the request to the response headers (asyncio clock around
  `send`, because httpx's read timeout restarts on every byte and a header drip would dodge it);
* `idle_timeout`: the longest silence between two body chunks (asyncio clock per chunk);
* `total_timeout`: the whole call, retries and waits included (an absolute deadline).

Retries (`max_retries`, waits summed under `max_retry_wait`) happen only before a response is
handed out: on connect errors, connections dropped (or reset) before the headers, 429 and 5xx.
A body that has started to flow is never retried.

Each upstream has a circuit breaker (`app.llm.breaker`, unless `breaker_enabled` is off): one
call, retries included, is one outcome. Timeouts, connect errors, dropped connections, broken
or unreadable bodies and 5xx are failures; any other answer from the upstream (2xx, 4xx, 429)
is a success, since it shows the upstream is up; a call our caller abandoned is neutral. While
the breaker is open, calls fail at once with `CircuitOpen` (503, `Retry-After`).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import logging
import math
import random
import re
import time
from collections.abc import AsyncGenerator, Callable, Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, ClassVar, Final, cast

import anyio
import httpx

from app.errors import (
    ICLServeError,
    InvalidRequest,
    RateLimited,
    UpstreamError,
    UpstreamTimeout,
)
from app.llm.breaker import CircuitBreaker, Clock, Health, Permit
from app.llm.transport import CookielessAsyncClient, FastHTTPTransport
from app.settings import Upstream

__all__ = [
    "ResultHook",
    "UpstreamClient",
    "UpstreamRejected",
    "UpstreamRejectedNotFound",
    "UpstreamRejectedUnprocessable",
    "UpstreamStream",
]

logger = logging.getLogger("iclserve.upstream")

ResultHook = Callable[[str, str, float], None]
"""`on_result(upstream_name, outcome, seconds)`; outcome is one of `OUTCOMES`."""

OUTCOMES: Final = ("ok", "timeout", "error", "rate_limited", "rejected", "cancelled")

# Paths are ours (the routes pass literals), but a path like "//host/x" would make httpx
# leave the configured base URL, so anything but a plain relative path is refused.
_PATH_RE: Final = re.compile(r"^/[a-z0-9_\-]+(/[a-z0-9_\-]+)*$")
_MAX_BODY_BYTES: Final = 32 * 1024 * 1024
_MAX_ERROR_BODY_BYTES: Final = 64 * 1024
_MAX_MESSAGE_CHARS: Final = 500
_MAX_SSE_HOLD_BYTES: Final = 1024 * 1024
_MODELS_TIMEOUT: Final = 5.0
_CLOSE_TIMEOUT: Final = 5.0
_BACKOFF_BASE: Final = 0.25
_BACKOFF_MAX: Final = 4.0
_DEFAULT_RETRY_AFTER: Final = 1

_SSE_EVENT_ENDS: Final = (b"\r\n\r\n", b"\n\n", b"\r\r")
_SSE_DONE = re.compile(rb"(?:^|[\r\n])data: ?\[DONE\][ \t]*(?:\r\n|\n|\r|$)")


class UpstreamRejected(InvalidRequest):
    """The upstream refused the request as malformed (its HTTP 400).

    The message is the upstream error's `message` field only, truncated and with the
    upstream key redacted, prefixed "upstream rejected the request: ".
    """


class UpstreamRejectedNotFound(UpstreamRejected):
    """The upstream answered 404 (typically: it does not serve the requested model)."""

    status_code: ClassVar[int] = 404


class UpstreamRejectedUnprocessable(UpstreamRejected):
    """The upstream answered 422 (a body it could parse but not accept)."""

    status_code: ClassVar[int] = 422


class _Call:
    """What one call learnt along the way, for the breaker's verdict."""

    __slots__ = ("status",)

    def __init__(self) -> None:
        self.status: int | None = None  # of the latest attempt's response, if it got one


def _health(outcome: str, status: int | None) -> Health:
    if outcome == "cancelled":
        return Health.NEUTRAL
    if outcome in ("ok", "rate_limited", "rejected") or (
        status is not None and 300 <= status < 500
    ):
        # Any answer below 500 (a refusal, a redirect, 401, 429) shows the upstream is up.
        return Health.SUCCESS
    return Health.FAILURE


class _Retryable(Exception):
    """Internal: a failure before any response, worth another attempt."""

    def __init__(self, error: ICLServeError, retry_after: float | None = None) -> None:
        super().__init__(error.message)
        self.error = error
        self.retry_after = retry_after


def _check_path(path: str) -> None:
    if not _PATH_RE.match(path):
        raise ValueError(f"not an upstream API path: {path!r}")


_JSON_CONTENT_TYPE: Final = (b"Content-Type", b"application/json")


@dataclass(frozen=True, slots=True)
class _RequestParts:
    url: httpx.URL
    headers: httpx.Headers
    extensions: dict[str, Any]


def _encode(body: dict[str, Any]) -> bytes:
    try:
        # allow_nan=False: json.loads accepts NaN from clients, but it is not JSON.
        text = json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidRequest("request body cannot be encoded as JSON (NaN or Infinity?)") from exc
    return text.encode("utf-8")


def _parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    if seconds != seconds or seconds < 0:  # NaN or in the past
        return 0.0
    return seconds


def _last_event_end(data: bytes) -> int:
    """Offset just past the last complete SSE event in `data` (0 if none)."""
    best = 0
    for sep in _SSE_EVENT_ENDS:
        pos = data.rfind(sep)
        if pos >= 0:
            best = max(best, pos + len(sep))
    return best


def _backoff(attempt: int) -> float:
    base: float = min(_BACKOFF_BASE * 2.0**attempt, _BACKOFF_MAX)
    # Jitter spreads retries of concurrent requests so they do not hit the upstream together.
    return base * (1.0 + random.uniform(0.0, 0.2))


class UpstreamStream:
    """A streamed upstream response: an async iterator of raw SSE bytes.

    Chunks are the upstream's bytes, unchanged, cut at SSE event boundaries (an incomplete
    trailing event is held back until its end arrives), so an error event we add can never be
    glued to half an upstream event. Iteration enforces the idle clock between chunks and the
    call's total deadline.

    The stream ends in exactly one of two ways: after the upstream's `data: [DONE]` event, or
    after one SSE error event of ours, `data: {"error": {...}}`, sent when the upstream times
    out, breaks, or closes without `[DONE]`. It never ends silently as if complete.

    The caller must call `aclose()` (or use `async with`) when done or when its own client
    disconnects: that closes the upstream connection, which cancels the upstream generation.
    `aclose()` is idempotent. Iterate from one task at a time.
    """

    def __init__(
        self,
        *,
        client: UpstreamClient,
        upstream: Upstream,
        response: httpx.Response,
        deadline: float,
        started: float,
        permit: Permit | None = None,
    ) -> None:
        self._client = client
        self._upstream = upstream
        self._permit = permit
        self._response = response
        self._deadline = deadline
        self._started = started
        # aiter_bytes is an async generator (typed as an iterator); closing it explicitly
        # releases the response at once instead of at garbage collection.
        self._chunks = cast(AsyncGenerator[bytes, None], response.aiter_bytes())
        self._held = b""
        self._pending: list[bytes] = []
        self._finished = False
        self._closed = False

    @property
    def upstream(self) -> str:
        """The name of the upstream serving this stream."""
        return self._upstream.name

    @property
    def status_code(self) -> int:
        return self._response.status_code

    def __aiter__(self) -> UpstreamStream:
        return self

    async def __aenter__(self) -> UpstreamStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def __anext__(self) -> bytes:
        while not self._pending:
            if self._finished:
                await self._close_response()
                raise StopAsyncIteration
            await self._pull()
            if self._finished:
                # Release the upstream connection now, not when the caller gets round to
                # asking for the chunk after the last one.
                await self._close_response()
        return self._pending.pop(0)

    async def aclose(self) -> None:
        """Close the upstream response; if it was still running, this cancels it.

        Shielded, so it also works from a `finally` in a task that is being cancelled
        (Starlette cancels the response task when its client disconnects).
        """
        if not self._finished:
            self._finish("cancelled", None)
        self._pending.clear()
        with anyio.CancelScope(shield=True), anyio.move_on_after(_CLOSE_TIMEOUT):
            await self._close_response()

    async def _pull(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        if now >= self._deadline:
            self._fail_timeout(f"exceeded its {self._upstream.total_timeout:g}s deadline")
            return
        idle_ends = now + self._upstream.idle_timeout
        try:
            async with asyncio.timeout_at(min(idle_ends, self._deadline)):
                chunk = await self._chunks.__anext__()
        except StopAsyncIteration:
            self._end_of_upstream()
            return
        except TimeoutError:
            if idle_ends <= self._deadline:
                self._fail_timeout(f"sent nothing for {self._upstream.idle_timeout:g}s")
            else:
                self._fail_timeout(f"exceeded its {self._upstream.total_timeout:g}s deadline")
            return
        except httpx.TimeoutException:
            self._fail_timeout("timed out mid-stream")
            return
        except httpx.HTTPError as exc:
            # ReadError, RemoteProtocolError (peer closed mid-body), DecodingError, ...
            self._fail("upstream_error", "upstream connection broke mid-stream", exc)
            return
        self._accept(chunk)

    def _accept(self, chunk: bytes) -> None:
        data = self._held + chunk
        end = _last_event_end(data)
        if end == 0:
            if len(data) > _MAX_SSE_HOLD_BYTES:
                # An event this long is not SSE we can frame; pass it on rather than buffer
                # without bound.
                self._pending.append(data)
                self._held = b""
            else:
                self._held = data
            return
        complete, self._held = data[:end], data[end:]
        self._pending.append(complete)
        if _SSE_DONE.search(complete):
            # [DONE] is the last event; stop here rather than wait for the upstream to close
            # (a keep-alive upstream may linger and would trip the idle clock after the end).
            self._held = b""
            self._finish("ok", None)

    def _end_of_upstream(self) -> None:
        held = self._held
        self._held = b""
        if held and _SSE_DONE.search(held):
            # `data: [DONE]` without its blank line: complete, just badly terminated.
            self._pending.append(held.rstrip(b"\r\n") + b"\n\n")
            self._finish("ok", None)
            return
        # A trailing incomplete event is dropped: it cannot be parsed by the client anyway.
        self._fail("upstream_error", "upstream ended the stream without [DONE]", None)

    def _fail_timeout(self, what: str) -> None:
        self._fail("timeout_error", f"upstream {what}", None)

    def _fail(self, error_type: str, message: str, exc: BaseException | None) -> None:
        error = {"error": {"message": message, "type": error_type, "param": None, "code": None}}
        self._pending.append(b"data: " + json.dumps(error).encode() + b"\n\n")
        outcome = "timeout" if error_type == "timeout_error" else "error"
        self._finish(outcome, type(exc).__name__ if exc is not None else message)

    def _finish(self, outcome: str, detail: str | None) -> None:
        self._finished = True
        seconds = time.monotonic() - self._started
        self._client._report(
            self._upstream, outcome, seconds, self.status_code, detail, permit=self._permit
        )

    async def _close_response(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self._chunks.aclose()
        finally:
            await self._response.aclose()


class UpstreamClient:
    """Forwards OpenAI-compatible calls to the configured upstreams.

    One `httpx.AsyncClient` per upstream, with its base URL and key from configuration only,
    no redirects followed and no SDK retries (this class holds the only retry loop). A
    request reaches an upstream only through `route(model)`.

    Errors raised (all from `app.errors`, all with messages of our own):

    * `InvalidRequest` 400: no or unknown model (`code="model_not_found"`), unencodable body;
    * `UpstreamRejected` 400 / `UpstreamRejectedNotFound` 404 /
      `UpstreamRejectedUnprocessable` 422: the upstream refused the request; the message
      carries only the upstream error's `message`, truncated and with the key redacted;
    * `RateLimited` 429 with a `Retry-After` header: the upstream still said 429 after retries;
    * `UpstreamError` 502: connect errors, dropped connections, 5xx, 401/403 from the
      upstream (our key is wrong, not the client's), redirects, invalid JSON;
    * `UpstreamTimeout` 504: any of the clocks ran out;
    * `CircuitOpen` 503 with a `Retry-After` header, code "upstream_unavailable": the
      upstream's breaker is open; the upstream was not contacted.

    `clock` (monotonic seconds) drives the breakers, so tests can move time by hand.

    `on_result(upstream_name, outcome, seconds)` is called once per call with an outcome in
    `OUTCOMES` ("ok", "timeout", "error", "rate_limited", "rejected", "cancelled"); for a
    stream, when it ends ("cancelled": the caller closed it before the end). A failing hook
    is logged and ignored.
    """

    def __init__(
        self,
        upstreams: Sequence[Upstream],
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        on_result: ResultHook | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        self._upstreams = list(upstreams)
        self._on_result = on_result
        self._clients = {u.name: self._make_client(u, transport) for u in self._upstreams}
        self._request_parts: dict[tuple[str, str], _RequestParts] = {}
        self._breakers = {
            u.name: self._make_breaker(u, clock) for u in self._upstreams if u.breaker_enabled
        }

    @staticmethod
    def _make_client(
        upstream: Upstream, transport: httpx.AsyncBaseTransport | None
    ) -> httpx.AsyncClient:
        headers = {"User-Agent": "iclserve"}
        key = upstream.api_key.get_secret_value() if upstream.api_key is not None else ""
        if key:
            headers["Authorization"] = f"Bearer {key}"
        # Only connect is left to httpx; the other clocks are asyncio clocks in this module.
        # httpx's read/write/pool timeouts stay as a backstop at the total deadline.
        timeout = httpx.Timeout(upstream.total_timeout, connect=upstream.connect_timeout)
        if transport is None and httpx.URL(upstream.base_url).scheme == "http":
            transport = FastHTTPTransport()
        return CookielessAsyncClient(
            base_url=upstream.base_url,
            headers=headers,
            timeout=timeout,
            follow_redirects=False,
            transport=transport,
        )

    @staticmethod
    def _make_breaker(upstream: Upstream, clock: Clock) -> CircuitBreaker:
        return CircuitBreaker(
            upstream.name,
            window=upstream.breaker_window,
            min_calls=upstream.breaker_min_calls,
            failure_ratio=upstream.breaker_failure_ratio,
            consecutive_failures=upstream.breaker_consecutive_failures,
            cooldown=upstream.breaker_cooldown,
            # A call cannot outlive its deadline, so a probe silent for longer was lost.
            probe_timeout=upstream.total_timeout + _CLOSE_TIMEOUT,
            clock=clock,
        )

    @property
    def upstreams(self) -> list[Upstream]:
        return list(self._upstreams)

    @property
    def breakers(self) -> dict[str, CircuitBreaker]:
        """The circuit breaker of each upstream that has one, by upstream name."""
        return dict(self._breakers)

    async def aclose(self) -> None:
        """Close every connection pool. Open streams should be closed first."""
        for client in self._clients.values():
            await client.aclose()

    async def __aenter__(self) -> UpstreamClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def route(self, model: object) -> Upstream:
        """The first configured upstream whose `models` patterns match `model`."""
        if not isinstance(model, str) or not model:
            raise InvalidRequest("model is required", param="model")
        for upstream in self._upstreams:
            if upstream.matches(model):
                return upstream
        shown = model if len(model) <= 200 else model[:200] + "…"
        raise InvalidRequest(
            f"model {shown!r} is not served by any configured upstream",
            param="model",
            code="model_not_found",
        )

    async def complete(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST `body` to `{base_url}{path}` of the model's upstream; the parsed JSON answer.

        `path` is "/chat/completions" or "/completions"; `body` is forwarded as is and must
        not ask for streaming (use `open_stream`).
        """
        _check_path(path)
        if body.get("stream"):
            raise ValueError("complete() does not stream; use open_stream()")
        upstream = self.route(body.get("model"))
        content = _encode(body)
        permit = self._admit(upstream)
        call = _Call()
        started = time.monotonic()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + upstream.total_timeout
        with self._reporting_failures(upstream, started, call, permit):
            # The outer clock covers everything, retry waits included; the inner clocks only
            # make the message precise.
            async with asyncio.timeout_at(deadline):
                response = await self._send(upstream, "POST", path, content, deadline, call)
                try:
                    raw = await self._read_body(upstream, response, deadline, _MAX_BODY_BYTES)
                finally:
                    await response.aclose()
            try:
                answer = json.loads(raw)
            except ValueError as exc:
                raise UpstreamError("upstream returned invalid JSON") from exc
            if not isinstance(answer, dict):
                raise UpstreamError("upstream returned JSON that is not an object")
        self._report(upstream, "ok", time.monotonic() - started, call.status, None, permit=permit)
        return answer

    async def open_stream(self, path: str, body: dict[str, Any]) -> UpstreamStream:
        """Start a streaming call and return once the upstream has answered 200.

        `body` is forwarded with `"stream": true` set. Failures before the headers are
        retried and mapped as in `complete` and raised from here; failures after that arrive
        as an SSE error event inside the stream (see `UpstreamStream`).
        """
        _check_path(path)
        upstream = self.route(body.get("model"))
        if body.get("stream") is not True:
            body = {**body, "stream": True}
        content = _encode(body)
        permit = self._admit(upstream)
        call = _Call()
        started = time.monotonic()
        deadline = asyncio.get_running_loop().time() + upstream.total_timeout
        with self._reporting_failures(upstream, started, call, permit):
            async with asyncio.timeout_at(deadline):
                response = await self._send(upstream, "POST", path, content, deadline, call)
        return UpstreamStream(
            client=self,
            upstream=upstream,
            response=response,
            deadline=deadline,
            started=started,
            permit=permit,
        )

    async def list_models(self) -> list[dict[str, Any]]:
        """The models of every upstream, merged in configuration order.

        Each upstream's `GET /models` is asked concurrently with a short timeout. A listed
        model is kept only if `route` would send it to that upstream (so the list holds what
        clients can actually call), the first occurrence of an id wins, and `owned_by` is set
        to the upstream's name when absent. An upstream that fails contributes its
        non-wildcard configured model names instead.
        """
        results = await asyncio.gather(*(self._models_of(u) for u in self._upstreams))
        merged: dict[str, dict[str, Any]] = {}
        for upstream, listed in zip(self._upstreams, results, strict=True):
            if listed is None:
                listed = [
                    {"id": name, "object": "model", "created": 0}
                    for name in upstream.models
                    if not any(c in name for c in "*?[")
                ]
            for item in listed:
                model_id = item.get("id")
                if not isinstance(model_id, str) or not model_id or model_id in merged:
                    continue
                if self._route_or_none(model_id) is not upstream:
                    continue
                entry = dict(item)
                entry.setdefault("object", "model")
                if not entry.get("owned_by"):
                    entry["owned_by"] = upstream.name
                merged[model_id] = entry
        return list(merged.values())

    def _route_or_none(self, model: str) -> Upstream | None:
        return next((u for u in self._upstreams if u.matches(model)), None)

    async def _models_of(self, upstream: Upstream) -> list[dict[str, Any]] | None:
        started = time.monotonic()
        client = self._clients[upstream.name]
        try:
            async with asyncio.timeout(min(_MODELS_TIMEOUT, upstream.total_timeout)):
                response = await client.get("/models")
            if response.status_code != 200:
                raise UpstreamError(f"upstream returned HTTP {response.status_code}")
            data = response.json().get("data")
            if not isinstance(data, list):
                raise UpstreamError("upstream model list has no data array")
        except (TimeoutError, httpx.HTTPError, ValueError, AttributeError, UpstreamError) as exc:
            logger.warning(
                "upstream %s: model list unavailable (%s) after %.3fs",
                upstream.name,
                type(exc).__name__,
                time.monotonic() - started,
            )
            return None
        return [item for item in data if isinstance(item, dict)]

    def _admit(self, upstream: Upstream) -> Permit | None:
        breaker = self._breakers.get(upstream.name)
        return None if breaker is None else breaker.admit()

    async def _send(
        self,
        upstream: Upstream,
        method: str,
        path: str,
        content: bytes,
        deadline: float,
        call: _Call,
    ) -> httpx.Response:
        """One response with a 2xx status and its body not yet read, after retries."""
        client = self._clients[upstream.name]
        loop = asyncio.get_running_loop()
        waited = 0.0
        attempt = 0
        while True:
            try:
                return await self._attempt(upstream, client, method, path, content, deadline, call)
            except _Retryable as retryable:
                error, retry_after = retryable.error, retryable.retry_after
            if attempt >= upstream.max_retries:
                raise error
            budget = upstream.max_retry_wait - waited
            if retry_after is not None:
                if retry_after > budget:
                    # The upstream asked for more patience than we may spend: fail now, and
                    # let the client see the upstream's wait in our Retry-After.
                    raise error
                wait = retry_after
            else:
                wait = min(_backoff(attempt), max(budget, 0.0))
            if loop.time() + wait >= deadline:
                raise error
            logger.info(
                "upstream %s: retry %d/%d in %.2fs (%s)",
                upstream.name,
                attempt + 1,
                upstream.max_retries,
                wait,
                error.message,
            )
            await asyncio.sleep(wait)
            waited += wait
            attempt += 1

    async def _attempt(
        self,
        upstream: Upstream,
        client: httpx.AsyncClient,
        method: str,
        path: str,
        content: bytes,
        deadline: float,
        call: _Call,
    ) -> httpx.Response:
        request = self._build_request(upstream, client, method, path, content)
        call.status = None
        loop = asyncio.get_running_loop()
        headers_due = loop.time() + upstream.first_byte_timeout
        try:
            async with asyncio.timeout_at(min(headers_due, deadline)):
                response = await client.send(request, stream=True)
        except TimeoutError as exc:
            if headers_due > deadline:
                raise  # the total deadline: the caller's clock reports it
            raise UpstreamTimeout(
                f"upstream sent no response headers within {upstream.first_byte_timeout:g}s"
            ) from exc
        except httpx.ConnectTimeout as exc:
            raise _Retryable(UpstreamTimeout("upstream connect timed out")) from exc
        except httpx.TimeoutException as exc:
            raise UpstreamTimeout("upstream timed out before responding") from exc
        except httpx.ConnectError as exc:
            raise _Retryable(UpstreamError("could not connect to upstream")) from exc
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
            # Dropped (closed, or reset: ECONNRESET is a ReadError) before any response:
            # nothing reached our client, so another attempt cannot duplicate anything it saw.
            raise _Retryable(UpstreamError("upstream closed the connection")) from exc
        except httpx.HTTPError as exc:
            raise UpstreamError(f"upstream request failed ({type(exc).__name__})") from exc

        status = call.status = response.status_code
        if 200 <= status < 300:
            return response
        try:
            if status == 429 or status >= 500:
                retry_after = _parse_retry_after(response.headers.get("retry-after"))
                if status == 429:
                    shown = max(_DEFAULT_RETRY_AFTER, math.ceil(retry_after or 0))
                    error: ICLServeError = RateLimited(
                        "upstream rate limit reached", headers={"Retry-After": str(shown)}
                    )
                else:
                    error = UpstreamError(f"upstream returned HTTP {status}")
                self._log(upstream, status, None, error.message)
                raise _Retryable(error, retry_after)
            raise await self._rejection(upstream, response, deadline)
        finally:
            await response.aclose()

    def _build_request(
        self,
        upstream: Upstream,
        client: httpx.AsyncClient,
        method: str,
        path: str,
        content: bytes,
    ) -> httpx.Request:
        """What `client.build_request` makes for a JSON body, from parts made once per path.

        httpx joins the base URL and merges the headers on every call: 0.1 ms, and 0.3 ms on
        an idle server, for parts that never change.
        """
        parts = self._request_parts.get((upstream.name, path))
        if parts is None:
            parts = _RequestParts(
                url=client.build_request(method, path).url,
                headers=httpx.Headers([*client.headers.raw, _JSON_CONTENT_TYPE]),
                extensions={"timeout": client.timeout.as_dict()},
            )
            self._request_parts[(upstream.name, path)] = parts
        return httpx.Request(
            method, parts.url, headers=parts.headers, content=content, extensions=parts.extensions
        )

    async def _rejection(
        self, upstream: Upstream, response: httpx.Response, deadline: float
    ) -> ICLServeError:
        status = response.status_code
        if status in (401, 403):
            return UpstreamError("upstream authentication failed")
        if status == 408:
            return UpstreamTimeout("upstream timed out (HTTP 408)")
        if 300 <= status < 400:
            # Redirects are never followed: the key must not travel to another host.
            return UpstreamError(f"upstream answered with a redirect (HTTP {status})")
        if not 400 <= status < 500:
            return UpstreamError(f"upstream returned HTTP {status}")
        detail = await self._upstream_message(upstream, response, deadline)
        message = "upstream rejected the request: " + (detail or f"HTTP {status}")
        if status == 404:
            return UpstreamRejectedNotFound(message)
        if status == 422:
            return UpstreamRejectedUnprocessable(message)
        return UpstreamRejected(message)

    async def _upstream_message(
        self, upstream: Upstream, response: httpx.Response, deadline: float
    ) -> str | None:
        """The upstream error's `message` field only, truncated and with the key redacted."""
        try:
            raw = await self._read_body(upstream, response, deadline, _MAX_ERROR_BODY_BYTES)
            payload = json.loads(raw)
        except (ICLServeError, ValueError):
            return None
        message: object = None
        if isinstance(payload, dict):
            inner = payload.get("error")
            message = inner.get("message") if isinstance(inner, dict) else payload.get("message")
        if not isinstance(message, str) or not message.strip():
            return None
        message = message.strip()
        key = upstream.api_key.get_secret_value() if upstream.api_key is not None else ""
        if key:
            message = message.replace(key, "[redacted]")
        if len(message) > _MAX_MESSAGE_CHARS:
            message = message[:_MAX_MESSAGE_CHARS] + "…"
        # Redact again: truncation may have cut a key in half, leaving a prefix behind.
        if key and len(key) >= 8:
            for size in range(len(key) - 1, 7, -1):
                if message.endswith(key[:size] + "…"):
                    message = message[: -size - 1] + "[redacted]…"
                    break
        return message

    async def _read_body(
        self, upstream: Upstream, response: httpx.Response, deadline: float, limit: int
    ) -> bytes:
        loop = asyncio.get_running_loop()
        parts: list[bytes] = []
        size = 0
        chunks = cast(AsyncGenerator[bytes, None], response.aiter_bytes())
        try:
            while True:
                idle_ends = loop.time() + upstream.idle_timeout
                try:
                    async with asyncio.timeout_at(min(idle_ends, deadline)):
                        chunk = await chunks.__anext__()
                except StopAsyncIteration:
                    break
                except TimeoutError as exc:
                    if idle_ends > deadline:
                        raise
                    raise UpstreamTimeout(
                        f"upstream sent nothing for {upstream.idle_timeout:g}s"
                    ) from exc
                except httpx.TimeoutException as exc:
                    raise UpstreamTimeout("upstream timed out while sending its answer") from exc
                except httpx.HTTPError as exc:
                    raise UpstreamError(
                        "upstream connection broke while sending its answer"
                    ) from exc
                size += len(chunk)
                if size > limit:
                    raise UpstreamError("upstream answer is too large")
                parts.append(chunk)
        finally:
            await chunks.aclose()
        return b"".join(parts)

    def _report_error(
        self,
        upstream: Upstream,
        error: ICLServeError,
        started: float,
        call: _Call,
        permit: Permit | None,
    ) -> None:
        if isinstance(error, UpstreamTimeout):
            outcome = "timeout"
        elif isinstance(error, RateLimited):
            outcome = "rate_limited"
        elif isinstance(error, InvalidRequest):
            outcome = "rejected"
        else:
            outcome = "error"
        seconds = time.monotonic() - started
        self._report(upstream, outcome, seconds, call.status, error.message, permit=permit)

    @contextlib.contextmanager
    def _reporting_failures(
        self, upstream: Upstream, started: float, call: _Call, permit: Permit | None
    ) -> Iterator[None]:
        """Report a call that fails inside the block (the hook, the log and the breaker hear of
        it once) and raise the outer deadline as our 504. The caller reports success."""
        try:
            yield
        except TimeoutError as exc:
            error = UpstreamTimeout(f"upstream did not answer within {upstream.total_timeout:g}s")
            self._report_error(upstream, error, started, call, permit)
            raise error from exc
        except ICLServeError as error:
            self._report_error(upstream, error, started, call, permit)
            raise
        except BaseException as exc:
            self._report_abandoned(upstream, exc, started, permit)
            raise

    def _report_abandoned(
        self, upstream: Upstream, exc: BaseException, started: float, permit: Permit | None
    ) -> None:
        """A call that ended in neither an answer nor one of our errors: cancelled, mostly."""
        seconds = time.monotonic() - started
        if isinstance(exc, asyncio.CancelledError):
            self._report(upstream, "cancelled", seconds, None, None, permit=permit)
            return
        # A bug of ours, not news about the upstream: free the breaker's slot, judge nothing.
        self._settle(upstream, permit, Health.NEUTRAL)

    def _settle(self, upstream: Upstream, permit: Permit | None, health: Health) -> None:
        breaker = self._breakers.get(upstream.name)
        if breaker is not None and permit is not None:
            breaker.record(permit, health)

    def _report(
        self,
        upstream: Upstream,
        outcome: str,
        seconds: float,
        status: int | None,
        detail: str | None,
        *,
        permit: Permit | None = None,
    ) -> None:
        self._settle(upstream, permit, _health(outcome, status))
        # A line per successful call would be an access log; the server keeps that off.
        level = logging.DEBUG if outcome == "ok" else logging.INFO
        self._log(upstream, status, seconds, detail or outcome, level)
        if self._on_result is None:
            return
        try:
            self._on_result(upstream.name, outcome, seconds)
        except Exception:  # a metrics hook must never fail a request
            logger.exception("on_result hook failed")

    @staticmethod
    def _log(
        upstream: Upstream,
        status: int | None,
        seconds: float | None,
        what: str,
        level: int = logging.INFO,
    ) -> None:
        # Name, status, timing and our own message only: never URLs, bodies or headers.
        if seconds is None:
            logger.log(level, "upstream %s: HTTP %s (%s)", upstream.name, status, what)
        else:
            logger.log(
                level, "upstream %s: HTTP %s in %.3fs (%s)", upstream.name, status, seconds, what
            )
