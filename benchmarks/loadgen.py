"""A closed-loop HTTP/1.1 load generator on raw asyncio streams, and a sequential timer.

Usage as a library (what benchmarks/proxy.py and benchmarks/load.py do):

    raws = [post_bytes(url, "/v1/pools/p/select", body, key=KEY) for body in bodies]
    result = run(load(url, raws, concurrency=16, duration_s=30, max_requests=100_000,
                      warmup_s=5))
    result.summary()   # rps, statuses, errors, latency percentiles, loadgen CPU

    result = run(sequential(url, raws, warmup=30))       # one connection, one at a time
    timer = Timer(url); await timer.measure(raw)          # the same, request by request

Usage from the shell (ad hoc):

    .venv/bin/python benchmarks/loadgen.py URL --path /v1/pools/p/select \
        --body '{"query": "hello", "k": 8}' --header 'Authorization: Bearer KEY' \
        [-c 16] [--duration 10] [--max-requests 100000] [--warmup 2] [--sequential]

`load` opens C keep-alive connections; each sends the next pre-encoded request (the bodies
are taken from one shared counter, cycling the list, so with at least as many bodies as
requests every request is different), reads the status line, the headers and the body
(Content-Length, chunked, or until close), then sends the next: a closed loop. A warm-up
phase (bounded by seconds and/or a request count) is not recorded. The measured phase ends
at whichever comes first: `duration_s` or `max_requests` started. Connection errors,
timeouts and protocol errors reopen the connection and are counted; non-2xx responses are
counted by status. Latency is recorded for 2xx responses: `latency` to the last byte and
`ttfb` to the first body byte (for a chunked body, the first chunk's data; for a
Content-Length body, the end of the headers).

Everything runs in one process and one event loop (uvloop when installed). On a small box it
shares the CPU with the server under test: `loadgen_cpu_ms_per_req` in the summary says how
much it took, and reports should say so. httpx/aiohttp are avoided on purpose: their CPU per
request is several times higher than these few stream calls.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

from _common import percentiles

T = TypeVar("T")

_CONNECT_TIMEOUT = 10.0
_RETRY_PAUSE = 0.05  # after a failed connect, so a dead server is not hammered in a hot loop


class ProtocolError(Exception):
    """The response could not be parsed as HTTP/1.1."""


def split_url(url: str) -> tuple[str, int]:
    """(host, port) of an http:// URL."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"only http:// URLs are supported: {url!r}")
    return parts.hostname, parts.port or 80


def post_bytes(
    url: str,
    path: str,
    body: Any,
    *,
    key: str | None = None,
    headers: dict[str, str] | None = None,
) -> bytes:
    """A complete HTTP/1.1 keep-alive POST with a JSON body (`body` may be bytes already).

    `path` is appended to the URL's own path (so a base URL ending in /v1 works).
    """
    host, port = split_url(url)
    prefix = urlsplit(url).path.rstrip("/")
    data = body if isinstance(body, bytes) else json.dumps(body, separators=(",", ":")).encode()
    lines = [
        f"POST {prefix}{path} HTTP/1.1",
        f"Host: {host}:{port}",
        "Content-Type: application/json",
        f"Content-Length: {len(data)}",
    ]
    if key:
        lines.append(f"Authorization: Bearer {key}")
    lines.extend(f"{name}: {value}" for name, value in (headers or {}).items())
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + data


@dataclass(slots=True)
class Reply:
    status: int
    ttfb_s: float
    total_s: float
    body: bytes


