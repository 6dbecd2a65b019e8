"""kNN graphs over a pool's embeddings (ALGORITHMS.md 1.2), used by vote-k, IDEAL and MFL.

Two builders share one canonical row rule, "the top-k by similarity excluding i, ties by lower
pool index": FAISS proposes k + 1 + margin candidates per row, then each row is re-ranked by
similarity recomputed in float64 from the float32 rows (so the order does not depend on how
sgemm blocked the sums) and by ascending position.

Threading: FAISS runs its searches and k-means with OpenMP on every core it sees; this module
never calls `faiss.omp_set_num_threads` (the process owner decides, e.g. the job worker). The
numba re-ranking and the reverse-adjacency counting sort are single-threaded.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np
from numpy.typing import NDArray

from selection.jit import njit

CENTER_BLOCK = 16_384
"""Rows centered per step (a 16,384 x 768 float64 block is 100 MB)."""

QUERY_BLOCK = 4096
"""Queries per FAISS search call: the distance block is QUERY_BLOCK * N floats."""

TIE_MARGIN = 8
"""Extra candidates fetched per row so that float32 ties at the k-th place, and self hiding
behind an exact duplicate, still leave k candidates for the float64 re-rank to order."""


GRAPH_EXACT_MAX_N = 50_000
"""Largest pool given an exact kNN graph by default. Measured on the 2-core machine
(benchmarks/subsets.py, d = 384): the exhaustive graph takes about 13 s at 30k and 150 s at
100k, the IVF graph about 50 s at 100k with recall@150 of 1.0 on clustered vectors."""


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

    def voters(self, u: int) -> NDArray[np.int32]:
        """The items that have `u` among their k nearest neighbours, ascending."""
        return self.voters_indices[self.voters_indptr[u] : self.voters_indptr[u + 1]]

    def in_degree(self) -> NDArray[np.int64]:
        """|voters(u)| for every u (the vote count of ALGORITHMS.md 2.4)."""
        return np.diff(self.voters_indptr)


ProgressFn = Callable[[int, int], object]
"""`progress(done_rows, total_rows)`, called after each block of rows; its result is ignored."""


def center_normalize(
    vectors: NDArray[np.floating[Any]],
) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """Centered-cosine rows (ALGORITHMS.md 0.2): `X = l2normalize(E - mean(E))`.

    Returns `(X, mean)` as float32; the mean (accumulated in float64) must be stored with the
    index because live queries are centered with the *pool* mean. A row that centers to
    exactly zero (e.g. a pool of one item, or identical rows) has no direction: it stays the
    zero vector, so its similarity to everything is 0 rather than NaN. Works in row blocks,
    so the extra memory is one float64 block, not a float64 copy of the pool.
    """
    e = np.asarray(vectors)
    if e.ndim != 2:
        raise ValueError(f"vectors must be 2-D, got shape {e.shape}")
    n, d = e.shape
    mean64 = e.mean(axis=0, dtype=np.float64) if n else np.zeros(d, dtype=np.float64)
    x = np.empty((n, d), dtype=np.float32)
    for b0 in range(0, n, CENTER_BLOCK):
        centered = e[b0 : b0 + CENTER_BLOCK].astype(np.float64) - mean64
        norms = np.linalg.norm(centered, axis=1, keepdims=True)
        # divide only where the norm is positive; zero rows keep their zeros
        np.divide(centered, norms, out=centered, where=norms > 0)
        x[b0 : b0 + CENTER_BLOCK] = centered
    return x, mean64.astype(np.float32)


def empty_graph(n: int) -> KnnGraph:
    """The graph of a pool with no neighbour to give (N <= 1): k = 0, nobody votes."""
    return KnnGraph(
        nbr=np.empty((n, 0), dtype=np.int32),
        sim=np.empty((n, 0), dtype=np.float32),
        voters_indptr=np.zeros(n + 1, dtype=np.int64),
        voters_indices=np.empty(0, dtype=np.int32),
        exact=True,
        recall=None,
    )


def build_knn_graph(
    X: NDArray[np.float32],
    k: int,
    *,
    exact_max_n: int = GRAPH_EXACT_MAX_N,
    nprobe: int = 32,
    target_recall: float = 0.95,
    recall_sample: int = 1000,
    seed: int = 0,
    progress: ProgressFn | None = None,
) -> KnnGraph:
    """The k-nearest-neighbour graph of the rows of `X` by inner product (ALGORITHMS.md 1.2).

    `X` must already be normalised in the flavour the caller wants (`center_normalize` for
    vote-k / IDEAL, plain unit rows for OpenICL); rows are pool positions.

    Row rule: `nbr[i]` = the top-k positions by similarity excluding i itself (removed by id,
    never by rank), in descending float64 similarity recomputed from `X`, ties by lower
    position; `sim` holds those similarities rounded to float32.

    * N <= exact_max_n: exhaustive FAISS search (`faiss.knn`, no index copy of `X`) in blocks
      of 4,096 queries; `exact=True`. Conformance L1 against a float64 brute force: rows can
      differ only where float32 search scores tie or nearly tie (< ~1e-5) at the k-th place
      beyond the margin of 8 extra candidates.
    * N > exact_max_n: `IndexIVFFlat` (inner product) with nlist = the power of two nearest
      4*sqrt(N) (capped so every list gets >= 39 training rows), k-means trained on
      min(N, 40*nlist) seeded rows; nprobe starts at `nprobe` and doubles (up to nlist) until
      the recall@k against exact search on `recall_sample` seeded rows reaches
      `target_recall`; `exact=False`, `recall` = that measured recall (L4). A row the
      probed lists cannot fill with k neighbours is searched exactly.

    k is clipped to N - 1; N <= 1 (or k clipped to 0) gives `empty_graph(N)`. `progress`
    is called as `progress(done_rows, N)` after each block of the full pass. Deterministic
    given `seed` and the FAISS thread count. Raises ValueError for k < 1 or a non-2-D `X`.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    xs = np.ascontiguousarray(X, dtype=np.float32)
    if xs.ndim != 2:
        raise ValueError(f"X must be 2-D, got shape {xs.shape}")
    n = int(xs.shape[0])
    k_eff = min(k, n - 1)
    if k_eff <= 0:
        return empty_graph(n)

    nbr = np.empty((n, k_eff), dtype=np.int32)
    sim = np.empty((n, k_eff), dtype=np.float32)
    if n <= exact_max_n:
        all_rows = np.arange(n, dtype=np.int64)
        _exact_rows(xs, all_rows, all_rows, k_eff, nbr, sim, progress, n)
        exact, recall = True, None
    else:
        recall = _ivf_rows(
            xs, k_eff, nbr, sim, nprobe, target_recall, recall_sample, seed, progress
        )
        exact = False
    indptr, indices = reverse_adjacency(nbr, n)
    return KnnGraph(
        nbr=nbr,
        sim=sim,
        voters_indptr=indptr,
        voters_indices=indices,
        exact=exact,
        recall=recall,
    )


