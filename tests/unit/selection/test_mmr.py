"""MmrSelector against a brute-force float64 oracle (ALGORITHMS.md 3.3, 8.8)."""

from __future__ import annotations

import numpy as np
import pytest

from selection.knn import KnnSelector
from selection.mmr import MmrSelector, effective_fetch_k

from .pools import handmade, id_list, make_ctx, make_pool

SEEDS = range(36)
LAMBDAS = (0.0, 0.3, 0.5, 0.8, 1.0)


def mmr_oracle(
    ids: np.ndarray, scores: np.ndarray, vectors: np.ndarray, k: int, lam: float, fetch_k: int
) -> list[int]:
    """Literal MMR: rank by (score desc, id asc), cut to fetch_k, first pick = top, then
    recompute every candidate's max similarity to all picks each round (float64); the first
    strictly larger value wins, so ties go to the earlier-ranked candidate."""
    n = len(ids)
    rank = sorted(range(n), key=lambda i: (-float(scores[i]), int(ids[i])))[:fetch_k]
    v = vectors.astype(np.float64)
    if k <= 0 or not rank:
        return []
    picked = [rank[0]]
    rest = rank[1:]
    while len(picked) < min(k, len(rank)):
        best, best_val = -1, -np.inf
        for i in rest:
            redundancy = max(float(np.dot(v[i], v[s])) for s in picked)
            val = lam * float(scores[i]) - (1.0 - lam) * redundancy
            if val > best_val:
                best, best_val = i, val
        picked.append(best)
        rest.remove(best)
    return [int(ids[i]) for i in picked]


@pytest.mark.parametrize("seed", SEEDS)
def test_mmr_with_fetch_k_n_equals_full_pool_mmr(seed: int) -> None:
    pool = make_pool(seed)
    c = pool.candidates
    for lam in LAMBDAS:
        for k in (1, 4, 11):
            got = MmrSelector(lambda_=lam, fetch_k=pool.n).select(pool.query, c, k, make_ctx())
            want = mmr_oracle(c.ids, c.scores, c.vectors, k, lam, pool.n)
            assert id_list(got) == want, (seed, lam, k)


@pytest.mark.parametrize("seed", SEEDS)
def test_mmr_over_top_fetch_k_matches_oracle(seed: int) -> None:
    pool = make_pool(seed)
    c = pool.candidates
    fetch_k = max(2, pool.n // 3)
    for k in (3, 6):
        got = MmrSelector(lambda_=0.5, fetch_k=fetch_k).select(pool.query, c, k, make_ctx())
        assert id_list(got) == mmr_oracle(c.ids, c.scores, c.vectors, k, 0.5, max(fetch_k, k))
    # default fetch_k: max(20, 5k)
    got = MmrSelector().select(pool.query, c, 3, make_ctx())
    assert id_list(got) == mmr_oracle(c.ids, c.scores, c.vectors, 3, 0.5, 20)


def test_mmr_takes_every_candidate_when_k_reaches_n() -> None:
    pool = make_pool(5, n=14)
    c = pool.candidates
    got = MmrSelector(lambda_=0.4, fetch_k=100).select(pool.query, c, 20, make_ctx())
    assert id_list(got) == mmr_oracle(c.ids, c.scores, c.vectors, 20, 0.4, 100)
    assert sorted(id_list(got)) == sorted(c.ids.tolist())


def test_mmr_lambda_one_is_knn() -> None:
    for seed in range(5):
        pool = make_pool(seed)
        mmr = MmrSelector(lambda_=1.0, fetch_k=pool.n).select(
            pool.query, pool.candidates, 7, make_ctx()
        )
        knn = KnnSelector().select(pool.query, pool.candidates, 7, make_ctx())
        assert id_list(mmr) == id_list(knn)


def test_mmr_ties_go_to_earlier_rank() -> None:
    # orthogonal vectors: no redundancy, so ids 3 and 2 have the same gain (0.25);
    # id 2 ranks first (equal score, lower id)
    c = handmade(ids=[3, 1, 2], scores=[0.5, 0.9, 0.5], labels=[0, 0, 0])
    got = MmrSelector(lambda_=0.5).select(np.zeros(3, np.float32), c, 3, make_ctx())
    assert id_list(got) == [1, 2, 3]


def test_mmr_redundancy_penalty() -> None:
    # id 2 duplicates the first pick; id 3 is orthogonal and less relevant but wins at 0.5
    vectors = [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]
    c = handmade(ids=[1, 2, 3], scores=[0.9, 0.85, 0.3], labels=[0, 0, 0], vectors=vectors)
    got = MmrSelector(lambda_=0.5).select(np.zeros(2, np.float32), c, 2, make_ctx())
    assert id_list(got) == [1, 3]


def test_effective_fetch_k() -> None:
    assert effective_fetch_k(None, 2) == 20
    assert effective_fetch_k(None, 8) == 40
    assert effective_fetch_k(5, 8) == 8
    assert effective_fetch_k(32, 4) == 32


def test_mmr_rejects_bad_parameters() -> None:
    with pytest.raises(ValueError):
        MmrSelector(lambda_=1.5)
    with pytest.raises(ValueError):
        MmrSelector(fetch_k=0)
