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