def reverse_adjacency(
    nbr: NDArray[np.int32], n: int
) -> tuple[NDArray[np.int64], NDArray[np.int32]]:
    """CSR of `voters(u) = {v : u in nbr[v]}`, each list ascending in v (counting sort, O(N*k))."""
    nb = np.ascontiguousarray(nbr, dtype=np.int32)
    return _reverse_csr(nb, n)


def _search_width(k: int, n: int) -> int:
    return min(n, k + 1 + TIE_MARGIN)


def _exact_rows(
    xs: NDArray[np.float32],
    rows: NDArray[np.int64],
    dest: NDArray[np.int64],
    k: int,
    nbr_out: NDArray[np.int32],
    sim_out: NDArray[np.float32],
    progress: ProgressFn | None = None,
    total: int = 0,
) -> None:
    """Exact canonical rows for the query positions `rows`, written at output rows `dest`."""
    width = _search_width(k, xs.shape[0])
    for b0 in range(0, rows.shape[0], QUERY_BLOCK):
        q = rows[b0 : b0 + QUERY_BLOCK]
        _, ids = faiss.knn(xs[q], xs, width, metric=faiss.METRIC_INNER_PRODUCT)
        ids64 = np.ascontiguousarray(ids, dtype=np.int64)
        short = _rerank_rows(xs, q, ids64, k, dest[b0 : b0 + QUERY_BLOCK], nbr_out, sim_out)
        # an exhaustive search returns `width` real ids, so no row can run short here
        if short.shape[0]:
            raise RuntimeError("exhaustive search returned fewer than k neighbours")
        if progress is not None:
            progress(b0 + q.shape[0], total)


