"""KnnSelector against a brute-force float64 oracle (ALGORITHMS.md 3.1, 8.8)."""

from __future__ import annotations

import numpy as np
import pytest

from selection.knn import KnnSelector

from .pools import handmade, id_list, make_ctx, make_pool

SEEDS = range(40)


def knn_oracle(ids: np.ndarray, scores: np.ndarray, k: int) -> list[int]:
    """Sort by float64 similarity descending, ties by ascending id; keep the first k."""
    rows = sorted(
        zip(ids.tolist(), scores.astype(np.float64).tolist(), strict=True),
        key=lambda r: (-r[1], r[0]),
    )
    return [i for i, _ in rows[: max(k, 0)]]


@pytest.mark.parametrize("seed", SEEDS)
def test_knn_matches_oracle(seed: int) -> None:
    pool = make_pool(seed)
    c = pool.candidates
    for k in (0, 1, 3, 8, pool.n // 2, pool.n, pool.n + 4):
        got = KnnSelector().select(pool.query, c, k, make_ctx(seed))
        assert id_list(got) == knn_oracle(c.ids, c.scores, k)


def test_knn_ties_by_ascending_id() -> None:
    c = handmade(ids=[9, 4, 7, 1], scores=[0.5, 0.5, 0.9, 0.5], labels=[0, 0, 0, 0])
    got = KnnSelector().select(np.zeros(4, np.float32), c, 3, make_ctx())
    assert id_list(got) == [7, 1, 4]


def test_knn_keeps_rows_aligned() -> None:
    pool = make_pool(3)
    c = pool.candidates
    got = KnnSelector().select(pool.query, c, 5, make_ctx())
    by_id = {int(i): p for p, i in enumerate(c.ids)}
    for j, i in enumerate(got.ids):
        p = by_id[int(i)]
        assert got.scores[j] == c.scores[p]
        assert got.labels[j] == c.labels[p]
        assert np.array_equal(got.vectors[j], c.vectors[p])
