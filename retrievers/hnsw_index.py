"""Approximate inner-product search for large pools: FAISS HNSW with an exact re-rank.

A single-query exact scan reads every stored vector: 150 MB at 100k rows of 384 floats,
memory-bound at about 20 ms on a small server, and ten times that at 1M. A hierarchical
navigable small-world graph (built once, at publish time) visits a few thousand vectors per
query instead. Inverted files (IVF) were measured too: on sentence embeddings of short
reviews they needed a third of the clusters probed to reach recall@8 of 0.95, where HNSW
reaches it in well under a millisecond.

The candidates the graph finds are re-scored in float64 and ordered by (descending score,
ascending id), exactly as `FlatIPIndex` orders them, so the two differ only in which vectors
are found (recall), never in how found ones rank.
"""

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
from retrievers.faiss_index import search_index

_EXTRA = 32
"""Candidates fetched past `n` and re-ranked exactly, so that near-ties at the cut settle."""

DEFAULT_M = 32
DEFAULT_EF_CONSTRUCTION = 64
DEFAULT_EF_SEARCH = 256
"""Wide on purpose. Recall@8 against exact search, MiniLM, 300 held-out queries, default M and
build width: Rotten Tomatoes snippets (10,466 rows) 0.948 at 64, 0.982 at 128, 0.994 at 256;
BBC News (1,808) 0.991, 0.999, 1.000. Pools of near-duplicate texts reach their best at 32
already, which says little about real ones. After an idle spell 256 costs about 0.3 ms more
than 128 at 10k rows; `ICLSERVE_INDEX__HNSW_EF_SEARCH` trades it back where recall allows."""


