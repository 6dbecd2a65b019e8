"""kNN graphs over a pool's embeddings (ALGORITHMS.md 1.2), used by vote-k, IDEAL and MFL."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray


@dataclass(frozen=True, slots=True)
class KnnGraph:
    """The k nearest neighbours of every pool item, by position in pool order (0..N-1).

    `nbr[i]` holds the k items most similar to i, excluding i, in descending similarity with
    ties broken by the lower position; `sim[i]` their similarities. `voters_indptr` /
    `voters_indices` are the reverse adjacency in CSR form: the items v with u in nbr[v] are
    `voters_indices[voters_indptr[u]:voters_indptr[u+1]]`, in ascending v. `exact` tells
    whether the graph was built by exhaustive search; otherwise `recall` is the measured
    recall@k of the approximate graph against exact search on a sample of rows.
    """

    nbr: NDArray[np.int32]
    sim: NDArray[np.float32]
    voters_indptr: NDArray[np.int64]
    voters_indices: NDArray[np.int32]
    exact: bool
    recall: float | None = None

    @property
    def n(self) -> int:
        return int(self.nbr.shape[0])

    @property
    def k(self) -> int:
        return int(self.nbr.shape[1])
