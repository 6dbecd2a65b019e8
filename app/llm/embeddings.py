"""An `Embedder` backed by a remote OpenAI-compatible `/v1/embeddings` endpoint.

Synchronous on purpose: `Embedder.embed` is called from worker threads (uploads, query
embedding via `anyio.to_thread`), so a blocking `httpx.Client` fits the contract and keeps
the event loop out of it.
"""

from __future__ import annotations

import email.utils
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any, Final

import httpx
import numpy as np
from numpy.typing import NDArray

from app.llm.transport import CookielessClient

__all__ = ["EmbeddingServiceError", "OpenAIEmbedder"]

logger = logging.getLogger("iclserve.upstream")

_MAX_RETRIES: Final = 3
_MAX_RETRY_WAIT: Final = 10.0
_BACKOFF_BASE: Final = 0.5
_MAX_MESSAGE_CHARS: Final = 300


class EmbeddingServiceError(RuntimeError):
    """The embedding service failed or answered something unusable.

    The message is ours (status, what went wrong, at most a truncated upstream `message`
    with the key redacted); it never carries the key or a whole upstream body.
    """


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


class OpenAIEmbedder:
    """Embeds texts with a remote OpenAI-compatible `/embeddings` endpoint.

    Implements `retrievers.base.Embedder`: `name` is `"openai:<model>"`, `dim` the vector
    size (given, or probed by `open()` with one call), and `embed(texts)` returns a float32
    array of shape (len(texts), dim) whose rows are L2-normalised (a zero vector from the
    service stays zero). Texts go out in batches of `batch_size`; results are put back in
    input order by their `index`. Connect errors, read errors, 429 and 5xx are retried a few
    times with backoff (Retry-After honoured up to 10 s). Every failure raises
    `EmbeddingServiceError`.

    Construction stores arguments only; the HTTP client is made by `open()` (or lazily by
    the first `embed`). Safe to call from several threads: calls are serialised.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        timeout: float = 60.0,
        batch_size: int = 64,
        dim: int | None = None,
        *,
        transport: httpx.BaseTransport | None = None,
        max_retries: int = _MAX_RETRIES,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.name = f"openai:{model}"
        self.dim = dim or 0  # 0 until open() has probed it
        self._api_key = api_key or ""
        self._timeout = timeout
        self._batch_size = batch_size
        self._transport = transport
        self._max_retries = max_retries
        self._client: httpx.Client | None = None
        self._lock = threading.RLock()

    def open(self) -> OpenAIEmbedder:
        """Create the HTTP client and, when `dim` was not given, probe it with one call."""
        with self._lock:
            if self._client is None:
                headers = {"User-Agent": "iclserve"}
                if self._api_key:
                    headers["Authorization"] = f"Bearer {self._api_key}"
                self._client = CookielessClient(
                    base_url=self.base_url,
                    headers=headers,
                    timeout=httpx.Timeout(self._timeout),
                    follow_redirects=False,
                    transport=self._transport,
                )
            if not self.dim:
                try:
                    self.dim = int(self._request(["dimension probe"]).shape[1])
                except BaseException:
                    self.close()  # a failed open() leaves nothing open
                    raise
        return self

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    def embed(self, texts: Sequence[str]) -> NDArray[np.float32]:
        with self._lock:
            self.open()
            if not texts:
                return np.zeros((0, self.dim), dtype=np.float32)
            parts = [
                self._request(list(texts[start : start + self._batch_size]))
                for start in range(0, len(texts), self._batch_size)
            ]
        vectors = np.concatenate(parts, axis=0)
        if vectors.shape[1] != self.dim:
            raise EmbeddingServiceError(
                f"embedding service returned {vectors.shape[1]}-dimensional vectors, "
                f"expected {self.dim}"
            )
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        # Zero rows stay zero rather than becoming NaN.
        return (vectors / np.where(norms > 0, norms, 1.0)).astype(np.float32, copy=False)

    def _request(self, batch: list[str]) -> NDArray[np.float32]:
        payload = self._post({"model": self.model, "input": batch})
        return self._parse(payload, len(batch))

    def _post(self, body: dict[str, Any]) -> Any:
        assert self._client is not None
        waited = 0.0
        cause: BaseException | None = None
        for attempt in range(self._max_retries + 1):
            retry_after: float | None = None
            try:
                response = self._client.post("/embeddings", json=body)
            except httpx.TimeoutException as exc:
                error = EmbeddingServiceError(
                    f"embedding service timed out after {self._timeout:g}s"
                )
                if not isinstance(exc, httpx.ConnectTimeout):
                    raise error from exc
                cause = exc
            except (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError) as exc:
                error = EmbeddingServiceError(
                    f"embedding service unreachable ({type(exc).__name__})"
                )
                cause = exc
            except httpx.HTTPError as exc:
                raise EmbeddingServiceError(
                    f"embedding request failed ({type(exc).__name__})"
                ) from exc
            else:
                status = response.status_code
                if status == 200:
                    try:
                        return response.json()
                    except ValueError as exc:
                        raise EmbeddingServiceError(
                            "embedding service returned invalid JSON"
                        ) from exc
                if status == 429 or status >= 500:
                    error = EmbeddingServiceError(f"embedding service returned HTTP {status}")
                    retry_after = _retry_after(response.headers.get("retry-after"))
                    cause = None
                else:
                    raise self._rejection(response)
            if attempt >= self._max_retries:
                break
            wait = retry_after if retry_after is not None else _BACKOFF_BASE * 2**attempt
            if waited + wait > _MAX_RETRY_WAIT:
                break
            logger.info("embedding service: retry %d in %.2fs (%s)", attempt + 1, wait, error)
            time.sleep(wait)
            waited += wait
        raise error from cause

    def _rejection(self, response: httpx.Response) -> EmbeddingServiceError:
        status = response.status_code
        if status in (401, 403):
            return EmbeddingServiceError(f"embedding service authentication failed (HTTP {status})")
        message = ""
        try:
            error = response.json().get("error")
            if isinstance(error, dict) and isinstance(error.get("message"), str):
                message = error["message"]
        except (ValueError, AttributeError):
            pass
        if self._api_key:
            message = message.replace(self._api_key, "[redacted]")
        message = message[:_MAX_MESSAGE_CHARS]
        detail = f": {message}" if message else ""
        return EmbeddingServiceError(
            f"embedding service rejected the request (HTTP {status}){detail}"
        )

    def _parse(self, payload: Any, expected: int) -> NDArray[np.float32]:
        data = payload.get("data") if isinstance(payload, dict) else None
        if not isinstance(data, list) or len(data) != expected:
            raise EmbeddingServiceError(
                f"embedding service returned {len(data) if isinstance(data, list) else 'no'} "
                f"vectors for {expected} texts"
            )
        try:
            ordered = sorted(data, key=lambda item: int(item["index"]))
            vectors = np.asarray([item["embedding"] for item in ordered], dtype=np.float32)
        except (KeyError, TypeError, ValueError) as exc:
            raise EmbeddingServiceError("embedding service returned malformed vectors") from exc
        indexes = [int(item["index"]) for item in ordered]
        if indexes != list(range(expected)):
            raise EmbeddingServiceError("embedding service returned wrong vector indexes")
        if vectors.ndim != 2 or vectors.shape[1] == 0 or not np.isfinite(vectors).all():
            raise EmbeddingServiceError("embedding service returned malformed vectors")
        return vectors
