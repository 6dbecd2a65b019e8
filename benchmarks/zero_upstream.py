"""A minimal, fast, deterministic OpenAI-compatible fake upstream for the benchmarks.

Usage: .venv/bin/python benchmarks/zero_upstream.py --port P [--delay-ms D] [--host 127.0.0.1]

It prints "ready" on stdout once listening, and serves until SIGTERM or SIGINT:

  GET  /v1/models             one model, "bench"
  POST /v1/chat/completions   non-streaming JSON, or `stream: true` as SSE
  POST /v1/completions        the same for text completions

Every answer waits `--delay-ms` (asyncio timer; 0 = at once) and is derived from the prompt,
so it changes with the prompt: chat answers the first word of the last user message, followed
by the content of the assistant message just before it when there is one (with iclserve's
default `nearest_last` order, the label of the most similar demonstration); completions answer
the prompt's first word. `usage.prompt_tokens` counts whitespace-separated words of every
message (or of the prompt), `completion_tokens` those of the answer. A stream is a role chunk,
one chunk per answer word, a finish chunk (and a usage chunk if
`stream_options.include_usage`), then `data: [DONE]`, in chunked transfer encoding.

It is deliberately cheap per request, since it shares the CPU with the server under test:
an `asyncio.Protocol` (uvloop when installed) that parses HTTP/1.1 by hand (keep-alive,
Content-Length request bodies, one request at a time per connection, pipelining queued),
with no framework. Use `zero_upstream()` (yields the base URL, `http://127.0.0.1:P/v1`) or
`ZeroUpstream` (also the pid and its CPU time) to run it as a subprocess from a benchmark.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, cast

MODEL = "bench"
_MAX_HEAD = 64 * 1024
_MAX_BODY = 16 * 1024 * 1024
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}


def _words(content: Any) -> list[str]:
    if isinstance(content, str):
        return content.split()
    if isinstance(content, list):
        return [
            w
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
            for w in part["text"].split()
        ]
    return []


def chat_answer(messages: list[Any]) -> tuple[str, int]:
    """(answer, prompt_tokens) for a chat request; see the module docstring."""
    prompt_tokens = 0
    last_user = -1
    for i, message in enumerate(messages):
        if isinstance(message, dict):
            prompt_tokens += len(_words(message.get("content")))
            if message.get("role") == "user":
                last_user = i
    if last_user < 0:
        return "unknown", prompt_tokens
    words = _words(messages[last_user].get("content"))
    answer = words[0].strip(".,;:!?").lower() if words else "empty"
    previous = messages[last_user - 1] if last_user > 0 else None
    if isinstance(previous, dict) and previous.get("role") == "assistant":
        answer += " " + " ".join(_words(previous.get("content")))
    return answer.strip(), prompt_tokens


def _usage(prompt_tokens: int, answer: str) -> dict[str, int]:
    completion = len(answer.split())
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
    }


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _response(status: int, body: bytes, keep_alive: bool) -> bytes:
    head = (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        f"{'' if keep_alive else 'Connection: close' + chr(13) + chr(10)}\r\n"
    )
    return head.encode() + body


def _error(status: int, message: str, keep_alive: bool) -> bytes:
    body = _dumps({"error": {"message": message, "type": "invalid_request_error"}})
    return _response(status, body, keep_alive)


def _sse_chunks(events: list[dict[str, Any]]) -> list[bytes]:
    out = []
    for event in [*(b"data: " + _dumps(e) + b"\n\n" for e in events), b"data: [DONE]\n\n"]:
        out.append(b"%x\r\n%s\r\n" % (len(event), event))
    out.append(b"0\r\n\r\n")
    return out


def _stream_head(keep_alive: bool) -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
        b"Transfer-Encoding: chunked\r\n" + (b"" if keep_alive else b"Connection: close\r\n")
    ) + b"\r\n"


def handle(method: str, path: str, body: bytes, keep_alive: bool) -> list[bytes]:
    """The response bytes (one or more pieces) for one parsed request."""
    path = path.split("?", 1)[0]
    if path == "/v1/models":
        if method != "GET":
            return [_error(405, "use GET", keep_alive)]
        data = {"object": "list", "data": [{"id": MODEL, "object": "model", "created": 0}]}
        return [_response(200, _dumps(data), keep_alive)]
    if path not in ("/v1/chat/completions", "/v1/completions"):
        return [_error(404, f"no route {path}", keep_alive)]
    if method != "POST":
        return [_error(405, "use POST", keep_alive)]
    try:
        request = json.loads(body)
    except ValueError:
        return [_error(400, "body is not JSON", keep_alive)]
    if not isinstance(request, dict):
        return [_error(400, "body must be an object", keep_alive)]
    model = request.get("model") or MODEL
    chat = path == "/v1/chat/completions"
    if chat:
        messages = request.get("messages")
        if not isinstance(messages, list) or not messages:
            return [_error(400, "'messages' must be a non-empty list", keep_alive)]
        answer, prompt_tokens = chat_answer(messages)
    else:
        prompt = request.get("prompt")
        words = prompt.split() if isinstance(prompt, str) else []
        answer = words[0].lower() if words else "empty"
        prompt_tokens = len(words)
    usage = _usage(prompt_tokens, answer)
    if not request.get("stream"):
        if chat:
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": answer},
                "finish_reason": "stop",
            }
        else:
            choice = {"index": 0, "text": answer, "finish_reason": "stop"}
        answer_body = {
            "id": "zero-1",
            "object": "chat.completion" if chat else "text_completion",
            "created": 0,
            "model": model,
            "choices": [choice],
            "usage": usage,
        }
        return [_response(200, _dumps(answer_body), keep_alive)]
    base = {
        "id": "zero-1",
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": 0,
        "model": model,
    }
    events: list[dict[str, Any]] = []
    if chat:
        events.append({**base, "choices": [{"index": 0, "delta": {"role": "assistant"}}]})
    for i, word in enumerate(answer.split()):
        piece = word if i == 0 else " " + word
        if chat:
            choices: list[dict[str, Any]] = [{"index": 0, "delta": {"content": piece}}]
        else:
            choices = [{"index": 0, "text": piece}]
        events.append({**base, "choices": choices})
    done: dict[str, Any] = {"index": 0, "finish_reason": "stop"}
    if chat:
        done["delta"] = {}
    else:
        done["text"] = ""
    events.append({**base, "choices": [done]})
    options = request.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage"):
        events.append({**base, "choices": [], "usage": usage})
    return [_stream_head(keep_alive), *_sse_chunks(events)]


class _Connection(asyncio.Protocol):
    """One client connection: parse, answer (after the delay), then the next request."""

    def __init__(self, delay: float, stats: dict[str, int]) -> None:
        self._delay = delay
        self._stats = stats
        self._buf = bytearray()
        self._busy = False
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, hence the cast.
        self._transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if not self._busy:
            self._next()

    def _fail(self, status: int, message: str) -> None:
        if self._transport is not None:
            self._transport.write(_error(status, message, False))
            self._transport.close()

    def _next(self) -> None:
        """Answer every complete request in the buffer, one at a time."""
        while not self._busy and self._transport is not None:
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buf) > _MAX_HEAD:
                    self._fail(400, "request head too large")
                return
            lines = bytes(self._buf[:end]).decode("latin-1").split("\r\n")
            try:
                method, target, version = lines[0].split(" ", 2)
            except ValueError:
                self._fail(400, "bad request line")
                return
            keep_alive = version == "HTTP/1.1"
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(":")
                name = name.strip().lower()
                if name == "content-length":
                    try:
                        length = int(value)
                    except ValueError:
                        self._fail(400, "bad Content-Length")
                        return
                elif name == "connection":
                    token = value.strip().lower()
                    keep_alive = token != "close" and (keep_alive or token == "keep-alive")
                elif name == "transfer-encoding":
                    self._fail(400, "chunked request bodies are not supported")
                    return
            if length < 0 or length > _MAX_BODY:
                self._fail(400, "body too large")
                return
            total = end + 4 + length
            if len(self._buf) < total:
                return
            body = bytes(self._buf[end + 4 : total])
            del self._buf[:total]
            self._stats["requests"] += 1
            if self._delay > 0:
                self._busy = True
                loop = asyncio.get_running_loop()
                loop.call_later(self._delay, self._answer_later, method, target, body, keep_alive)
                return
            self._answer(method, target, body, keep_alive)

    def _answer(self, method: str, target: str, body: bytes, keep_alive: bool) -> None:
        if self._transport is None:
            return
        self._transport.writelines(handle(method, target, body, keep_alive))
        if not keep_alive:
            self._transport.close()

    def _answer_later(self, method: str, target: str, body: bytes, keep_alive: bool) -> None:
        self._busy = False
        self._answer(method, target, body, keep_alive)
        if keep_alive:
            self._next()


async def serve(host: str, port: int, delay_ms: float) -> dict[str, int]:
    """Serve until SIGTERM/SIGINT; returns the request count."""
    loop = asyncio.get_running_loop()
    stats = {"requests": 0}
    delay = delay_ms / 1000.0
    server = await loop.create_server(
        lambda: _Connection(delay, stats), host, port, reuse_address=True, backlog=1024
    )
    stop: asyncio.Future[None] = loop.create_future()

    def on_signal() -> None:
        if not stop.done():
            stop.set_result(None)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    print("ready", flush=True)
    async with server:
        await stop
    return stats


def _run(host: str, port: int, delay_ms: float) -> dict[str, int]:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(serve(host, port, delay_ms))
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(serve(host, port, delay_ms))


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of a process (Linux), in seconds."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class ZeroUpstream:
    """Run this file as a subprocess on a free port: `base_url`, `pid`, `cpu_seconds()`."""

    def __init__(self, delay_ms: float = 0.0, *, ready_timeout: float = 30.0) -> None:
        self.delay_ms = delay_ms
        self.ready_timeout = ready_timeout
        self.port = 0
        self.base_url = ""
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def cpu_seconds(self) -> float:
        return process_cpu_seconds(self.pid)

    def start(self) -> ZeroUpstream:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = int(sock.getsockname()[1])
        self._proc = subprocess.Popen(
            [
                sys.executable,
                str(Path(__file__).resolve()),
                "--port",
                str(self.port),
                "--delay-ms",
                str(self.delay_ms),
            ],
            stdout=subprocess.PIPE,
        )
        assert self._proc.stdout is not None
        # The child prints "ready" or exits (EOF); a child that hangs is killed by the timer,
        # which also ends the blocking readline.
        killer = threading.Timer(self.ready_timeout, self._proc.kill)
        killer.daemon = True
        killer.start()
        try:
            line = self._proc.stdout.readline()
        finally:
            killer.cancel()
        if line.strip() != b"ready":
            self.stop()
            raise RuntimeError(f"zero_upstream did not start (got {line!r})")
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        return self

    def stop(self) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._proc.stdout is not None:
            self._proc.stdout.close()

    def __enter__(self) -> ZeroUpstream:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


@contextlib.contextmanager
def zero_upstream(delay_ms: float = 0.0) -> Iterator[str]:
    """Start the fake upstream as a subprocess on a free port; yields its base URL (…/v1)."""
    with ZeroUpstream(delay_ms) as upstream:
        yield upstream.base_url


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay-ms", type=float, default=0.0, help="wait before each answer")
    args = parser.parse_args()
    if args.delay_ms < 0:
        parser.error("--delay-ms must be >= 0")
    stats = _run(args.host, args.port, args.delay_ms)
    print(f"# zero_upstream: served {stats['requests']} requests", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
