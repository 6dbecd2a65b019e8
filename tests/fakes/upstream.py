"""A deterministic fake OpenAI-compatible upstream: a real HTTP server on 127.0.0.1.

`FakeUpstream` runs a small ASGI app under uvicorn (h11) in a background thread on a free
port, so the code under test goes through real sockets, real chunked encoding and real
disconnects. Use it as a context manager (or `start()` / `stop()`):

    with FakeUpstream(models=["fake-model"]) as fake:
        settings = Upstream(name="fake", base_url=fake.base_url)   # http://127.0.0.1:PORT/v1
        ...
        assert fake.requests[-1].body["messages"][-1]["content"] == "..."

Endpoints: `POST /v1/chat/completions`, `POST /v1/completions` (both with `stream`),
`GET /v1/models`, `POST /v1/embeddings`. Responses have the OpenAI shape; `usage` counts
whitespace-separated tokens (`prompt_tokens` over every message's text, or the prompt).

The answer depends on the prompt, so tests can tell good demonstrations from bad ones:

* Chat: the demonstrations are the (user, assistant) message pairs before the final user
  message. The answer is the assistant content of the demonstration whose user content shares
  the most distinct words (lower-cased `\\w+`) with the final user message; on a tie the later
  demonstration wins (so with no shared words at all, the last one wins). With no
  demonstrations the answer is "unknown".
* Text completions: the prompt is read as blocks `Input: ...` newline `Output: ...`
  (case-insensitive labels, a block runs to the next `Input:`). The last block, if its output
  is blank, is the query; the earlier blocks with an output are the demonstrations, chosen by
  the same rule; the answer is the first line of the chosen output. No query block or no
  demonstrations: "unknown". A list of prompts gets one choice per prompt.
* Embeddings: a hashed bag of lower-cased words, L2-normalised (`embed_text`), `dimensions`
  from the request or the fake's `embedding_dim`; `encoding_format: "base64"` is honoured.
  The `data` items come back in reverse order, so clients must sort by `index`.

Chat log-probabilities and samples (non-streaming chat only; without `logprobs` and `n`,
and without `seed` or a positive `temperature`, the response is exactly as above).
`answer_distribution(messages)` is the fake's first-token distribution: the chat answer
above with probability p = (words of the chosen demonstration's user content shared with
the query) / (its distinct words), clamped to [0.05, 0.99] (no demonstrations: "unknown"
with 0.05), then up to four runner-ups (the other distinct assistant contents, by their
best word overlap, later demonstration first on ties) sharing 1 - p equally. Tokens are
the answer's whitespace pieces (`"not entailment"` is `"not "`, `"entailment"`).

* `logprobs: true`: `choices[i].logprobs.content` has one entry per token of that choice's
  answer, `{"token", "logprob", "bytes": null, "top_logprobs": [...]}`. The first token's
  `top_logprobs` are the distribution's first tokens (answers sharing a first token add up),
  most probable first, cut to the request's `top_logprobs` (default 0); its `logprob` is its
  own entry's. Later tokens have logprob 0.0 and themselves as the only alternative.
  `fake.logprobs_enabled = False` makes the fake ignore `logprobs` (always `null`), like a
  server without the feature.
* `n`: that many choices. At temperature 0 (or none) every choice is the answer above; above
  0, when the body has `n` or `seed` (a request with neither keeps the answer above, as
  before), choice i is `sample_answer(messages, seed, i)`: drawn from the distribution with
  u = `sample_uniform(messages, seed, i)` (a hash, so the same request gives the same
  samples; mass not covered goes to the answer). `fake.n_enabled = False` makes the fake
  ignore `n` (one choice, index 0), like a server without it; the request's `seed` still
  changes the draw.

Streaming sends a role chunk, one chunk per word of the answer, a finish chunk (plus a usage
chunk when `stream_options.include_usage`), then `data: [DONE]`. A non-streaming body is
sent in three chunks, so chunk faults apply to it too.

Faults (`set_fault(kind, ..., times=N, path=None)`: the next N matching requests, or all
until `clear_faults()` when times is None; `path` limits it to one path such as
"/v1/models"). One fault per kind; several kinds combine:

* `"status"`: answer `code` (default 500) with an OpenAI error body whose message is
  `message`, or the raw text `body`; `retry_after` adds a `Retry-After` header.
* `"stall_before_headers"`: sleep `seconds` before sending the headers.
* `"latency"`: sleep `seconds` ± uniform `jitter` before the headers (seeded, deterministic).
* `"stall_after_chunks"`: after `chunks` body chunks, sleep `seconds`, then go on.
* `"drip"`: send the body one byte every `interval` seconds.
* `"close_mid_stream"`: after `chunks` body chunks, drop the connection without finishing
  the response (the client sees an incomplete chunked body).
* `"reset"`: reset the TCP connection (SO_LINGER 0, then abort: the kernel sends RST, the
  client's next read fails with ECONNRESET), before the response headers, or, with `chunks`
  > 0, after that many body chunks.

If the API key is set, a request without `Authorization: Bearer <key>` gets 401 with a
message that echoes the key it sent (as real providers do), so tests can check that nothing
upstream says reaches the client verbatim. `fake.response_headers` (name, value) pairs are
added to every answer but a `"status"` fault's, such as a `Set-Cookie`. Client disconnects
are recorded (`disconnects`, `wait_for_disconnect`), and the handler is cancelled at once, as
a real server would stop generating.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import math
import random
import re
import socket
import struct
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal

import uvicorn

__all__ = [
    "Disconnect",
    "FakeUpstream",
    "FaultKind",
    "RecordedRequest",
    "answer_chat",
    "answer_completion",
    "answer_distribution",
    "embed_text",
    "sample_answer",
    "sample_uniform",
]

FaultKind = Literal[
    "status",
    "stall_before_headers",
    "latency",
    "stall_after_chunks",
    "drip",
    "close_mid_stream",
    "reset",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

CREATED = 1_700_000_000
_WORD = re.compile(r"\w+")
_BLOCK = re.compile(r"Input:(.*?)\nOutput:(.*?)(?=\nInput:|\Z)", re.S | re.I)


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names; the last value wins
    body: Any  # parsed JSON, or None when empty or not JSON
    time: float  # time.monotonic() on arrival


@dataclass(frozen=True)
class Disconnect:
    path: str
    time: float  # time.monotonic() when the client went away mid-response


@dataclass
class _Fault:
    kind: FaultKind
    times: int | None
    path: str | None
    code: int = 500
    retry_after: str | None = None
    message: str | None = None
    body: str | None = None
    seconds: float = 0.0
    chunks: int = 0
    interval: float = 0.1
    jitter: float = 0.0


# ---------------------------------------------------------------------------------------
# The deterministic answers (public so that tests can compute expectations).


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return ""


def _words(text: str) -> set[str]:
    return set(_WORD.findall(text.lower()))


def _best(query: str, demonstrations: Sequence[tuple[str, str]]) -> str:
    if not demonstrations:
        return "unknown"
    query_words = _words(query)
    best_score, best_answer = -1, "unknown"
    for question, answer in demonstrations:
        score = len(_words(question) & query_words)
        if score >= best_score:  # >=: ties go to the later demonstration
            best_score, best_answer = score, answer
    return best_answer


def answer_chat(messages: Sequence[dict[str, Any]]) -> str:
    """The fake's answer to a chat conversation (see the module docstring)."""
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=None)
    if last_user is None:
        return "unknown"
    demonstrations = [
        (_text(messages[i].get("content")), _text(messages[i + 1].get("content")))
        for i in range(last_user - 1)
        if messages[i].get("role") == "user" and messages[i + 1].get("role") == "assistant"
    ]
    return _best(_text(messages[last_user].get("content")), demonstrations)