class Connection:
    """One keep-alive HTTP/1.1 connection; `request` sends raw bytes and reads the reply."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self.reusable = True

    @classmethod
    async def open(cls, host: str, port: int, timeout: float = _CONNECT_TIMEOUT) -> Connection:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
        return cls(reader, writer)

    def close(self) -> None:
        self.reusable = False
        with contextlib.suppress(Exception):
            self._writer.close()

    async def request(self, raw: bytes, *, keep_body: bool = False) -> Reply:
        """Send one request and read its whole response. Times are perf_counter deltas."""
        reader = self._reader
        start = time.perf_counter()
        self._writer.write(raw)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            raise ConnectionResetError("connection closed before the response") from exc
        except asyncio.LimitOverrunError as exc:
            raise ProtocolError("response head too large") from exc
        lines = head[:-4].split(b"\r\n")
        try:
            version, code = lines[0].split(b" ", 2)[:2]
            status = int(code)
        except ValueError as exc:
            raise ProtocolError(f"bad status line {lines[0][:80]!r}") from exc
        length = -1
        chunked = False
        close = version != b"HTTP/1.1"
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif name == b"connection":
                token = value.strip().lower()
                close = token == b"close" or (close and token != b"keep-alive")
        ttfb = time.perf_counter() - start
        parts: list[bytes] = []
        try:
            if chunked:
                first = True
                while True:
                    size_line = await reader.readuntil(b"\r\n")
                    size = int(size_line.split(b";", 1)[0], 16)
                    if size == 0:
                        while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
                            pass
                        break
                    chunk = await reader.readexactly(size + 2)
                    if first:
                        ttfb = time.perf_counter() - start
                        first = False
                    if keep_body:
                        parts.append(chunk[:-2])
            elif length >= 0 or status in (204, 304) or 100 <= status < 200:
                if length > 0:
                    data = await reader.readexactly(length)
                    if keep_body:
                        parts.append(data)
            else:
                data = await reader.read(-1)
                close = True
                if keep_body:
                    parts.append(data)
        except asyncio.IncompleteReadError as exc:
            raise ConnectionResetError("connection closed mid-body") from exc
        except (ValueError, asyncio.LimitOverrunError) as exc:
            raise ProtocolError("bad chunked body") from exc
        total = time.perf_counter() - start
        if close:
            self.close()
        return Reply(status, ttfb, total, b"".join(parts))


@dataclass
class LoadResult:
    """What a load run recorded (warm-up excluded)."""

    concurrency: int
    statuses: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    error_samples: list[str] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)
    ttfb_ms: list[float] = field(default_factory=list)
    started: int = 0
    warmup_requests: int = 0
    elapsed_s: float = 0.0
    loadgen_cpu_s: float = 0.0
    distinct_bodies: int = 0
    bodies_sent: int = 0

    @property
    def ok(self) -> int:
        return sum(n for code, n in self.statuses.items() if 200 <= code < 300)

    @property
    def error_count(self) -> int:
        """Connection errors, timeouts, protocol errors and non-2xx responses."""
        return sum(self.errors.values()) + sum(
            n for code, n in self.statuses.items() if not 200 <= code < 300
        )

    def summary(self) -> dict[str, Any]:
        lat = percentiles(self.latencies_ms)
        ttfb = percentiles(self.ttfb_ms)
        done = self.ok + sum(n for c, n in self.statuses.items() if not 200 <= c < 300)
        return {
            "concurrency": self.concurrency,
            "requests": self.started,
            "ok": self.ok,
            "errors": self.error_count,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "error_kinds": dict(self.errors),
            "error_samples": self.error_samples,
            "elapsed_s": round(self.elapsed_s, 3),
            "rps": self.ok / self.elapsed_s if self.elapsed_s > 0 else float("nan"),
            "latency_ms": lat,
            "ttfb_ms": ttfb,
            "warmup_requests": self.warmup_requests,
            "distinct_bodies": self.distinct_bodies,
            "bodies_wrapped": self.bodies_sent > self.distinct_bodies,
            "loadgen_cpu_s": round(self.loadgen_cpu_s, 3),
            "loadgen_cpu_ms_per_req": 1e3 * self.loadgen_cpu_s / done if done else float("nan"),
        }

    def _error(self, kind: str, exc: BaseException | None) -> None:
        self.errors[kind] += 1
        if exc is not None and len(self.error_samples) < 5:
            self.error_samples.append(f"{kind}: {type(exc).__name__}: {exc}"[:200])


def _classify(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ProtocolError):
        return "protocol"
    return "connection"


async def load(
    url: str,
    raws: Sequence[bytes],
    *,
    concurrency: int,
    duration_s: float,
    max_requests: int,
    warmup_s: float = 0.0,
    warmup_requests: int = 0,
    timeout_s: float = 60.0,
    on_phase: Callable[[str], None] | None = None,
    check: Callable[[Reply], str | None] | None = None,
    rate: float | None = None,
) -> LoadResult:
    """Closed-loop load: `concurrency` connections until `duration_s` or `max_requests`.

    Warm-up runs until `warmup_s` seconds or `warmup_requests` requests, whichever comes first
    (a zero bound is unused; both zero: no warm-up). `on_phase("measure_start")` and
    `on_phase("measure_end")` are called around the measured phase (for example to sample the
    server's CPU time). `check(reply)` reads every 2xx reply (bodies are kept when it is
    given) and returns None or what is wrong with it; a wrong reply counts as an error of
    kind "check", not as a latency. `rate` caps the requests started per second across all
    connections (None: as fast as the replies come back).
    """
    if not raws:
        raise ValueError("no requests to send")
    if concurrency < 1 or max_requests < 1 or duration_s <= 0:
        raise ValueError("concurrency, max_requests and duration_s must be positive")
    host, port = split_url(url)
    result = LoadResult(concurrency=concurrency, distinct_bodies=len(raws))
    clock = time.perf_counter
    warm_start = clock()
    warming = warmup_s > 0 or warmup_requests > 0
    state: dict[str, Any] = {
        "next": 0,
        "warming": warming,
        "t0": 0.0,
        "end": 0.0,
        "last": 0.0,
        "slot": warm_start,
    }

    def begin_measure(now: float) -> None:
        state["warming"] = False
        state["t0"] = now
        state["end"] = now + duration_s
        state["cpu0"] = time.process_time()
        if on_phase is not None:
            on_phase("measure_start")

    if not warming:
        begin_measure(warm_start)

    async def worker() -> None:
        conn: Connection | None = None
        try:
            while True:
                now = clock()
                if state["warming"]:
                    if (warmup_s > 0 and now - warm_start >= warmup_s) or (
                        warmup_requests > 0 and result.warmup_requests >= warmup_requests
                    ):
                        begin_measure(now)
                if not state["warming"] and (now >= state["end"] or result.started >= max_requests):
                    return
                if rate is not None:
                    slot = max(now, state["slot"])
                    state["slot"] = slot + 1.0 / rate
                    if slot > now:
                        await asyncio.sleep(slot - now)
                recorded = not state["warming"]
                if recorded:
                    result.started += 1
                else:
                    result.warmup_requests += 1
                raw = raws[state["next"] % len(raws)]
                state["next"] += 1
                try:
                    async with asyncio.timeout(timeout_s):
                        if conn is None or not conn.reusable:
                            conn = await Connection.open(host, port)
                        reply = await conn.request(raw, keep_body=check is not None)
                except (OSError, TimeoutError, ProtocolError) as exc:
                    if conn is not None:
                        conn.close()
                    connected = conn is not None
                    conn = None
                    if recorded:
                        result._error(_classify(exc), exc)
                        state["last"] = clock()
                    if not connected:
                        await asyncio.sleep(_RETRY_PAUSE)
                    continue
                if recorded:
                    state["last"] = clock()
                    wrong = (
                        check(reply) if check is not None and 200 <= reply.status < 300 else None
                    )
                    if wrong is not None:
                        result._error("check", ValueError(wrong))
                        continue
                    result.statuses[reply.status] += 1
                    if 200 <= reply.status < 300:
                        result.latencies_ms.append(reply.total_s * 1e3)
                        result.ttfb_ms.append(reply.ttfb_s * 1e3)
        finally:
            if conn is not None:
                conn.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    if state["warming"]:  # every worker stopped during warm-up: cannot happen, but be safe
        begin_measure(clock())
    result.loadgen_cpu_s = time.process_time() - state["cpu0"]
    result.elapsed_s = max(state["last"], state["t0"]) - state["t0"]
    result.bodies_sent = state["next"]
    if on_phase is not None:
        on_phase("measure_end")
    return result


@dataclass
class SequentialResult:
    """Per-request times of a sequential run, in milliseconds (2xx only), and failures."""

    latencies_ms: list[float] = field(default_factory=list)
    ttfb_ms: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    first_body: bytes = b""


class Timer:
    """One keep-alive connection that times requests one at a time into `result`.

    `check(reply)` (the body is then kept) returns an error message for a wrong answer; such a
    reply counts as an error and is not timed. Failures reopen the connection.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 60.0,
        check: Callable[[Reply], str | None] | None = None,
    ) -> None:
        self.host, self.port = split_url(url)
        self.timeout_s = timeout_s
        self.check = check
        self.result = SequentialResult()
        self._conn: Connection | None = None
        self._failure = ""

    async def send(self, raw: bytes, *, keep_body: bool = False) -> Reply | None:
        """Send one request untimed and unchecked; None on a connection failure."""
        try:
            async with asyncio.timeout(self.timeout_s):
                if self._conn is None or not self._conn.reusable:
                    self._conn = await Connection.open(self.host, self.port)
                return await self._conn.request(raw, keep_body=keep_body)
        except (OSError, TimeoutError, ProtocolError) as exc:
            self.close()
            self._failure = f"{_classify(exc)}: {type(exc).__name__}: {exc}"[:200]
            return None

    async def measure(self, raw: bytes) -> Reply | None:
        """Time one request and record it."""
        out = self.result
        reply = await self.send(raw, keep_body=self.check is not None or not out.first_body)
        if reply is None:
            out.errors.append(self._failure)
            return None
        out.statuses[reply.status] += 1
        if not out.first_body:
            out.first_body = reply.body
        problem = self.check(reply) if self.check is not None else None
        if problem is not None:
            out.errors.append(problem)
        elif 200 <= reply.status < 300:
            out.latencies_ms.append(reply.total_s * 1e3)
            out.ttfb_ms.append(reply.ttfb_s * 1e3)
        return reply

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