def _nlist_for(n: int) -> int:
    nlist = 1 << max(0, round(math.log2(4.0 * math.sqrt(n))))
    # FAISS wants >= 39 training points per centroid; a small pool gets fewer lists
    cap = max(1, n // 39)
    while nlist > cap:
        nlist //= 2
    return max(1, nlist)


def _ivf_rows(
    xs: NDArray[np.float32],
    k: int,
    nbr_out: NDArray[np.int32],
    sim_out: NDArray[np.float32],
    nprobe: int,
    target_recall: float,
    recall_sample: int,
    seed: int,
    progress: ProgressFn | None,
) -> float:
    """Fill every row from an IVF-Flat index; returns the measured recall@k of the sample."""
    n, d = xs.shape
    nlist = _nlist_for(n)
    rng = np.random.default_rng(seed)
    train_rows = np.sort(rng.choice(n, size=min(n, 40 * nlist), replace=False))
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed  # k-means initialisation draws from its own generator
    index.train(xs[train_rows])
    index.add(xs)

    sample = np.sort(rng.choice(n, size=min(n, max(1, recall_sample)), replace=False))
    sample = sample.astype(np.int64)
    local = np.arange(sample.shape[0], dtype=np.int64)
    exact_nbr = np.empty((sample.shape[0], k), dtype=np.int32)
    scratch_sim = np.empty((sample.shape[0], k), dtype=np.float32)
    _exact_rows(xs, sample, local, k, exact_nbr, scratch_sim)

    probe = max(1, min(nprobe, nlist))
    approx_nbr = np.empty_like(exact_nbr)
    while True:
        index.nprobe = probe
        _ivf_block(index, xs, sample, local, k, approx_nbr, scratch_sim)
        recall = _recall(approx_nbr, exact_nbr)
        if recall >= target_recall or probe >= nlist:
            break
        probe = min(2 * probe, nlist)

    for b0 in range(0, n, QUERY_BLOCK):
        rows = np.arange(b0, min(b0 + QUERY_BLOCK, n), dtype=np.int64)
        _ivf_block(index, xs, rows, rows, k, nbr_out, sim_out)
        if progress is not None:
            progress(b0 + rows.shape[0], n)
    return recall


def _ivf_block(
    index: faiss.IndexIVFFlat,
    xs: NDArray[np.float32],
    rows: NDArray[np.int64],
    dest: NDArray[np.int64],
    k: int,
    nbr_out: NDArray[np.int32],
    sim_out: NDArray[np.float32],
) -> None:
    """IVF search for the query positions `rows`, canonical rows written at `dest`."""
    width = _search_width(k, xs.shape[0])
    for b0 in range(0, rows.shape[0], QUERY_BLOCK):
        q = rows[b0 : b0 + QUERY_BLOCK]
        dq = dest[b0 : b0 + QUERY_BLOCK]
        _, ids = index.search(xs[q], width)
        short = _rerank_rows(
            xs, q, np.ascontiguousarray(ids, dtype=np.int64), k, dq, nbr_out, sim_out
        )
        if short.shape[0]:
            # the probed lists held fewer than k other items: search those rows exhaustively
            _exact_rows(xs, q[short], dq[short], k, nbr_out, sim_out)


def _recall(approx: NDArray[np.int32], exact: NDArray[np.int32]) -> float:
    """Mean over rows of |approx row ∩ exact row| / k."""
    hits = 0
    for a, e in zip(approx, exact, strict=True):
        hits += int(np.intersect1d(a, e, assume_unique=True).shape[0])
    return hits / float(exact.size)


@njit
def _rerank_rows(
    xs: NDArray[np.float32],
    rows: NDArray[np.int64],
    ids: NDArray[np.int64],
    k: int,
    dest: NDArray[np.int64],
    nbr_out: NDArray[np.int32],
    sim_out: NDArray[np.float32],
) -> NDArray[np.int64]:
    """Canonical top-k of each row's FAISS candidates; returns the indices of short rows.

    For query `rows[b]` the candidates `ids[b]` (-1 = none) minus the query itself are scored
    in float64 (float32 products are exact in float64, summed in a fixed order) and ordered
    by (descending score, ascending id). FAISS hands them over already sorted by float32
    score, so the insertion sort only repairs a few near-tie swaps (linear in practice).
    The k best go to `nbr_out[dest[b]]`, `sim_out[dest[b]]`.
    """
    nq, width = ids.shape
    d = xs.shape[1]
    cand_s = np.empty(width, dtype=np.float64)
    cand_i = np.empty(width, dtype=np.int64)
    short = np.empty(nq, dtype=np.int64)
    n_short = 0
    for b in range(nq):
        i = rows[b]
        m = 0
        for j in range(width):
            t = ids[b, j]
            if t < 0 or t == i:
                continue
            s = 0.0
            for c in range(d):
                s += np.float64(xs[i, c]) * np.float64(xs[t, c])
            # insertion step: shift worse entries right
            p = m
            while p > 0 and (cand_s[p - 1] < s or (cand_s[p - 1] == s and cand_i[p - 1] > t)):
                cand_s[p] = cand_s[p - 1]
                cand_i[p] = cand_i[p - 1]
                p -= 1
            cand_s[p] = s
            cand_i[p] = t
            m += 1
        if m < k:
            short[n_short] = b
            n_short += 1
            continue
        r = dest[b]
        for j in range(k):
            nbr_out[r, j] = np.int32(cand_i[j])
            sim_out[r, j] = np.float32(cand_s[j])
    return short[:n_short]


@njit
def _reverse_csr(nbr: NDArray[np.int32], n: int) -> tuple[NDArray[np.int64], NDArray[np.int32]]:
    """Counting sort of the edges v -> nbr[v, j] by target; scanning v upwards keeps each list
    ascending without a comparison sort and without an N*k int64 temporary."""
    rows, k = nbr.shape
    indptr = np.zeros(n + 1, dtype=np.int64)
    for v in range(rows):
        for j in range(k):
            indptr[nbr[v, j] + 1] += 1
    for u in range(n):
        indptr[u + 1] += indptr[u]
    cursor = indptr[:n].copy()
    indices = np.empty(rows * k, dtype=np.int32)
    for v in range(rows):
        for j in range(k):
            u = nbr[v, j]
            indices[cursor[u]] = np.int32(v)
            cursor[u] += 1
    return indptr, indices
