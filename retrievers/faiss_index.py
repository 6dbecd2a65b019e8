"""Exact inner-product search with FAISS: the default `VectorIndex`."""

from __future__ import annotations

from typing import Any

import faiss
import numpy as np
from numpy.typing import ArrayLike, NDArray

from retrievers.exact import (
    PAD_ID,
    check_batch,
    check_ids,
    check_new_ids,
    check_vectors,
    empty_result,
    matrix_dim,
    rank_rows,
)

_EXTRA = 32
"""Results fetched past `n`, so that ties at the cut can be settled without a second scan."""

_MAX_EXTRA = 16_384
"""Widest a scan grows past `n` to settle ties at the cut (bounds memory per query)."""

PARALLEL_MIN_QUERIES = 16
"""Fewer queries than this are searched on the calling thread alone."""


def search_index(index: Any, queries: NDArray[np.float32], k: int, params: Any = None) -> Any:
    """`index.search(queries, k, params=params)`, single-threaded for a few queries.

    FAISS splits even one query's scan across its OpenMP threads. For the few short scans
    of a request, waking the sleeping workers costs more than the scan: 5 ms instead of
    0.8 ms for one query over 2,000 vectors on 2 cores. `omp_set_num_threads` sets the
    calling thread's own OpenMP setting, so other threads (a batch in a job) keep theirs.
    """
    if queries.shape[0] >= PARALLEL_MIN_QUERIES:
        return index.search(queries, k, params=params)
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        return index.search(queries, k, params=params)
    finally:
        faiss.omp_set_num_threads(before)