def answer_completion(prompt: str) -> str:
    """The fake's answer to a text prompt of Input/Output blocks (see the module docstring)."""
    blocks = [(given.strip(), output.strip()) for given, output in _BLOCK.findall(prompt)]
    if not blocks or blocks[-1][1]:
        return "unknown"
    query = blocks[-1][0]
    demonstrations = [
        (given, output.splitlines()[0].strip()) for given, output in blocks[:-1] if output
    ]
    return _best(query, demonstrations)


PROB_MIN = 0.05
PROB_MAX = 0.99
MAX_RUNNER_UPS = 4


def _demonstrations(messages: Sequence[dict[str, Any]]) -> tuple[str, list[tuple[str, str]]]:
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=None)
    if last_user is None:
        return "", []
    return _text(messages[last_user].get("content")), [
        (_text(messages[i].get("content")), _text(messages[i + 1].get("content")))
        for i in range(last_user - 1)
        if messages[i].get("role") == "user" and messages[i + 1].get("role") == "assistant"
    ]


def answer_distribution(messages: Sequence[dict[str, Any]]) -> list[tuple[str, float]]:
    """The fake's answers with their probabilities, its own answer first (module docstring)."""
    query, demonstrations = _demonstrations(messages)
    if not demonstrations:
        return [("unknown", PROB_MIN)]
    query_words = _words(query)
    scores = [len(_words(question) & query_words) for question, _ in demonstrations]
    best = max(range(len(scores)), key=lambda i: (scores[i], i))  # ties: the later one
    question, chosen = demonstrations[best]
    words = _words(question)
    p = min(PROB_MAX, max(PROB_MIN, scores[best] / len(words) if words else 0.0))
    rank: dict[str, tuple[int, int]] = {}
    for i, (_, answer) in enumerate(demonstrations):
        if answer != chosen:
            rank[answer] = max(rank.get(answer, (-1, -1)), (scores[i], i))
    runners = sorted(rank, key=lambda a: rank[a], reverse=True)[:MAX_RUNNER_UPS]
    share = (1.0 - p) / len(runners) if runners else 0.0
    return [(chosen, p)] + [(answer, share) for answer in runners]