class HNSWIPIndex:
    """Approximate inner-product search: `faiss.IndexIDMap2(faiss.IndexHNSWFlat)`.

    Follows the `VectorIndex` contract except that `search` may miss a true neighbour (its
    recall is measured by tests and benchmarks); what it returns is exact: float64 scores
    rounded once to float32, ordered by (descending score, ascending id), padded with id -1
    and score -inf. `search_subset` is exact: it scores the allowed vectors directly, since a
    graph walk restricted to a small subset would mostly find nothing.

    `ef_search` is the graph search's candidate list (wider: better recall, slower); a query
    for n results always searches at least n + 32 wide. HNSW cannot delete, so `remove`
    hides ids from results; the app never mutates a published index anyway.
    Thread safety as `FlatIPIndex`: concurrent searches on an index nobody mutates. A build
    inserts with all cores in parallel, so two builds may link the graph differently.
    """

    def __init__(
        self,
        dim: int,
        *,
        m: int = DEFAULT_M,
        ef_construction: int = DEFAULT_EF_CONSTRUCTION,
        ef_search: int = DEFAULT_EF_SEARCH,
    ) -> None:
        if dim < 1 or m < 2 or ef_construction < 1 or ef_search < 1:
            raise ValueError("dim, ef_construction and ef_search must be positive and m >= 2")
        self.dim = dim
        self.ef_search = ef_search
        self._graph: Any = faiss.IndexHNSWFlat(dim, m, faiss.METRIC_INNER_PRODUCT)
        self._graph.hnsw.efConstruction = ef_construction
        self._index: Any = faiss.IndexIDMap2(self._graph)
        self._ids = np.empty(0, dtype=np.int64)  # sorted, visible ids
        self._hidden = np.empty(0, dtype=np.int64)  # sorted, removed ids still in the graph
        self._nodes = 0  # graph nodes, stale ones included
        self._node_ids = np.empty(0, dtype=np.int64)  # the id of each graph node
        self._node_vectors = np.empty((0, dim), dtype=np.float32)  # the graph's own storage
        self._params: dict[int, Any] = {}  # SearchParametersHNSW by search width

    @classmethod
    def build(
        cls,
        ids: ArrayLike,
        vectors: ArrayLike,
        *,
        m: int = DEFAULT_M,
        ef_construction: int = DEFAULT_EF_CONSTRUCTION,
        ef_search: int = DEFAULT_EF_SEARCH,
    ) -> HNSWIPIndex:
        """An index of dimension `vectors.shape[1]` holding `vectors` under `ids`."""
        index = cls(matrix_dim(vectors), m=m, ef_construction=ef_construction, ef_search=ef_search)
        index.add(*check_batch(ids, vectors, index.dim))
        return index

    def count(self) -> int:
        return int(self._ids.size)

    def add(self, ids: NDArray[np.int64], vectors: NDArray[np.float32]) -> None:
        new_ids, vecs = check_batch(ids, vectors, self.dim)
        if new_ids.size == 0:
            return
        check_new_ids(new_ids, self._ids)
        # A removed id may come back: its old graph node stays, but the id map now reads
        # the new vector for it, and search drops the second sighting of an id.
        self._index.add_with_ids(vecs, new_ids)
        self._ids = np.union1d(self._ids, new_ids)
        self._hidden = np.setdiff1d(self._hidden, new_ids, assume_unique=True)
        self._nodes += new_ids.size
        self._node_ids = np.concatenate([self._node_ids, new_ids])
        # A view of the graph's flat storage, taken again after every add since the storage
        # may have moved; the graph (held by self) owns the memory.
        storage: Any = faiss.downcast_index(self._graph.storage)  # an IndexFlat
        self._node_vectors = faiss.rev_swig_ptr(storage.get_xb(), self._nodes * self.dim).reshape(
            self._nodes, self.dim
        )

    def remove(self, ids: NDArray[np.int64]) -> int:
        gone = np.intersect1d(check_ids(ids), self._ids)
        if gone.size:
            self._ids = np.setdiff1d(self._ids, gone, assume_unique=True)
            self._hidden = np.union1d(self._hidden, gone)
        return int(gone.size)

    def search(
        self, vectors: NDArray[np.float32], n: int
    ) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
        queries = check_vectors(vectors, self.dim)
        nq = queries.shape[0]
        if n <= 0 or nq == 0 or self.count() == 0:
            return empty_result(nq, n)
        stale = self._nodes - self.count()
        window = min(self._nodes, n + _EXTRA + stale)
        if stale:
            _, found = search_index(self._index, queries, window, self._params_for(window))
            found = np.where(np.isin(found, self._hidden), PAD_ID, found)
            found = _drop_repeats(found)
            return rank_rows(self._rescore(queries, found), found, n)
        # Every node is live (what the app builds): search the graph itself, map its node
        # numbers to ids and read their vectors in place. Going through the id map costs a
        # lookup and a copy per candidate, which on a small pool cost as much as the walk.
        _, nodes = search_index(self._graph, queries, window, self._params_for(window))
        missing = nodes < 0
        found = np.where(missing, PAD_ID, self._node_ids[nodes])
        exact = np.einsum("ijk,ik->ij", self._node_vectors[nodes], queries, dtype=np.float64)
        scores = exact.astype(np.float32)
        scores[missing] = -np.inf
        return rank_rows(scores, found, n)

    def _params_for(self, window: int) -> Any:
        # Made once per width: FAISS only reads them, so concurrent searches may share one.
        width = max(self.ef_search, window)
        params = self._params.get(width)
        if params is None:
            params = faiss.SearchParametersHNSW()  # type: ignore[attr-defined]  # not in stubs
            params.efSearch = width
            self._params[width] = params
        return params

    def search_subset(
        self, vectors: NDArray[np.float32], n: int, allowed_ids: NDArray[np.int64]
    ) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
        """Exact search over those ids in `allowed_ids` that are stored (others are ignored)."""
        queries = check_vectors(vectors, self.dim)
        nq = queries.shape[0]
        allowed = np.intersect1d(check_ids(allowed_ids), self._ids)
        if n <= 0 or nq == 0 or allowed.size == 0:
            return empty_result(nq, n)
        stored = self._index.reconstruct_batch(allowed).astype(np.float64)
        scores = (queries.astype(np.float64) @ stored.T).astype(np.float32)
        return rank_rows(scores, np.broadcast_to(allowed, scores.shape), n)

    def _rescore(self, queries: NDArray[np.float32], ids: NDArray[np.int64]) -> NDArray[np.float32]:
        scores = np.full(ids.shape, -np.inf, dtype=np.float32)
        rows, cols = np.nonzero(ids != PAD_ID)
        if rows.size:
            stored = self._index.reconstruct_batch(ids[rows, cols])
            dots = np.einsum("ij,ij->i", stored, queries[rows], dtype=np.float64)
            scores[rows, cols] = dots.astype(np.float32)
        return scores


def _drop_repeats(found: NDArray[np.int64]) -> NDArray[np.int64]:
    """Each row with later sightings of an id replaced by padding."""
    out = found.copy()
    for row in out:
        _, first = np.unique(row, return_index=True)
        repeat = np.ones(row.size, dtype=bool)
        repeat[first] = False
        row[repeat] = PAD_ID
    return out
