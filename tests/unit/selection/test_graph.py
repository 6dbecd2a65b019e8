"""kNN graph builders against a float64 brute force (ALGORITHMS.md 1.2, 8.1)."""

from __future__ import annotations

import numpy as np
import pytest

from selection.graph import (
    KnnGraph,
    build_knn_graph,
    center_normalize,
    reverse_adjacency,
)

NEAR_TIE = 1e-5  # L1 threshold for float32 / FAISS sgemm (ALGORITHMS.md 0.4)


def brute_force(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k by float64 similarity excluding self, ties by lower index, and the full matrix."""
    x64 = x.astype(np.float64)
    s = x64 @ x64.T
    np.fill_diagonal(s, -np.inf)
    n = x.shape[0]
    order = np.lexsort((np.broadcast_to(np.arange(n), (n, n)), -s), axis=-1)
    return order[:, :k], s


def gaussian_pool(seed: int, n: int, d: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x, _ = center_normalize(rng.standard_normal((n, d)).astype(np.float32))
    return x


def check_reverse(graph: KnnGraph) -> None:
    n, k = graph.n, graph.k
    assert graph.voters_indptr.shape == (n + 1,)
    assert graph.voters_indptr[0] == 0 and graph.voters_indptr[-1] == n * k
    assert graph.voters_indices.dtype == np.int32
    expected: list[list[int]] = [[] for _ in range(n)]
    for v in range(n):
        for u in graph.nbr[v].tolist():
            expected[u].append(v)
    for u in range(n):
        assert graph.voters(u).tolist() == expected[u]  # ascending v by construction
    assert np.array_equal(graph.in_degree(), [len(e) for e in expected])


POOLS = [(seed, 40 + (seed * 53) % 461, (16, 64)[seed % 2], 3 + seed % 18) for seed in range(32)]


@pytest.mark.parametrize(("seed", "n", "d", "k"), POOLS)
def test_exact_graph_matches_brute_force(seed: int, n: int, d: int, k: int) -> None:
    x = gaussian_pool(seed, n, d)
    calls: list[tuple[int, int]] = []
    graph = build_knn_graph(x, k, progress=lambda done, total: calls.append((done, total)))
    want, s = brute_force(x, k)

    assert graph.exact and graph.recall is None
    assert graph.nbr.dtype == np.int32 and graph.sim.dtype == np.float32
    assert graph.nbr.shape == (n, k)
    assert calls and calls[-1] == (n, n)
    assert not (graph.nbr == np.arange(n)[:, None]).any()
    # similarities are the float64 ones, rounded to float32, in non-increasing order
    rows = np.arange(n)[:, None]
    assert np.allclose(graph.sim, s[rows, graph.nbr], atol=1e-6)
    assert (np.diff(graph.sim, axis=1) <= 0).all()
    # L1: every mismatch must sit at a float near-tie of the oracle
    mismatches = []
    for i in np.flatnonzero((graph.nbr != want).any(axis=1)):
        j = int(np.flatnonzero(graph.nbr[i] != want[i])[0])
        gap = abs(s[i, graph.nbr[i, j]] - s[i, want[i, j]])
        mismatches.append(gap)
        assert gap < NEAR_TIE, f"row {i} rank {j}: gap {gap}"
    assert len(mismatches) <= max(1, n // 100)
    check_reverse(graph)


def test_ties_by_lower_position_and_self_removed_by_id() -> None:
    # exact duplicates (which ingestion normally removes) tie at similarity 1 with the query
    base = gaussian_pool(7, 30, 16)
    x = np.concatenate([base, base[:5], base[:5]])  # rows 30..34 and 35..39 duplicate 0..4
    graph = build_knn_graph(x, 4)
    want, _ = brute_force(x, 4)
    assert np.array_equal(graph.nbr, want)
    assert graph.nbr[0, :2].tolist() == [30, 35]
    assert graph.nbr[35, :2].tolist() == [0, 30]
    check_reverse(graph)


def test_small_pools_clip_k() -> None:
    x = gaussian_pool(1, 5, 8)
    graph = build_knn_graph(x, 10)
    assert graph.k == 4 and np.array_equal(graph.nbr, brute_force(x, 4)[0])
    for n in (0, 1):
        g = build_knn_graph(np.zeros((n, 8), np.float32), 10)
        assert g.n == n and g.k == 0 and g.voters_indptr.tolist() == [0] * (n + 1)
    with pytest.raises(ValueError):
        build_knn_graph(x, 0)


def test_ivf_path_reports_recall() -> None:
    # clustered like real embeddings (IVF on isotropic noise needs most lists probed)
    rng = np.random.default_rng(3)
    centers = rng.standard_normal((256, 32))
    e = centers[rng.integers(0, 256, 20_000)] + 0.35 * rng.standard_normal((20_000, 32))
    x, _ = center_normalize(e.astype(np.float32))
    k = 10
    calls: list[tuple[int, int]] = []
    graph = build_knn_graph(
        x,
        k,
        exact_max_n=5_000,
        nprobe=1,  # too few on purpose: the builder must double it
        target_recall=0.9,
        recall_sample=500,
        seed=1,
        progress=lambda done, total: calls.append((done, total)),
    )
    assert not graph.exact
    assert graph.recall is not None and graph.recall >= 0.9
    assert calls[-1] == (20_000, 20_000)
    assert not (graph.nbr == np.arange(graph.n)[:, None]).any()
    # the sampled recall is an honest estimate: check it on other rows against a brute force
    rows = np.random.default_rng(99).choice(x.shape[0], size=400, replace=False)
    s = x[rows].astype(np.float64) @ x.astype(np.float64).T
    s[np.arange(rows.shape[0]), rows] = -np.inf
    truth = np.argsort(-s, axis=1, kind="stable")[:, :k]
    hits = (graph.nbr[rows][:, :, None] == truth[:, None, :]).any(axis=2).mean()
    assert hits >= 0.86
    assert abs(hits - graph.recall) < 0.05
    check_reverse_fast(graph)


def check_reverse_fast(graph: KnnGraph) -> None:
    flat = graph.nbr.ravel()
    order = np.argsort(flat, kind="stable")
    assert np.array_equal(graph.voters_indices, order // graph.k)
    assert np.array_equal(
        graph.voters_indptr, np.concatenate([[0], np.cumsum(np.bincount(flat, minlength=graph.n))])
    )


def test_reverse_adjacency_of_handmade_graph() -> None:
    nbr = np.array([[1, 2], [2, 0], [1, 0], [1, 2]], dtype=np.int32)
    indptr, indices = reverse_adjacency(nbr, 4)
    assert indptr.tolist() == [0, 2, 5, 8, 8]
    assert indices.tolist() == [1, 2, 0, 2, 3, 0, 1, 3]


def test_center_normalize() -> None:
    rng = np.random.default_rng(0)
    e = (rng.standard_normal((50, 12)) + 3.0).astype(np.float32)
    x, mean = center_normalize(e)
    assert x.dtype == np.float32 and mean.dtype == np.float32
    assert np.allclose(mean, e.astype(np.float64).mean(axis=0), atol=1e-6)
    c = e.astype(np.float64) - e.astype(np.float64).mean(axis=0)
    assert np.allclose(x, c / np.linalg.norm(c, axis=1, keepdims=True), atol=1e-6)
    # a row equal to the pool mean has no direction and stays zero
    a = e[0]
    x3, _ = center_normalize(np.stack([a, -a, np.zeros_like(a)]))
    assert np.all(x3[2] == 0) and np.allclose(np.linalg.norm(x3[:2], axis=1), 1.0)
    assert np.all(center_normalize(np.stack([a, a]))[0] == 0)
    assert center_normalize(np.zeros((0, 4), np.float32))[0].shape == (0, 4)