async def sequential(
    url: str,
    raws: Sequence[bytes],
    *,
    warmup: int = 0,
    timeout_s: float = 60.0,
    max_seconds: float = 3600.0,
    check: Callable[[Reply], str | None] | None = None,
) -> SequentialResult:
    """One keep-alive connection, one request at a time: `warmup` untimed, then each of `raws`.

    Warm-up requests cycle through `raws` before the timed pass. The timed pass stops early
    after `max_seconds`. See `Timer` for `check`.
    """
    timer = Timer(url, timeout_s=timeout_s, check=check)
    try:
        for i in range(warmup):
            await timer.send(raws[i % len(raws)])
        deadline = time.perf_counter() + max_seconds
        for raw in raws:
            if time.perf_counter() >= deadline:
                break
            await timer.measure(raw)
    finally:
        timer.close()
    return timer.result


def run(coro: Coroutine[Any, Any, T] | Awaitable[T]) -> T:
    """Run a coroutine on uvloop when installed (it costs less CPU per request), else asyncio."""

    async def main() -> T:
        return await coro

    try:
        import uvloop
    except ImportError:
        return asyncio.run(main())
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main())


def loop_name() -> str:
    """The event loop `run` uses, for report headers."""
    try:
        return f"uvloop {importlib.metadata.version('uvloop')}"
    except importlib.metadata.PackageNotFoundError:
        return "asyncio"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("url", help="base URL, e.g. http://127.0.0.1:8000")
    parser.add_argument("--path", required=True, help="request path, appended to the URL's")
    parser.add_argument("--body", action="append", default=[], help="JSON body (repeatable)")
    parser.add_argument("--body-file", help="JSONL file: one body per line")
    parser.add_argument("--header", action="append", default=[], help="'Name: value'")
    parser.add_argument("-c", "--concurrency", type=int, default=16)
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds")
    parser.add_argument("--max-requests", type=int, default=100_000)
    parser.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds")
    parser.add_argument(
        "--sequential", action="store_true", help="one connection, one request at a time"
    )
    args = parser.parse_args()
    bodies: list[bytes] = [b.encode() for b in args.body]
    if args.body_file:
        with open(args.body_file, "rb") as fh:
            bodies.extend(line.strip() for line in fh if line.strip())
    if not bodies:
        parser.error("give --body or --body-file")
    headers = dict(h.split(":", 1) for h in args.header)
    headers = {k.strip(): v.strip() for k, v in headers.items()}
    raws = [post_bytes(args.url, args.path, b, headers=headers) for b in bodies]
    if args.sequential:
        cycled = [raws[i % len(raws)] for i in range(args.max_requests)]
        seq = run(
            sequential(args.url, cycled, warmup=min(30, len(cycled)), max_seconds=args.duration)
        )
        print(
            json.dumps(
                {
                    "latency_ms": percentiles(seq.latencies_ms),
                    "statuses": dict(seq.statuses),
                    "errors": seq.errors[:5],
                },
                indent=2,
            )
        )
        return
    result = run(
        load(
            args.url,
            raws,
            concurrency=args.concurrency,
            duration_s=args.duration,
            max_requests=args.max_requests,
            warmup_s=args.warmup,
        )
    )
    print(json.dumps(result.summary(), indent=2))


if __name__ == "__main__":
    main()