def sample_uniform(messages: Sequence[dict[str, Any]], seed: Any, index: int) -> float:
    """The fake's deterministic "random" number in [0, 1) for choice `index` of a request."""
    key = json.dumps([list(messages), seed, index], sort_keys=True, default=str)
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def sample_answer(messages: Sequence[dict[str, Any]], seed: Any, index: int) -> str:
    """Choice `index` of a chat request at temperature > 0 (see the module docstring)."""
    u = sample_uniform(messages, seed, index)
    dist = answer_distribution(messages)
    total = 0.0
    for answer, p in dist:
        total += p
        if u < total:
            return answer
    return dist[0][0]


def _token_logprobs(
    answer: str, dist: Sequence[tuple[str, float]], top: int
) -> list[dict[str, Any]]:
    firsts: dict[str, float] = {}
    for text, p in dist:
        first = _pieces(text)[0]
        firsts[first] = firsts.get(first, 0.0) + p
    ranked = sorted(firsts.items(), key=lambda item: -item[1])
    pieces = _pieces(answer)
    head = pieces[0]
    head_p = firsts.get(head, PROB_MIN)
    out = [
        {
            "token": head,
            "logprob": math.log(head_p),
            "bytes": None,
            "top_logprobs": [
                {"token": t, "logprob": math.log(p), "bytes": None} for t, p in ranked[:top]
            ],
        }
    ]
    for piece in pieces[1:]:
        alt = [{"token": piece, "logprob": 0.0, "bytes": None}][:top]
        out.append({"token": piece, "logprob": 0.0, "bytes": None, "top_logprobs": alt})
    return out


def embed_text(text: str, dim: int) -> list[float]:
    """A hashed bag of words, L2-normalised: texts sharing words get close vectors."""
    vector = [0.0] * dim
    for word in _WORD.findall(text.lower()) or [text]:
        digest = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "big")
        vector[digest % dim] += 1.0 if (digest >> 32) & 1 else -1.0
    norm = math.sqrt(sum(x * x for x in vector))
    if norm == 0.0:  # words that cancel out: still return a unit vector
        vector[0], norm = 1.0, 1.0
    return [x / norm for x in vector]


