"""Contracts of the retrieval layer: text -> vectors -> nearest ids."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
from numpy.typing import NDArray


class Embedder(Protocol):
    """Turns texts into L2-normalised float32 vectors.

    `name` and `dim` are stored with every pool; a pool embedded with one embedder is never
    searched with another. `embed` returns an array of shape (len(texts), dim), row i the
    embedding of texts[i], each row of unit L2 norm. It is called from worker threads and must
    be safe to call from one thread at a time at least (callers serialise if needed).
    """

    @property
    def name(self) -> str: ...

    @property
    def dim(self) -> int: ...

    def embed(self, texts: Sequence[str]) -> NDArray[np.float32]: ...


class LoneEmbedder(Embedder, Protocol):
    """An `Embedder` with a faster path for one text while nothing else is being served.

    `embed_alone(text)` returns what `embed([text])[0]` returns (within the embedder's
    numerical tolerance). It may spend CPU that would be wasted under load, so callers use it
    only when their request is the only one in flight (see `embed_query`).
    """

    def embed_alone(self, text: str) -> NDArray[np.float32]: ...


def embed_query(embedder: Embedder, text: str, *, alone: bool = False) -> NDArray[np.float32]:
    """`text`'s vector, shape (dim,); through `embed_alone` when `alone` and the embedder
    has it."""
    # Not isinstance(): a runtime protocol check would read `dim`, which loads some models.
    embed_alone = getattr(embedder, "embed_alone", None) if alone else None
    vector: NDArray[np.float32] = (
        embed_alone(text) if embed_alone is not None else embedder.embed([text])[0]
    )
    return vector


class VectorIndex(Protocol):
    """An inner-product index over unit vectors, addressed by int64 ids.

    `search` returns (scores, ids), each (nq, n), best first; rows are padded with id -1 and
    score -inf when the index holds fewer than n vectors. Ties in score are broken by
    ascending id so that every implementation returns the same ranking.
    """

    def search(
        self, vectors: NDArray[np.float32], n: int
    ) -> tuple[NDArray[np.float32], NDArray[np.int64]]: ...

    def add(self, ids: NDArray[np.int64], vectors: NDArray[np.float32]) -> None: ...

    def remove(self, ids: NDArray[np.int64]) -> int: ...

    def count(self) -> int: ...
