"""Vote-k against literal ports of the reference loops (ALGORITHMS.md 2.4, 2.5, 1.3, 8.2/5/6).

The oracles below are written from the reference code (HKUNLP icl-selective-annotation
`two_steps.py`: fast_votek, iterative_selection, prompt_retrieval), not from the module under
test: voting by a full argsort per row, a dict of vote lists sorted stably by length, and every
round re-scored from scratch. The exact oracle uses `fractions.Fraction`; the float oracle the
reference's own `rho ** (-c)` float sums. Deviations the spec makes canonical (zero-score
candidates eligible, never re-pick, seeded random fill) are applied where the reference would
re-pick or crash.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import numpy as np
import pytest

from selection.graph import KnnGraph, build_knn_graph, center_normalize, reverse_adjacency
from selection.votek import (
    TwoStageParams,
    VoteKParams,
    assemble_similar,
    fast_votek,
    two_stage_votek,
)

Votes = dict[int, list[int]]


# ------------------------------------------------------------------------------------------
# oracles


def reference_votes(x: np.ndarray, k: int) -> Votes:
    """The reference voting loop: argsort of each row, slice [-k-1:-1], drop i."""
    x64 = x.astype(np.float64)
    vote_stat: defaultdict[int, list[int]] = defaultdict(list)
    for i in range(x.shape[0]):
        cur_scores = x64 @ x64[i]
        sorted_indices = np.argsort(cur_scores).tolist()[-k - 1 : -1]
        for idx in sorted_indices:
            if idx != i:
                vote_stat[idx].append(i)
    return dict(vote_stat)


def votes_of_graph(nbr: np.ndarray) -> Votes:
    """The same voting scan over a given neighbour array (rows in descending similarity)."""
    vote_stat: defaultdict[int, list[int]] = defaultdict(list)
    for i in range(nbr.shape[0]):
        for idx in reversed(nbr[i].tolist()):  # least similar first, like the argsort slice
            vote_stat[idx].append(i)
    return dict(vote_stat)


def graph_of(nbr: np.ndarray) -> KnnGraph:
    nb = np.ascontiguousarray(nbr, dtype=np.int32)
    indptr, indices = reverse_adjacency(nb, nb.shape[0])
    return KnnGraph(
        nbr=nb,
        sim=np.zeros(nb.shape, np.float32),
        voters_indptr=indptr,
        voters_indices=indices,
        exact=True,
    )


def oracle_fill(selected: list[int], n: int, budget: int, rng: np.random.Generator) -> list[int]:
    if len(selected) >= budget:
        return []
    free = np.array([i for i in range(n) if i not in selected], dtype=np.int64)
    return [int(x) for x in rng.choice(free, size=budget - len(selected), replace=False)]


def exact_fast_votek(
    vote_stat: Votes, n: int, select_num: int, rho: Any, rng: np.random.Generator
) -> tuple[list[int], int]:
    """Reference fast_votek loop in exact rationals; canonical zero-score and fill rules."""
    votes = sorted(vote_stat.items(), key=lambda x: len(x[1]), reverse=True)
    selected_indices: list[int] = []
    selected_times: defaultdict[int, int] = defaultdict(int)
    r = Fraction(rho)
    while len(selected_indices) < select_num:
        cur_scores: dict[int, Fraction] = {}
        for idx, candidates in votes:
            if idx in selected_indices:
                continue  # the reference's -100: never the maximum below
            cur_scores[idx] = Fraction(0)  # canonical: zero-score candidates stay eligible
            for one_support in candidates:
                if one_support not in selected_indices:
                    cur_scores[idx] += r ** (-selected_times[one_support])
        if not cur_scores:
            break
        cur_selected_idx = max(cur_scores.items(), key=lambda x: x[1])[0]
        selected_indices.append(cur_selected_idx)
        for idx_support in vote_stat[cur_selected_idx]:
            selected_times[idx_support] += 1
    fill = oracle_fill(selected_indices, n, select_num, rng)
    return selected_indices + fill, len(fill)


def float_fast_votek(vote_stat: Votes, select_num: int, rho: Any) -> list[int]:
    """The reference fast_votek loop verbatim (float sums, -100, first maximum)."""
    votes = sorted(vote_stat.items(), key=lambda x: len(x[1]), reverse=True)
    selected_indices: list[int] = []
    selected_times: defaultdict[int, int] = defaultdict(int)
    while len(selected_indices) < select_num:
        cur_scores: defaultdict[int, Any] = defaultdict(int)
        for idx, candidates in votes:
            if idx in selected_indices:
                cur_scores[idx] = -100
                continue
            for one_support in candidates:
                if one_support not in selected_indices:
                    cur_scores[idx] += rho ** (-selected_times[one_support])
        cur_selected_idx = max(cur_scores.items(), key=lambda x: x[1])[0]
        selected_indices.append(int(cur_selected_idx))
        for idx_support in vote_stat[cur_selected_idx]:
            selected_times[idx_support] += 1
    return selected_indices


def exact_score(vote_stat: Votes, u: int, selected: list[int], rho: Any) -> Fraction:
    times: defaultdict[int, int] = defaultdict(int)
    for s in selected:
        for v in vote_stat.get(s, []):
            times[v] += 1
    r = Fraction(rho)
    return sum((r ** (-times[v]) for v in vote_stat.get(u, []) if v not in selected), Fraction(0))


def pool_params(seed: int) -> tuple[np.ndarray, int, int]:
    rng = np.random.default_rng(500 + seed)
    n = int(rng.integers(40, 121))
    k = int(rng.integers(3, 12))
    m = int(rng.integers(5, 15))
    x, _ = center_normalize(rng.standard_normal((n, 16)).astype(np.float32))
    return x, k, m


# ------------------------------------------------------------------------------------------
# fast vote-k


@pytest.mark.parametrize("seed", range(36))
def test_fast_votek_equals_exact_reference(seed: int) -> None:
    """L0: the heap implementation = the literal loop in exact rationals (2.4, 8.5)."""
    x, k, m = pool_params(seed)
    graph = build_knn_graph(x, k)
    vote_stat = reference_votes(x, k)
    assert vote_stat == votes_of_graph(graph.nbr)  # same graph as the reference's voting
    want, fill = exact_fast_votek(vote_stat, x.shape[0], m, 10, np.random.default_rng(seed))
    got = fast_votek(graph, m, rng=np.random.default_rng(seed))
    assert got.picks == want
    assert got.random_fill == fill == 0


@pytest.mark.parametrize("seed", range(36))
def test_reference_compat_equals_float_reference(seed: int) -> None:
    """reference_compat reproduces the verbatim float loop exactly; where it departs from
    the exact order, the two choices were tied or within float64 resolution (L1)."""
    x, k, m = pool_params(seed)
    graph = build_knn_graph(x, k)
    vote_stat = reference_votes(x, k)
    want = float_fast_votek(vote_stat, m, 10)
    got = fast_votek(graph, m, reference_compat=True, rng=np.random.default_rng(0))
    assert got.picks == want
    assert len(set(want)) == m

    exact = fast_votek(graph, m, rng=np.random.default_rng(0)).picks
    for step, (a, b) in enumerate(zip(want, exact, strict=True)):
        if a != b:
            sa = exact_score(vote_stat, a, exact[:step], 10)
            sb = exact_score(vote_stat, b, exact[:step], 10)
            assert sb >= sa and float(sb - sa) <= 1e-9 * float(sb), (step, sa, sb)
            break


@pytest.mark.parametrize("seed", range(16))
@pytest.mark.parametrize("rho", [2, 2.5, 10.0, 2.0**60])
def test_fast_votek_tie_heavy_random_graphs(seed: int, rho: float) -> None:
    """Random neighbour lists tie constantly (integer counts, rho = 2 sums); zero-score
    candidates and the random fill appear once the budget exceeds what the votes cover."""
    rng = np.random.default_rng(900 + seed)
    n = int(rng.integers(20, 60))
    k = int(rng.integers(1, 5))
    nbr = np.stack(
        [rng.choice(np.delete(np.arange(n), i), size=k, replace=False) for i in range(n)]
    )
    graph = graph_of(nbr)
    vote_stat = votes_of_graph(nbr)
    for m in sorted({5, n // 2, min(n, len(vote_stat) + 3), n}):
        want, fill = exact_fast_votek(vote_stat, n, m, rho, np.random.default_rng(m))
        got = fast_votek(graph, m, rho=rho, rng=np.random.default_rng(m))
        assert got.picks == want, m
        assert got.random_fill == fill
        assert fill == max(0, m - len(vote_stat))


def test_fill_when_budget_exceeds_candidates() -> None:
    # 0 <-> 1 and 2 <-> 3 vote for each other; 4 and 5 vote for 0; nobody votes for 4, 5
    nbr = np.array([[1], [0], [3], [2], [0], [0]])
    graph = graph_of(nbr)
    for compat in (False, True):
        got = fast_votek(graph, 6, reference_compat=compat, rng=np.random.default_rng(5))
        # π = [0, 1, 3, 2] (0 has 3 votes; 1, 3, 2 got their one vote in that scan order).
        # 0 first; then 1 scores zero (its voter 0 is selected) while 3 and 2 tie at 1: 3 by
        # π; then 1 and 2 both score zero and stay eligible, by π; 4 and 5 are random
        assert got.picks[:4] == [0, 3, 1, 2]
        assert sorted(got.picks) == list(range(6))
        assert got.random_fill == 2
        want, _ = exact_fast_votek(votes_of_graph(nbr), 6, 6, 10, np.random.default_rng(5))
        assert got.picks == want
    assert fast_votek(graph, 0, rng=np.random.default_rng(0)).picks == []
    assert len(fast_votek(graph, 99, rng=np.random.default_rng(0)).picks) == 6
    with pytest.raises(ValueError):
        fast_votek(graph, -1, rng=np.random.default_rng(0))


def test_empty_graph_is_all_random() -> None:
    graph = build_knn_graph(np.ones((1, 4), np.float32), 5)
    got = fast_votek(graph, 3, rng=np.random.default_rng(0))
    assert got.picks == [0] and got.random_fill == 1


def test_exact_tie_resolution_beats_float_order() -> None:
    """With rho = 2**60 a voter at c = 1 adds 2**-60, below float64 resolution next to 1:
    scores that differ exactly compare equal as floats, and the float loop falls back to π.
    The default mode must still follow exact arithmetic (and reference_compat the floats)."""
    rho = 2.0**60
    rng = np.random.default_rng(0)
    differ = 0
    for _ in range(20):
        n = 40
        nbr = np.stack(
            [rng.choice(np.delete(np.arange(n), i), size=3, replace=False) for i in range(n)]
        )
        graph, vote_stat = graph_of(nbr), votes_of_graph(nbr)
        want, _ = exact_fast_votek(vote_stat, n, 15, rho, np.random.default_rng(1))
        got = fast_votek(graph, 15, rho=rho, rng=np.random.default_rng(1))
        assert got.picks == want
        floats = float_fast_votek(vote_stat, 15, rho)
        assert len(set(floats)) == 15
        compat = fast_votek(graph, 15, rho=rho, reference_compat=True, rng=np.random.default_rng(1))
        assert compat.picks == floats
        differ += floats != want
    assert differ > 0  # the exact path was needed


def test_fast_votek_is_deterministic_and_validates() -> None:
    x, k, m = pool_params(3)
    graph = build_knn_graph(x, k)
    a = fast_votek(graph, m, rng=np.random.default_rng(1))
    b = fast_votek(graph, m, rng=np.random.default_rng(2))
    assert a.picks == b.picks
    with pytest.raises(ValueError):
        fast_votek(graph, 3, rho=0.0, rng=np.random.default_rng(0))


# ------------------------------------------------------------------------------------------
# two-stage vote-k


def fake_confidence(calls: list[tuple[list[int], list[int]]]) -> Callable[..., np.ndarray]:
    """Deterministic, tie-rich confidences that depend on the bank and the target."""

    def conf(bank: list[int], targets: list[int]) -> np.ndarray:
        calls.append((list(bank), list(targets)))
        salt = sum(bank) % 13
        return np.array([float((t * 37 + salt) % 23) for t in targets])

    return conf


def oracle_two_stage(
    vote_stat: Votes,
    n: int,
    budget: int,
    stage1: int,
    rho: Any,
    coverage: float,
    sample_size: int | None,
    compat: bool,
    seed: int,
) -> list[int]:
    """Literal port of iterative_selection's vote-k branch (one round), both modes."""
    rng = np.random.default_rng(seed)
    budget = min(budget, n)
    m1 = min(stage1, budget)
    if compat:
        selected_indices = float_fast_votek(vote_stat, m1, rho)
    else:
        selected_indices, _ = exact_fast_votek(vote_stat, n, m1, rho, rng)
    if len(selected_indices) >= budget:
        return selected_indices
    size = max(3000, 30 * budget) if sample_size is None else sample_size
    sample = list(range(n)) if size >= n else sorted(rng.choice(n, size, replace=False).tolist())

    targets = [i for i in sample if i not in selected_indices]
    conf = fake_confidence([])(list(selected_indices), targets)
    idx_scores: dict[int, float] = {}
    for idx in sample:
        if idx in selected_indices:
            idx_scores[idx] = float("inf")  # higher = more confident: selected go last
        else:
            idx_scores[idx] = float(conf[targets.index(idx)])
    sorted_scores = sorted(idx_scores.items(), key=lambda x: x[1])
    sorted_scores_len = len(sorted_scores)

    selected_times: defaultdict[int, int] = defaultdict(int)
    select_num_1 = budget - len(selected_indices)
    inter = int(len(sample) * coverage / select_num_1)
    for prev_idx in selected_indices:
        for idx_support in vote_stat.get(prev_idx, []):
            selected_times[idx_support] += 1
    r = float(rho) if compat else Fraction(rho)
    count_t = 0
    while inter > 0 and len(selected_indices) < budget and count_t * inter < sorted_scores_len:
        cur_scores: dict[int, Any] = {}
        for idx, _ in sorted_scores[count_t * inter : (count_t + 1) * inter]:
            if idx in selected_indices:
                continue  # -100 in the reference; never re-picked here
            if idx not in vote_stat:
                cur_scores[idx] = 0
                continue
            total: Any = 0
            scored = False
            for one_support in vote_stat[idx]:
                if one_support not in selected_indices:
                    total += r ** (-selected_times[one_support])
                    scored = True
            if scored or not compat:  # the reference never enters an all-selected item
                cur_scores[idx] = total
        count_t += 1
        if not cur_scores:
            continue
        cur_selected_idx = max(cur_scores.items(), key=lambda x: x[1])[0]
        selected_indices.append(cur_selected_idx)
        if not compat:  # the reference's update silently never happens (str keys)
            for idx_support in vote_stat.get(cur_selected_idx, []):
                selected_times[idx_support] += 1
    return selected_indices + oracle_fill(selected_indices, n, budget, rng)


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("compat", [False, True])
def test_two_stage_equals_literal_port(seed: int, compat: bool) -> None:
    x, k, _ = pool_params(seed)
    n = x.shape[0]
    graph = build_knn_graph(x, k)
    vote_stat = reference_votes(x, k)
    budget = 8 + seed % 10
    stage1 = 1 + seed % 5
    coverage = (0.9, 0.5, 1.0)[seed % 3]
    sample_size = (None, n // 2, 30)[seed % 3]
    calls: list[tuple[list[int], list[int]]] = []
    got = two_stage_votek(
        graph,
        budget,
        confidence=fake_confidence(calls),
        stage1=stage1,
        coverage=coverage,
        sample_size=sample_size,
        reference_compat=compat,
        rng=np.random.default_rng(seed),
    )
    want = oracle_two_stage(vote_stat, n, budget, stage1, 10, coverage, sample_size, compat, seed)
    assert got.picks == want
    assert len(set(got.picks)) == budget and got.stage1 == stage1
    # the callable saw the stage-1 bank and only unselected targets, once
    assert len(calls) == 1
    bank, targets = calls[0]
    assert bank == got.picks[:stage1]
    assert not set(bank) & set(targets) and targets == sorted(targets)
    assert got.sample_size == (n if sample_size is None else sample_size)
    # same seed, same result (the subsample included)
    again = two_stage_votek(
        graph,
        budget,
        confidence=fake_confidence([]),
        stage1=stage1,
        coverage=coverage,
        sample_size=sample_size,
        reference_compat=compat,
        rng=np.random.default_rng(seed),
    )
    assert again.picks == got.picks


def test_two_stage_tiny_pool_fills_randomly_and_validates() -> None:
    x, _, _ = pool_params(1)
    graph = build_knn_graph(x[:12], 3)
    # w = int(12 * 0.9 / 10) = 1: every bucket is one item, so stage 2 takes ranks 0..9
    got = two_stage_votek(
        graph, 12, confidence=fake_confidence([]), stage1=2, rng=np.random.default_rng(0)
    )
    assert sorted(got.picks) == list(range(12)) and got.bucket_width == 1
    assert got.random_fill == 0
    want = oracle_two_stage(reference_votes(x[:12], 3), 12, 12, 2, 10, 0.9, None, False, 0)
    assert got.picks == want
    # w = 0: no bucket at all, everything after stage 1 is random
    tiny = two_stage_votek(
        graph, 12, confidence=fake_confidence([]), stage1=2, coverage=0.5,
        rng=np.random.default_rng(0),
    )  # fmt: skip
    assert tiny.bucket_width == 0 and tiny.random_fill == 10

    def bad(bank: list[int], targets: list[int]) -> np.ndarray:
        return np.zeros(len(targets) + 1)

    with pytest.raises(ValueError):
        two_stage_votek(graph, 6, confidence=bad, stage1=2, rng=np.random.default_rng(0))


def test_params_models() -> None:
    p = TwoStageParams()
    assert (p.k, p.rho, p.stage1, p.coverage, p.sample_size) == (150, 10.0, 10, 0.9, None)
    assert (p.max_total_tokens, p.max_example_tokens) == (1000, 250)
    assert VoteKParams(k=20).k == 20
    for bad in ({"k": 0}, {"rho": 1.0}, {"unknown": 1}, {"k": 1001}):
        with pytest.raises(ValueError):
            VoteKParams.model_validate(bad)
    with pytest.raises(ValueError):
        TwoStageParams(coverage=0.0)
    for name, field in TwoStageParams.model_fields.items():
        assert field.description, name


# ------------------------------------------------------------------------------------------
# 1.3 assembly


def walk_oracle(
    query_pos: int | None,
    bank: list[int],
    sims: np.ndarray,
    lengths: list[int],
    query_tokens: int,
    max_total: int,
    max_single: int | None,
) -> list[int]:
    """prompt_retrieval's walk over a fully sorted bank (ties by ascending position)."""
    order = sorted(range(len(bank)), key=lambda j: (-float(sims[j]), bank[j]))
    cur_prompt_string_len = query_tokens
    selected = []
    for j in order:
        if sims[j] == 1 or bank[j] == query_pos:
            continue
        cur_len = lengths[j]
        if max_single is not None and cur_len > max_single:
            continue
        cur_prompt_string_len += cur_len
        if cur_prompt_string_len > max_total:
            break
        selected.append(j)
    return [bank[j] for j in reversed(selected)]


@pytest.mark.parametrize("seed", range(40))
def test_assemble_similar_equals_full_sort_walk(seed: int) -> None:
    rng = np.random.default_rng(seed)
    size = int(rng.integers(0, 40))
    bank = rng.choice(1000, size=size, replace=False).tolist()
    sims = np.round(rng.uniform(-1, 1, size), 2).astype(np.float32)  # rounding makes ties
    if size > 2:
        sims[1] = 1.0
    lengths = rng.integers(5, 400, size).tolist()
    query_pos = bank[0] if size and seed % 2 else None
    qt = int(rng.integers(0, 50))
    for max_total, max_single in ((1000, 250), (300, None), (60, 40)):
        got = assemble_similar(
            query_pos,
            bank,
            sims,
            lengths,
            query_tokens=qt,
            max_total=max_total,
            max_single=max_single,
        )
        assert got == walk_oracle(query_pos, bank, sims, lengths, qt, max_total, max_single)


def test_assemble_similar_stops_at_first_overflow() -> None:
    bank = [10, 11, 12, 13, 14]
    sims = np.array([0.9, 0.8, 1.0, 0.7, 0.6])
    lengths = [50, 300, 10, 60, 5]
    # 12 is skipped (similarity exactly 1), 11 is over max_single, 13 overflows: stop there
    # although 14 would still fit
    got = assemble_similar(None, bank, sims, lengths, query_tokens=20, max_total=100)
    assert got == [10]
    # with a larger budget both fit, nearest last
    assert assemble_similar(None, bank, sims, lengths, query_tokens=20, max_total=200) == [
        14,
        13,
        10,
    ]
    assert assemble_similar(10, bank, sims, lengths, query_tokens=20, max_total=200) == [14, 13]