class FlatIPIndex:
    """Exact inner-product search: `faiss.IndexIDMap2(faiss.IndexFlatIP(dim))`.

    Follows the `VectorIndex` contract with the same ranking as `NumpyExactIndex`: FAISS
    scans in float32, then the candidates it returns are re-scored in float64 (rounded once
    to float32) and ordered by (descending score, ascending id). The scan fetches more than
    `n` and widens until no vector outside the fetched window can tie with or beat the n-th
    result within float32 rounding, so an exact tie at the cut also goes to the smaller id
    (unless more than 16,384 vectors tie at the cut; then the scores are still exact, but
    which of the tied ids are returned is FAISS's choice).
    Rows are padded with id -1 and score -inf. Ids are unique non-negative int64; adding an id
    that is already present is a ValueError.

    Thread safety: `search` and `search_subset` may run concurrently from many threads on an
    index that nobody mutates. `add` and `remove` must not overlap with anything else. The
    app therefore builds one index per pool version (`FlatIPIndex.build`) and never mutates
    an index that readers can reach; a new version gets a new index.
    FAISS parallelises a batch of queries with OpenMP across all cores; fewer than
    `PARALLEL_MIN_QUERIES` queries run on the calling thread (`search_index`).
    """

    def __init__(self, dim: int) -> None:
        if dim < 1:
            raise ValueError("dim must be positive")
        self.dim = dim
        self._index: Any = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        # Upper bound on stored vector norms; scales the float32 error bound used at the cut.
        self._max_norm = 0.0

    @classmethod
    def build(cls, ids: ArrayLike, vectors: ArrayLike) -> FlatIPIndex:
        """An index of dimension `vectors.shape[1]` holding `vectors` under `ids`."""
        index = cls(matrix_dim(vectors))
        index.add(*check_batch(ids, vectors, index.dim))
        return index

    def count(self) -> int:
        return int(self._index.ntotal)

    def add(self, ids: NDArray[np.int64], vectors: NDArray[np.float32]) -> None:
        new_ids, vecs = check_batch(ids, vectors, self.dim)
        if new_ids.size == 0:
            return
        existing = faiss.vector_to_array(self._index.id_map) if self.count() else new_ids[:0]
        check_new_ids(new_ids, existing)
        self._index.add_with_ids(vecs, new_ids)
        norms = np.sqrt(np.einsum("ij,ij->i", vecs, vecs, dtype=np.float64))
        self._max_norm = max(self._max_norm, float(norms.max()))

    def remove(self, ids: NDArray[np.int64]) -> int:
        gone = check_ids(ids)
        if gone.size == 0 or self.count() == 0:
            return 0
        return int(self._index.remove_ids(faiss.IDSelectorBatch(gone)))

    def search(
        self, vectors: NDArray[np.float32], n: int
    ) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
        return self._search(vectors, n, None)

    def search_subset(
        self, vectors: NDArray[np.float32], n: int, allowed_ids: NDArray[np.int64]
    ) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
        """`search` restricted to the ids in `allowed_ids` (unknown ids are ignored).

        The scan still touches every stored vector; only the ranking is restricted.
        """
        return self._search(vectors, n, check_ids(allowed_ids))

    def _search(
        self, vectors: NDArray[np.float32], n: int, allowed: NDArray[np.int64] | None
    ) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
        queries = check_vectors(vectors, self.dim)
        nq = queries.shape[0]
        total = self.count()
        if n <= 0 or nq == 0 or total == 0 or (allowed is not None and allowed.size == 0):
            return empty_result(nq, n)

        params = None
        selector = None
        if allowed is not None:
            # One SearchParameters per call: IndexIDMap swaps its selector in place while
            # searching, so sharing one between threads would race. `selector` stays bound
            # to a local because `params` does not keep the Python object alive.
            selector = faiss.IDSelectorBatch(allowed)
            params = faiss.SearchParameters()
            params.sel = selector

        # Bound on |float32 scan score - exact score| for these queries, plus one float32 ulp
        # of the result: the classic d*u error bound of a dot product, doubled for safety.
        query_norms = np.sqrt(np.einsum("ij,ij->i", queries, queries, dtype=np.float64))
        slack = (self.dim + 2) * 2.0**-23 * query_norms * self._max_norm

        first = min(total, n + _EXTRA)
        out_scores, out_ids, settled = self._scan(queries, n, first, params, slack)
        # Rare path (many vectors tied at the cut): widen one query at a time so that memory
        # stays bounded by one window.
        limit = min(total, n + _MAX_EXTRA)
        for row in np.flatnonzero(~settled):
            window = first
            while window < limit:
                window = min(limit, 2 * window)
                scores, ids, done = self._scan(
                    queries[row : row + 1], n, window, params, slack[row : row + 1]
                )
                out_scores[row], out_ids[row] = scores[0], ids[0]
                if done[0]:
                    break
        return out_scores, out_ids

    def _scan(
        self,
        queries: NDArray[np.float32],
        n: int,
        window: int,
        params: faiss.SearchParameters | None,
        slack: NDArray[np.float64],
    ) -> tuple[NDArray[np.float32], NDArray[np.int64], NDArray[np.bool_]]:
        """Top `n` of a FAISS scan of `window` results, re-scored; and whether each row is final.

        A row is final when FAISS returned everything there is, or when nothing outside the
        window can reach the n-th exact score: whatever FAISS left out scanned at most the
        window's last score, so it is at most that plus `slack` exactly.
        """
        scan_scores, scan_ids = search_index(self._index, queries, window, params)
        top_scores, top_ids = rank_rows(self._rescore(queries, scan_ids), scan_ids, n)
        exhausted = (scan_ids[:, -1] == PAD_ID) | (window >= self.count())
        below = scan_scores[:, -1].astype(np.float64) + slack < top_scores[:, -1]
        return top_scores, top_ids, exhausted | below

    def _rescore(self, queries: NDArray[np.float32], ids: NDArray[np.int64]) -> NDArray[np.float32]:
        """Float64 inner products of `queries` with the stored vectors `ids`, as float32."""
        scores = np.full(ids.shape, -np.inf, dtype=np.float32)
        rows, cols = np.nonzero(ids != PAD_ID)
        if rows.size:
            stored = self._index.reconstruct_batch(ids[rows, cols])
            dots = np.einsum("ij,ij->i", stored, queries[rows], dtype=np.float64)
            scores[rows, cols] = dots.astype(np.float32)
        return scores
