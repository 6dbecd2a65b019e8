"""HNSWIPIndex against the exact oracle: recall on clustered data, exact re-ranking of what
it finds, exact subset search, and the auto choice of index by pool size."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.typing import NDArray

from app.settings import IndexSettings
from app.snapshot import build_index
from retrievers.exact import NumpyExactIndex
from retrievers.faiss_index import FlatIPIndex
from retrievers.hnsw_index import HNSWIPIndex

RECALL_FLOOR = 0.95


def clustered(rng: np.random.Generator, n: int, d: int, centers: int) -> NDArray[np.float32]:
    """Unit vectors around random centres: neighbourhoods like those of text embeddings."""
    middle = rng.standard_normal((centers, d))
    rows = middle[rng.integers(0, centers, n)] + 0.6 * rng.standard_normal((n, d))
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def recall(got: NDArray[np.int64], want: NDArray[np.int64]) -> float:
    return float(np.mean([len(set(g) & set(w)) / len(w) for g, w in zip(got, want, strict=True)]))


@pytest.fixture(scope="module")
def data() -> tuple[NDArray[np.int64], NDArray[np.float32], NDArray[np.float32]]:
    rng = np.random.default_rng(7)
    vectors = clustered(rng, 6_000, 48, 60)
    ids = rng.permutation(6_000).astype(np.int64) * 3 + 11
    queries = clustered(np.random.default_rng(8), 200, 48, 60)
    return ids, vectors, queries


def test_recall_at_8_against_exact_search(data) -> None:  # type: ignore[no-untyped-def]
    ids, vectors, queries = data
    index = HNSWIPIndex.build(ids, vectors)  # the shipped defaults
    _, want = NumpyExactIndex.build(ids, vectors).search(queries, 8)
    _, got = index.search(queries, 8)
    assert recall(got, want) >= RECALL_FLOOR


def test_found_candidates_carry_exact_scores_in_oracle_order(data) -> None:  # type: ignore[no-untyped-def]
    ids, vectors, queries = data
    index = HNSWIPIndex.build(ids, vectors, m=16, ef_construction=40, ef_search=64)
    scores, got = index.search(queries, 20)
    by_id = dict(zip(ids.tolist(), vectors.astype(np.float64), strict=True))
    for q, row_scores, row_ids in zip(queries, scores, got, strict=True):
        exact = np.array([by_id[i] @ q.astype(np.float64) for i in row_ids], dtype=np.float64)
        np.testing.assert_array_equal(row_scores, exact.astype(np.float32))
        order = np.lexsort((row_ids, -row_scores))
        np.testing.assert_array_equal(order, np.arange(row_ids.size))


def test_subset_search_is_exact(data) -> None:  # type: ignore[no-untyped-def]
    ids, vectors, queries = data
    index = HNSWIPIndex.build(ids, vectors, m=8, ef_construction=16, ef_search=8)
    allowed = np.random.default_rng(3).choice(ids, 300, replace=False)
    want = NumpyExactIndex.build(ids, vectors).search_subset(queries, 10, allowed)
    got = index.search_subset(queries, 10, np.concatenate([allowed, [10**9]]))
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[0], want[0])


def test_wider_search_never_loses_recall(data) -> None:  # type: ignore[no-untyped-def]
    ids, vectors, queries = data
    _, want = NumpyExactIndex.build(ids, vectors).search(queries, 8)
    index = HNSWIPIndex.build(ids, vectors, m=8, ef_construction=16, ef_search=8)
    narrow = recall(index.search(queries, 8)[1], want)
    index.ef_search = 512
    assert recall(index.search(queries, 8)[1], want) >= narrow


def test_graph_grown_in_batches_scores_every_vector_in_place() -> None:
    # The search reads candidates from the graph's own storage, which moves as it grows.
    rng = np.random.default_rng(5)
    vectors = clustered(rng, 900, 24, 9)
    ids = rng.permutation(900).astype(np.int64) * 7 + 2
    index = HNSWIPIndex(24, ef_search=1_000)
    for part in np.array_split(np.arange(900), 3):
        index.add(ids[part], vectors[part])
    queries = clustered(np.random.default_rng(6), 40, 24, 9)
    want = NumpyExactIndex.build(ids, vectors).search(queries, 12)
    got = index.search(queries, 12)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[0], want[0])


def test_removed_ids_disappear_and_can_return() -> None:
    rng = np.random.default_rng(1)
    vectors = clustered(rng, 500, 16, 5)
    ids = np.arange(500, dtype=np.int64)
    index = HNSWIPIndex.build(ids, vectors)
    assert index.remove(ids[:250]) == 250
    _, got = index.search(vectors[:50], 20)
    assert not np.isin(got, ids[:250]).any()
    fresh = clustered(rng, 1, 16, 1)
    index.add(np.array([3], dtype=np.int64), fresh)
    scores, got = index.search(fresh, 300)
    assert got[0, 0] == 3 and np.sum(got[0] == 3) == 1
    assert scores[0, 0] == pytest.approx(1.0, abs=1e-6)


def test_auto_index_switches_at_the_threshold() -> None:
    rng = np.random.default_rng(2)
    vectors = clustered(rng, 300, 16, 4)
    ids = np.arange(300, dtype=np.int64)
    assert isinstance(build_index(ids, vectors, IndexSettings(ann_min_size=301)), FlatIPIndex)
    assert isinstance(build_index(ids, vectors, IndexSettings(ann_min_size=300)), HNSWIPIndex)
    assert isinstance(
        build_index(ids, vectors, IndexSettings(kind="flat", ann_min_size=1)), FlatIPIndex
    )
    graph = build_index(ids, vectors, IndexSettings(kind="hnsw", hnsw_ef_search=77))
    assert isinstance(graph, HNSWIPIndex) and graph.ef_search == 77
