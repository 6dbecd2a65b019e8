"""An LRU cache of embeddings in front of any `Embedder`."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

from retrievers.base import Embedder, embed_query


class CachedEmbedder:
    """An `Embedder` that remembers the last `capacity` texts it embedded.

    Same `name` and `dim` as `inner`, same output. The key is the exact text (no
    normalisation: a different string may embed differently). `embed` looks every text up,
    sends the distinct misses to `inner` in one call, stores them, and returns the rows in
    input order in a fresh array; cached rows are read-only copies, so no caller can alter
    them. `capacity` 0 disables caching: every call goes straight to `inner`.

    `hits` and `misses` count looked-up texts (each occurrence in a call counts once; a text
    repeated within one call that missed is embedded once but counted as a miss each time).

    Thread safety: the cache and counters are guarded by a lock that is never held while
    `inner` runs, so hits are served while a miss embeds. Two threads missing the same text
    at once may both embed it; the second store wins and the rows are identical. `inner` is
    called concurrently in that case, so it must serialise itself if it needs to.
    """

    def __init__(self, inner: Embedder, capacity: int) -> None:
        if capacity < 0:
            raise ValueError("capacity must be >= 0")
        self.inner = inner
        self.capacity = capacity
        self.name = inner.name
        self.hits = 0
        self.misses = 0
        self._lock = threading.Lock()
        self._rows: OrderedDict[str, NDArray[np.float32]] = OrderedDict()

    # A property so that an inner embedder that loads lazily is not forced to load here.
    @property
    def dim(self) -> int:
        return self.inner.dim

    def __len__(self) -> int:
        with self._lock:
            return len(self._rows)

    def __contains__(self, text: object) -> bool:
        """Whether `text` is cached now (a peek: counters and recency are left alone)."""
        with self._lock:
            return self.capacity > 0 and text in self._rows

    def clear(self) -> None:
        """Forget every cached row; counters are kept."""
        with self._lock:
            self._rows.clear()

    def embed(self, texts: Sequence[str]) -> NDArray[np.float32]:
        return self._embed(texts, alone=False)

    def embed_alone(self, text: str) -> NDArray[np.float32]:
        """`embed([text])[0]`; a miss goes through the inner embedder's lone path."""
        row: NDArray[np.float32] = self._embed([text], alone=True)[0]
        return row

    def _embed(self, texts: Sequence[str], *, alone: bool) -> NDArray[np.float32]:
        if self.capacity == 0:
            with self._lock:
                self.misses += len(texts)
            return self._embed_inner(list(texts), alone=alone)

        out = np.empty((len(texts), self.dim), dtype=np.float32)
        missing: dict[str, list[int]] = {}
        with self._lock:
            for pos, text in enumerate(texts):
                row = self._rows.get(text)
                if row is None:
                    missing.setdefault(text, []).append(pos)
                    self.misses += 1
                else:
                    self._rows.move_to_end(text)
                    out[pos] = row
                    self.hits += 1
        if not missing:
            return out

        fresh = self._embed_inner(list(missing), alone=alone)
        for row, positions in zip(fresh, missing.values(), strict=True):
            out[positions] = row
        with self._lock:
            for text, row in zip(missing, fresh, strict=True):
                stored = row.copy()
                stored.flags.writeable = False
                self._rows[text] = stored
                self._rows.move_to_end(text)
            while len(self._rows) > self.capacity:
                self._rows.popitem(last=False)
        return out

    def _embed_inner(self, texts: list[str], *, alone: bool) -> NDArray[np.float32]:
        if alone and len(texts) == 1:
            vecs = np.asarray(embed_query(self.inner, texts[0], alone=True), dtype=np.float32)
            vecs = vecs.reshape(1, -1)
        else:
            vecs = np.asarray(self.inner.embed(texts), dtype=np.float32)
        if vecs.shape != (len(texts), self.dim):
            raise RuntimeError(
                f"{self.inner.name} returned shape {vecs.shape} for {len(texts)} texts"
            )
        return vecs
