"""RandomSelector: same draws as an independent numpy oracle (L2) and uniform (L3)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from selection.random_choice import RandomSelector

from .pools import id_list, make_ctx, make_pool

SEEDS = range(35)


@pytest.mark.parametrize("seed", SEEDS)
def test_random_matches_same_draws(seed: int) -> None:
    pool = make_pool(seed)
    c = pool.candidates
    for k in (1, 5, pool.n, pool.n + 2):
        got = RandomSelector().select(pool.query, c, k, make_ctx(seed))
        draws = np.random.default_rng(seed).choice(pool.n, size=min(k, pool.n), replace=False)
        assert id_list(got) == [int(c.ids[i]) for i in draws]


def test_random_is_uniform() -> None:
    pool = make_pool(0, n=10)
    counts: Counter[int] = Counter()
    trials, k = 3000, 3
    for seed in range(trials):
        counts.update(
            id_list(RandomSelector().select(pool.query, pool.candidates, k, make_ctx(seed)))
        )
    expected = trials * k / pool.n
    sd = (trials * (k / pool.n) * (1 - k / pool.n)) ** 0.5
    assert len(counts) == pool.n
    assert all(abs(v - expected) < 5 * sd for v in counts.values())


def test_random_consumes_no_draws_when_empty() -> None:
    pool = make_pool(1)
    ctx = make_ctx(7)
    assert len(RandomSelector().select(pool.query, pool.candidates, 0, ctx)) == 0
    assert ctx.rng.integers(1 << 30) == np.random.default_rng(7).integers(1 << 30)
