"""An OpenAI-compatible chat upstream on 127.0.0.1 whose answers a test scripts.

`ScriptedUpstream(answer)` serves `POST /v1/chat/completions` (non-streaming) and
`GET /v1/models` with the standard library's threading HTTP server. `answer(model, messages)`
returns the assistant text; `usage.prompt_tokens` counts whitespace-separated words of every
message. Every chat request body is kept in `requests`.

Where `FakeUpstream` models a reader of demonstrations, this one lets a test pin the model's
behaviour exactly (an answer key, a constant answer) to check what is measured about it.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

__all__ = ["Answer", "ScriptedUpstream"]

Answer = Callable[[str, list[dict[str, Any]]], str]


class ScriptedUpstream:
    def __init__(self, answer: Answer, models: tuple[str, ...] = ("scripted",)) -> None:
        self.answer = answer
        self.models = models
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def chat_calls(self) -> int:
        with self._lock:
            return len(self.requests)

    def __enter__(self) -> ScriptedUpstream:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

            def _send(self, status: int, payload: Any) -> None:
                raw = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def do_GET(self) -> None:
                if self.path.rstrip("/") == "/v1/models":
                    data = [{"id": m, "object": "model", "owned_by": "test"} for m in owner.models]
                    self._send(200, {"object": "list", "data": data})
                else:
                    self._send(404, {"error": {"message": "not found", "type": "not_found"}})

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                if self.path != "/v1/chat/completions" or body.get("stream"):
                    self._send(400, {"error": {"message": "unsupported", "type": "invalid"}})
                    return
                with owner._lock:
                    owner.requests.append(body)
                messages = body.get("messages") or []
                text = owner.answer(str(body.get("model")), messages)
                words = sum(len(str(m.get("content", "")).split()) for m in messages)
                self._send(
                    200,
                    {
                        "id": f"chatcmpl-{len(owner.requests)}",
                        "object": "chat.completion",
                        "created": 1_700_000_000,
                        "model": body.get("model"),
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": text},
                                "finish_reason": "stop",
                            }
                        ],
                        "usage": {
                            "prompt_tokens": words,
                            "completion_tokens": len(text.split()),
                            "total_tokens": words + len(text.split()),
                        },
                    },
                )

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._server is not None and self._thread is not None
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)