def _tokens(text: str) -> int:
    return len(text.split())


def _pieces(answer: str) -> list[str]:
    return re.findall(r"\S+\s*", answer) or [answer]


# ---------------------------------------------------------------------------------------


class _HTTPError(Exception):
    def __init__(self, status: int, message: str, error_type: str = "invalid_request_error"):
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type


def _error_body(message: str, error_type: str) -> bytes:
    error = {"message": message, "type": error_type, "param": None, "code": None}
    return json.dumps({"error": error}).encode()


def _sse(payload: Any) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


class FakeUpstream:
    """A fake OpenAI-compatible server on 127.0.0.1; see the module docstring.

    Thread-safe: tests set faults and read records from the test thread while the server
    runs in its own thread and event loop.
    """

    def __init__(
        self,
        *,
        models: Sequence[str] = ("fake-model",),
        api_key: str | None = None,
        owned_by: str | None = "fake-upstream",
        embedding_dim: int = 32,
    ) -> None:
        self.models = list(models)
        self.api_key = api_key
        self.owned_by = owned_by
        self.embedding_dim = embedding_dim
        self.port = 0
        self._lock = threading.Condition()
        self._requests: list[RecordedRequest] = []
        self._disconnects: list[Disconnect] = []
        self._faults: dict[FaultKind, _Fault] = {}
        self._random = random.Random(0)
        self._counter = 0
        self.logprobs_enabled = True  # False: ignore `logprobs` like a server without it
        self.n_enabled = True  # False: ignore `n` (always one choice)
        # Sent with every answer that is not a "status" fault, e.g. ("set-cookie", "id=1").
        self.response_headers: list[tuple[str, str]] = []
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI base URL, including /v1."""
        return f"{self.url}/v1"

    def start(self) -> FakeUpstream:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        # log_config/log_level None: leave the test process's logging configuration alone.
        config = uvicorn.Config(
            self._app,
            http="h11",
            ws="none",
            loop="asyncio",
            lifespan="off",
            interface="asgi3",
            proxy_headers=False,
            access_log=False,
            log_config=None,
            log_level=None,
            timeout_graceful_shutdown=1,
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name="fake-upstream", daemon=True
        )
        thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("fake upstream did not start")
            time.sleep(0.005)
        self._server, self._thread = server, thread
        return self

    def stop(self) -> None:
        if self._server is None or self._thread is None:
            return
        # force_exit: do not wait for stalled handlers; asyncio.run cancels them on exit.
        self._server.should_exit = True
        self._server.force_exit = True
        self._thread.join(timeout=10)
        self._server = self._thread = None

    def __enter__(self) -> FakeUpstream:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- test controls ------------------------------------------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    @property
    def disconnects(self) -> list[Disconnect]:
        with self._lock:
            return list(self._disconnects)

    def wait_for_disconnect(self, timeout: float) -> bool:
        """Block until a client disconnect mid-response has been recorded."""
        with self._lock:
            return self._lock.wait_for(lambda: bool(self._disconnects), timeout=timeout)

    def reset(self) -> None:
        """Forget requests, disconnects and faults."""
        with self._lock:
            self._requests.clear()
            self._disconnects.clear()
            self._faults.clear()

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def set_fault(
        self,
        kind: FaultKind,
        *,
        times: int | None = None,
        path: str | None = None,
        code: int = 500,
        retry_after: float | str | None = None,
        message: str | None = None,
        body: str | None = None,
        seconds: float = 0.0,
        chunks: int = 0,
        interval: float = 0.1,
        jitter: float = 0.0,
    ) -> None:
        """Arm a fault for the next `times` requests (None: until cleared); see the docstring."""
        fault = _Fault(
            kind=kind,
            times=times,
            path=path,
            code=code,
            retry_after=None if retry_after is None else str(retry_after),
            message=message,
            body=body,
            seconds=seconds,
            chunks=chunks,
            interval=interval,
            jitter=jitter,
        )
        with self._lock:
            self._faults[kind] = fault

    def _take_faults(self, path: str) -> dict[FaultKind, _Fault]:
        taken: dict[FaultKind, _Fault] = {}
        with self._lock:
            for kind, fault in list(self._faults.items()):
                if fault.path is not None and fault.path != path:
                    continue
                taken[kind] = fault
                if fault.times is not None:
                    fault.times -= 1
                    if fault.times <= 0:
                        del self._faults[kind]
        return taken

    # -- ASGI -----------------------------------------------------------------------------

    async def _app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        raw = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            raw += message.get("body", b"")
            if not message.get("more_body"):
                break
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        path = scope["path"]
        with self._lock:
            self._requests.append(
                RecordedRequest(scope["method"], path, headers, body, time.monotonic())
            )
        faults = self._take_faults(path)

        complete = False

        async def tracked_send(message: Message) -> None:
            nonlocal complete
            if message["type"] == "http.response.body" and not message.get("more_body"):
                complete = True
            await send(message)

        async def wait_for_disconnect() -> None:
            # Once the request body is read, receive() returns only at disconnect (or when
            # the response is complete, which `complete` tells apart).
            while (await receive())["type"] != "http.disconnect":
                pass

        handler = asyncio.ensure_future(
            self._respond(
                scope["method"], path, headers, body, faults, tracked_send, scope.get("client")
            )
        )
        watcher = asyncio.ensure_future(wait_for_disconnect())
        try:
            await asyncio.wait({handler, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not handler.done() and not complete:
                with self._lock:
                    self._disconnects.append(Disconnect(path, time.monotonic()))
                    self._lock.notify_all()
                handler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await handler
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    async def _respond(
        self,
        method: str,
        path: str,
        headers: dict[str, str],
        body: Any,
        faults: dict[FaultKind, _Fault],
        send: Send,
        peer: tuple[str, int] | None = None,
    ) -> None:
        if (fault := faults.get("latency")) is not None:
            await asyncio.sleep(max(0.0, fault.seconds + self._jitter(fault.jitter)))
        if (fault := faults.get("stall_before_headers")) is not None:
            await asyncio.sleep(fault.seconds)
        if (fault := faults.get("reset")) is not None and fault.chunks <= 0:
            await self._reset(peer)
            return
        if (fault := faults.get("status")) is not None:
            extra = [] if fault.retry_after is None else [("retry-after", fault.retry_after)]
            if fault.body is not None:
                payload = fault.body.encode()
                content_type = "text/plain; charset=utf-8"
            else:
                message = fault.message or f"fake upstream error {fault.code}"
                payload = _error_body(message, "server_error")
                content_type = "application/json"
            await self._emit(send, fault.code, content_type, [payload], faults, extra, peer)
            return
        try:
            status, content_type, chunks = self._route(method, path, headers, body)
        except _HTTPError as exc:
            status, content_type = exc.status, "application/json"
            chunks = [_error_body(exc.message, exc.error_type)]
        await self._emit(send, status, content_type, chunks, faults, self.response_headers, peer)

    async def _reset(self, peer: tuple[str, int] | None) -> None:
        """Reset the connection of `peer`: RST instead of FIN, as a crashed or killed peer does."""
        server = self._server
        connections = [] if server is None else list(server.server_state.connections)
        # ASGI does not expose the socket; uvicorn's protocol objects carry the peer address
        # and transport of each open connection.
        for connection in connections:
            if getattr(connection, "client", None) == peer:
                transport = connection.transport
                transport.get_extra_info("socket").setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
                transport.abort()
                break
        else:
            raise RuntimeError(f"fake upstream: no open connection from {peer} to reset")
        # uvicorn learns of the loss on the next loop turn; after that it sends nothing more.
        await asyncio.sleep(0)

    def _jitter(self, jitter: float) -> float:
        with self._lock:
            return self._random.uniform(-jitter, jitter)

    async def _emit(
        self,
        send: Send,
        status: int,
        content_type: str,
        chunks: list[bytes],
        faults: dict[FaultKind, _Fault],
        extra_headers: Iterable[tuple[str, str]],
        peer: tuple[str, int] | None = None,
    ) -> None:
        response_headers = [(b"content-type", content_type.encode())]
        response_headers += [(k.encode(), v.encode()) for k, v in extra_headers]
        await send({"type": "http.response.start", "status": status, "headers": response_headers})
        stall = faults.get("stall_after_chunks")
        close = faults.get("close_mid_stream")
        reset = faults.get("reset")
        drip = faults.get("drip")
        for index, chunk in enumerate(chunks):
            if close is not None and index == close.chunks:
                return  # uvicorn closes the connection: the response never completes
            if reset is not None and index == reset.chunks:
                await self._reset(peer)
                return
            if stall is not None and index == stall.chunks:
                await asyncio.sleep(stall.seconds)
            if drip is not None:
                for byte in chunk:
                    await send(
                        {"type": "http.response.body", "body": bytes([byte]), "more_body": True}
                    )
                    await asyncio.sleep(drip.interval)
            else:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        if close is not None and close.chunks >= len(chunks):
            return
        if reset is not None and reset.chunks >= len(chunks):
            await self._reset(peer)
            return
        if stall is not None and stall.chunks >= len(chunks):
            await asyncio.sleep(stall.seconds)
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    # -- endpoints ------------------------------------------------------------------------

    def _route(
        self, method: str, path: str, headers: dict[str, str], body: Any
    ) -> tuple[int, str, list[bytes]]:
        if self.api_key is not None and headers.get("authorization") != f"Bearer {self.api_key}":
            sent = headers.get("authorization", "").removeprefix("Bearer ")
            raise _HTTPError(401, f"Incorrect API key provided: {sent!r}.", "authentication_error")
        endpoints = {
            ("POST", "/v1/chat/completions"): self._chat,
            ("POST", "/v1/completions"): self._completions,
            ("POST", "/v1/embeddings"): self._embeddings,
        }
        if (method, path) == ("GET", "/v1/models"):
            data = [
                {"id": m, "object": "model", "created": 0}
                | ({} if self.owned_by is None else {"owned_by": self.owned_by})
                for m in self.models
            ]
            return 200, "application/json", self._json({"object": "list", "data": data})
        endpoint = endpoints.get((method, path))
        if endpoint is None:
            raise _HTTPError(404, f"no route {method} {path}", "not_found_error")
        if not isinstance(body, dict):
            raise _HTTPError(400, "the body must be a JSON object")
        if not isinstance(body.get("model"), str) or not body["model"]:
            raise _HTTPError(400, "you must provide a model parameter")
        return endpoint(body)

    def _next_id(self, prefix: str) -> str:
        with self._lock:
            self._counter += 1
            return f"{prefix}-fake-{self._counter}"

    @staticmethod
    def _json(payload: Any) -> list[bytes]:
        data = json.dumps(payload).encode()
        third = max(1, len(data) // 3)
        return [data[:third], data[third : 2 * third], data[2 * third :]]

    @staticmethod
    def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }

    def _chat(self, body: dict[str, Any]) -> tuple[int, str, list[bytes]]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _HTTPError(400, "messages must be a non-empty array")
        if not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
            raise _HTTPError(400, "each message needs a role")
        answer = answer_chat(messages)
        usage = self._usage(
            sum(_tokens(_text(m.get("content"))) for m in messages), _tokens(answer)
        )
        head = {
            "id": self._next_id("chatcmpl"),
            "created": CREATED,
            "model": body["model"],
            "system_fingerprint": "fake",
        }
        if not body.get("stream"):
            choices = self._chat_choices(body, messages, answer)
            usage["completion_tokens"] = sum(_tokens(c["message"]["content"]) for c in choices)
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
            payload = {**head, "object": "chat.completion", "choices": choices, "usage": usage}
            return 200, "application/json", self._json(payload)
        head["object"] = "chat.completion.chunk"

        def chunk(delta: dict[str, Any], finish: str | None) -> bytes:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return _sse({**head, "choices": [choice]})

        events = [chunk({"role": "assistant", "content": ""}, None)]
        events += [chunk({"content": piece}, None) for piece in _pieces(answer)]
        events.append(chunk({}, "stop"))
        return 200, "text/event-stream", self._finish_stream(body, head, usage, events)

    def _chat_choices(
        self, body: dict[str, Any], messages: list[Any], answer: str
    ) -> list[dict[str, Any]]:
        n = body.get("n")
        count = min(n, 128) if isinstance(n, int) and n >= 1 and self.n_enabled else 1
        temperature = body.get("temperature")
        sampled = (
            isinstance(temperature, int | float)
            and temperature > 0
            and ("n" in body or "seed" in body)
        )
        want_logprobs = body.get("logprobs") is True and self.logprobs_enabled
        top = body.get("top_logprobs")
        top = top if isinstance(top, int) and top >= 0 else 0
        dist = answer_distribution(messages) if (sampled or want_logprobs) else []
        choices = []
        for index in range(count):
            text = sample_answer(messages, body.get("seed"), index) if sampled else answer
            choices.append(
                {
                    "index": index,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": (
                        {"content": _token_logprobs(text, dist, top), "refusal": None}
                        if want_logprobs
                        else None
                    ),
                    "finish_reason": "stop",
                }
            )
        return choices

    def _completions(self, body: dict[str, Any]) -> tuple[int, str, list[bytes]]:
        prompt = body.get("prompt")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise _HTTPError(400, "prompt must be a string or an array of strings")
        answers = [answer_completion(p) for p in prompts]
        usage = self._usage(sum(map(_tokens, prompts)), sum(map(_tokens, answers)))
        head = {"id": self._next_id("cmpl"), "created": CREATED, "model": body["model"]}
        head["object"] = "text_completion"
        if not body.get("stream"):
            choices = [
                {"index": i, "text": a, "logprobs": None, "finish_reason": "stop"}
                for i, a in enumerate(answers)
            ]
            return 200, "application/json", self._json({**head, "choices": choices, "usage": usage})

        def chunk(index: int, text: str, finish: str | None) -> bytes:
            choice = {"index": index, "text": text, "logprobs": None, "finish_reason": finish}
            return _sse({**head, "choices": [choice]})

        events = [chunk(i, piece, None) for i, a in enumerate(answers) for piece in _pieces(a)]
        events += [chunk(i, "", "stop") for i in range(len(answers))]
        return 200, "text/event-stream", self._finish_stream(body, head, usage, events)

    @staticmethod
    def _finish_stream(
        body: dict[str, Any], head: dict[str, Any], usage: dict[str, int], events: list[bytes]
    ) -> list[bytes]:
        options = body.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage"):
            events.append(_sse({**head, "choices": [], "usage": usage}))
        events.append(b"data: [DONE]\n\n")
        return events

    def _embeddings(self, body: dict[str, Any]) -> tuple[int, str, list[bytes]]:
        given = body.get("input")
        texts = [given] if isinstance(given, str) else given
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise _HTTPError(400, "input must be a string or a non-empty array of strings")
        dim = body.get("dimensions") or self.embedding_dim
        if not isinstance(dim, int) or dim < 1:
            raise _HTTPError(400, "dimensions must be a positive integer")
        as_base64 = body.get("encoding_format") == "base64"
        data = []
        for index, text in enumerate(texts):
            vector = embed_text(text, dim)
            embedding: Any = vector
            if as_base64:
                embedding = base64.b64encode(struct.pack(f"<{dim}f", *vector)).decode()
            data.append({"object": "embedding", "index": index, "embedding": embedding})
        tokens = sum(map(_tokens, texts))
        payload = {
            "object": "list",
            "data": data[::-1],  # reversed on purpose: clients must sort by index
            "model": body["model"],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        return 200, "application/json", self._json(payload)
