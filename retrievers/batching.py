"""Micro-batching of concurrent query embeddings.

A forward pass over 16 short queries costs far less than 16 passes over one: the weights are
read once and the matrix products are wider. Under load many requests want an embedding at
the same moment, so they are run together. Nothing waits on purpose: one thread embeds
whatever has queued up while the previous batch ran, so a lone request sees no added delay.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

from retrievers.base import Embedder, embed_query


class _Pending:
    __slots__ = ("done", "error", "result", "texts")

    def __init__(self, texts: list[str]) -> None:
        self.texts = texts
        self.done = False
        self.result: NDArray[np.float32] | None = None
        self.error: BaseException | None = None


class BatchingEmbedder:
    """An `Embedder` that runs concurrent `embed` calls through `inner` as shared batches.

    Same `name`, `dim` and output as `inner` (row i of a call is the embedding of its text
    i). Callers block until their rows are ready. Calls that arrive while a batch runs are
    joined into the next one, oldest first, up to `max_batch` texts (a single call larger
    than that runs alone). An error in a batch is raised in every call of that batch.

    The batches run on the callers' own threads: whichever waiting caller finds no batch
    running takes the queue's head and runs it. There is no background thread to start or
    stop, and a lone call runs at once on its own thread.
    """

    def __init__(self, inner: Embedder, max_batch: int = 32) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be positive")
        self.inner = inner
        self.max_batch = max_batch
        self.name = inner.name
        self.batches = 0
        self.texts = 0
        self._cond = threading.Condition()
        self._queue: deque[_Pending] = deque()
        self._running = False

    @property
    def dim(self) -> int:
        return self.inner.dim

    def embed(self, texts: Sequence[str]) -> NDArray[np.float32]:
        mine = _Pending(list(texts))
        if not mine.texts:
            return np.empty((0, self.dim), dtype=np.float32)
        with self._cond:
            self._queue.append(mine)
            while not mine.done:
                if self._running:
                    self._cond.wait()
                    continue
                self._running = True
                batch = self._take_locked()
                self._cond.release()
                try:
                    self._run(batch)
                finally:
                    self._cond.acquire()
                    self._running = False
                    self._cond.notify_all()
        if mine.error is not None:
            raise mine.error
        assert mine.result is not None
        return mine.result

    def embed_alone(self, text: str) -> NDArray[np.float32]:
        """A caller that is the only request in flight has nobody to share a batch with: its
        text goes straight to `inner`'s lone path, as a batch of one."""
        vector = np.asarray(embed_query(self.inner, text, alone=True), dtype=np.float32)
        if vector.shape != (self.dim,):
            raise RuntimeError(f"{self.inner.name} returned shape {vector.shape} for one text")
        with self._cond:
            self.batches += 1
            self.texts += 1
        return vector

    def _take_locked(self) -> list[_Pending]:
        batch = [self._queue.popleft()]
        size = len(batch[0].texts)
        while self._queue and size + len(self._queue[0].texts) <= self.max_batch:
            item = self._queue.popleft()
            size += len(item.texts)
            batch.append(item)
        return batch

    def _run(self, batch: list[_Pending]) -> None:
        """Embed `batch`; fills in every item's result or error (never raises)."""
        texts = [t for item in batch for t in item.texts]
        try:
            vectors = np.asarray(self.inner.embed(texts), dtype=np.float32)
            if vectors.shape != (len(texts), self.dim):
                raise RuntimeError(
                    f"{self.inner.name} returned shape {vectors.shape} for {len(texts)} texts"
                )
        except BaseException as exc:
            with self._cond:
                for item in batch:
                    item.error, item.done = exc, True
            return
        with self._cond:
            self.batches += 1
            self.texts += len(texts)
            start = 0
            for item in batch:
                item.result = vectors[start : start + len(item.texts)].copy()
                item.done = True
                start += len(item.texts)
