"""Orderers against independent brute-force oracles (ALGORITHMS.md 0.5, 3.4 step 4)."""

from __future__ import annotations

import numpy as np
import pytest

from selection.base import NO_LABEL, Candidates
from selection.ordering import ORDER_NAMES, build_orderer

from .pools import handmade, id_list, make_ctx, make_pool

SEEDS = range(40)


def _chosen(seed: int) -> Candidates:
    pool = make_pool(seed)
    rng = np.random.default_rng(seed + 99)
    m = int(rng.integers(1, min(pool.n, 25) + 1))
    return pool.candidates.take(rng.choice(pool.n, size=m, replace=False))


def _rows(c: Candidates) -> list[tuple[int, float, int]]:
    return list(
        zip(c.ids.tolist(), c.scores.astype(np.float64).tolist(), c.labels.tolist(), strict=True)
    )


def nearest_first_oracle(c: Candidates) -> list[int]:
    return [i for i, _, _ in sorted(_rows(c), key=lambda r: (-r[1], r[0]))]


def nearest_last_oracle(c: Candidates) -> list[int]:
    return [i for i, _, _ in sorted(_rows(c), key=lambda r: (r[1], -r[0]))]


def interleave_oracle(c: Candidates) -> list[int]:
    """Walk back from the query: each step looks at every label's best unused item, prefers
    labels other than the previous one, takes the highest similarity (ties: lower label)."""
    remaining = sorted(_rows(c), key=lambda r: (-r[1], r[0]))
    backwards: list[int] = []
    prev: int | None = None
    while remaining:
        heads: dict[int, tuple[int, float, int]] = {}
        for row in remaining:  # best first, so the first row seen per label is its head
            heads.setdefault(row[2], row)
        pool = [h for lab, h in heads.items() if lab != prev] or list(heads.values())
        best = max(pool, key=lambda r: (r[1], -r[2]))
        remaining.remove(best)
        backwards.append(best[0])
        prev = best[2]
    return backwards[::-1]


@pytest.mark.parametrize("seed", SEEDS)
def test_orderers_match_oracles(seed: int) -> None:
    chosen = _chosen(seed)
    q = np.zeros(chosen.vectors.shape[1], np.float32)
    order = lambda name: id_list(build_orderer(name).order(q, chosen, make_ctx(seed)))  # noqa: E731
    assert order("nearest_first") == nearest_first_oracle(chosen)
    assert order("nearest_last") == nearest_last_oracle(chosen)
    assert order("as_selected") == id_list(chosen)
    perm = np.random.default_rng(seed).permutation(len(chosen))
    assert order("random") == [int(chosen.ids[i]) for i in perm]
    assert order("interleave") == interleave_oracle(chosen)


def test_nearest_last_is_reverse_of_best_first_on_ties() -> None:
    c = handmade(ids=[3, 1, 2], scores=[0.5, 0.5, 0.9], labels=[0, 0, 0])
    q = np.zeros(3, np.float32)
    assert id_list(build_orderer("nearest_first").order(q, c, make_ctx())) == [2, 1, 3]
    assert id_list(build_orderer("nearest_last").order(q, c, make_ctx())) == [3, 1, 2]


def test_interleave_hand_example() -> None:
    # label 0: 0.9, 0.8, 0.7; label 1: 0.85; label 2: 0.6
    c = handmade(ids=[1, 2, 3, 4, 5], scores=[0.9, 0.8, 0.7, 0.85, 0.6], labels=[0, 0, 0, 1, 2])
    got = build_orderer("interleave").order(np.zeros(5, np.float32), c, make_ctx())
    assert id_list(got) == [3, 5, 2, 4, 1]


def test_interleave_label_ties_and_unlabeled() -> None:
    c = handmade(ids=[1, 2, 3], scores=[0.5, 0.5, 0.5], labels=[1, NO_LABEL, 0])
    got = build_orderer("interleave").order(np.zeros(3, np.float32), c, make_ctx())
    # NO_LABEL (-1) is the lowest code, so it sits next to the query, then label 0, then 1
    assert id_list(got) == [1, 3, 2]


def test_interleave_only_repeats_labels_when_unavoidable() -> None:
    c = handmade(ids=[1, 2, 3, 4], scores=[0.9, 0.8, 0.7, 0.1], labels=[0, 0, 0, 1])
    got = build_orderer("interleave").order(np.zeros(4, np.float32), c, make_ctx())
    assert id_list(got) == [3, 2, 4, 1]


def test_build_orderer_names() -> None:
    assert set(ORDER_NAMES) == {
        "nearest_last",
        "nearest_first",
        "random",
        "as_selected",
        "interleave",
    }
    with pytest.raises(ValueError, match="nearest_last"):
        build_orderer("best_last")


@pytest.mark.parametrize("name", ORDER_NAMES)
def test_orderers_handle_empty(name: str) -> None:
    empty = Candidates.empty(4)
    assert len(build_orderer(name).order(np.zeros(4, np.float32), empty, make_ctx())) == 0
