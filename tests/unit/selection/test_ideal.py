"""IDEAL (ALGORITHMS.md 2.7) against independent brute-force oracles (ALGORITHMS.md 8 item 7).

Graphs are built here by a float64 numpy brute force (top-k by centered cosine excluding self,
ties to the lower position), not by `build_knn_graph`, so these tests stand on their own.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from pydantic import ValidationError

from selection.graph import KnnGraph
from selection.ideal import (
    RIS_PILOT_SETS,
    IdealParams,
    IdealResult,
    RRSets,
    edge_weights,
    ideal_greedy,
    reference_insertion_order,
    reference_spread,
    ris_greedy,
    ris_theta,
    sample_rr_sets,
    sample_worlds,
    world_celf,
    world_spread,
)

# ---------------------------------------------------------------------------------------------
# oracles and fixtures


def brute_graph(x: np.ndarray, k: int) -> KnnGraph:
    """Centered-cosine kNN graph by float64 brute force, with a CSR reverse adjacency."""
    n = x.shape[0]
    c = x - x.mean(axis=0)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    s = c @ c.T
    nbr = np.empty((n, k), dtype=np.int32)
    for i in range(n):
        others = [j for j in range(n) if j != i]
        others.sort(key=lambda j: (-s[i, j], j))
        nbr[i] = others[:k]
    sim = np.take_along_axis(s, nbr.astype(np.int64), axis=1).astype(np.float32)
    voters = [[v for v in range(n) if u in nbr[v]] for u in range(n)]
    indptr = np.zeros(n + 1, dtype=np.int64)
    indptr[1:] = np.cumsum([len(v) for v in voters])
    indices = np.array([v for vs in voters for v in vs], dtype=np.int32)
    return KnnGraph(nbr=nbr, sim=sim, voters_indptr=indptr, voters_indices=indices, exact=True)


def random_graph(seed: int, n: int, k: int, d: int = 8) -> KnnGraph:
    rng = np.random.default_rng(seed)
    return brute_graph(rng.standard_normal((n, d)), k)


def brute_weights(graph: KnnGraph) -> np.ndarray:
    n, k = graph.nbr.shape
    w = np.zeros((n, k))
    for i in range(n):
        total = sum(float(graph.sim[i, j]) for j in range(k))
        if total > 0:
            for j in range(k):
                w[i, j] = min(1.0, max(0.0, float(graph.sim[i, j]) / total))
    return w


def exact_spread(graph: KnnGraph, weights: np.ndarray, seeds: list[int]) -> tuple[float, float]:
    """Exact sigma(S) and the standard deviation of |Reach(S)|, over all 2^|E| live-edge worlds.

    Edges with p in {0, 1} are fixed; the others (<= 16 on the tiny graphs) are enumerated, and
    each world is weighted by its probability. Reachability in every world at once by boolean
    transitive closure (repeated squaring of the adjacency matrices).
    """
    n, k = graph.nbr.shape
    free = [(i, j) for i in range(n) for j in range(k) if 0.0 < weights[i, j] < 1.0]
    assert len(free) <= 16
    combos = list(itertools.product((False, True), repeat=len(free)))
    bits = np.array(combos, dtype=bool).reshape(len(combos), len(free))
    n_worlds = bits.shape[0]
    prob = np.ones(n_worlds)
    adj = np.zeros((n_worlds, n, n), dtype=np.float64)
    adj[:, np.arange(n), np.arange(n)] = 1.0
    for i in range(n):
        for j in range(k):
            if weights[i, j] >= 1.0:
                adj[:, i, graph.nbr[i, j]] = 1.0
    for e, (i, j) in enumerate(free):
        on = bits[:, e]
        prob *= np.where(on, weights[i, j], 1.0 - weights[i, j])
        adj[on, i, graph.nbr[i, j]] = 1.0
    for _ in range(n.bit_length()):
        adj = np.minimum(adj @ adj, 1.0)
    size = adj[:, seeds, :].max(axis=1).sum(axis=1)
    assert prob.sum() == pytest.approx(1.0)
    mean = float(prob @ size)
    second = float(prob @ size**2)
    return mean, math.sqrt(max(second - mean * mean, 0.0))


def replay_worlds(graph: KnnGraph, rounds: int, seed: int) -> list[list[int]]:
    """The documented draw order of `sample_worlds`, replayed: per world one rng.random((N, k)).

    Returns, per world, the reach bitmask (Python int) of every single node.
    """
    rng = np.random.default_rng(seed)
    w = brute_weights(graph)
    n, k = graph.nbr.shape
    out = []
    for _ in range(rounds):
        live = rng.random((n, k)) < w
        reach = []
        for v in range(n):
            seen = {v}
            stack = [v]
            while stack:
                u = stack.pop()
                for j in range(k):
                    x = int(graph.nbr[u, j])
                    if live[u, j] and x not in seen:
                        seen.add(x)
                        stack.append(x)
            reach.append(sum(1 << x for x in seen))
        out.append(reach)
    return out


def brute_greedy(
    reach: list[list[int]], n: int, budget: int, first: int | None
) -> tuple[list[int], list[int]]:
    """Plain greedy on fixed worlds: arg-max of the summed gain, ties to the lower position."""
    covered = [0] * len(reach)
    picks: list[int] = []
    totals: list[int] = []
    while len(picks) < min(budget, n):
        if first is not None and not picks:
            best = first
        else:
            best, best_gain = -1, -1
            for v in range(n):
                if v in picks:
                    continue
                gain = sum((r[v] & ~c).bit_count() for r, c in zip(reach, covered, strict=True))
                if gain > best_gain:
                    best, best_gain = v, gain
        picks.append(best)
        covered = [c | r[best] for r, c in zip(reach, covered, strict=True)]
        totals.append(sum(c.bit_count() for c in covered))
    return picks, totals


def brute_max_coverage(sets: list[set[int]], n: int, budget: int) -> tuple[list[int], list[int]]:
    uncovered = set(range(len(sets)))
    picks: list[int] = []
    met: list[int] = []
    total = 0
    for _ in range(min(budget, n)):
        best, best_c = -1, -1
        for v in range(n):
            if v in picks:
                continue
            c = sum(1 for s in uncovered if v in sets[s])
            if c > best_c:
                best, best_c = v, c
        picks.append(best)
        hit = {s for s in uncovered if best in sets[s]}
        uncovered -= hit
        total += len(hit)
        met.append(total)
    return picks, met


def rr_list(rr: RRSets) -> list[set[int]]:
    return [{int(x) for x in rr.nodes[rr.indptr[s] : rr.indptr[s + 1]]} for s in range(rr.theta)]


# ---------------------------------------------------------------------------------------------
# weights


@pytest.mark.parametrize("seed", range(6))
def test_edge_weights_match_brute_force(seed: int) -> None:
    """L1: weights equal the float64 brute force within 1e-6; rows sum to 1 when all positive."""
    rng = np.random.default_rng(seed)
    graph = random_graph(seed, int(rng.integers(12, 60)), int(rng.integers(1, 8)))
    w = edge_weights(graph)
    assert w.shape == graph.nbr.shape and w.dtype == np.float64
    np.testing.assert_allclose(w, brute_weights(graph), atol=1e-6, rtol=0)
    positive = (graph.sim > 0).all(axis=1)
    np.testing.assert_allclose(w[positive].sum(axis=1), 1.0, atol=1e-6)


def test_edge_weights_clip_and_non_positive_rows() -> None:
    """Negative cosines never fire, ratios above 1 are clipped, rows summing <= 0 are all zero."""
    sim = np.array([[0.5, -0.3], [-0.2, -0.1], [0.2, -0.2], [0.3, 0.1]], dtype=np.float32)
    nbr = np.array([[1, 2], [0, 2], [0, 1], [0, 1]], dtype=np.int32)
    graph = KnnGraph(
        nbr=nbr,
        sim=sim,
        voters_indptr=np.zeros(5, dtype=np.int64),
        voters_indices=np.empty(0, dtype=np.int32),
        exact=True,
    )
    w = edge_weights(graph)
    np.testing.assert_allclose(w, [[1.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.75, 0.25]], atol=1e-6)


# ---------------------------------------------------------------------------------------------
# estimators vs exact sigma (L3)

TINY = [(101, 8, 2), (102, 8, 2), (103, 7, 2), (104, 8, 1), (105, 6, 2)]
SEED_SETS = [[0], [3], [1, 4], [0, 2, 5]]


@pytest.mark.parametrize(("seed", "n", "k"), TINY)
def test_mc_and_ris_within_four_standard_errors_of_exact(seed: int, n: int, k: int) -> None:
    """L3: |estimate - exact sigma(S)| < 4 standard errors, exact sigma by world enumeration.

    CRN Monte-Carlo (R = 20,000 worlds): SE = sd(|Reach(S)|) / sqrt(R), the sd taken exactly
    from the enumeration. RIS (theta = 20,000 RR sets): the number of sets met is
    Binomial(theta, sigma / N), so SE = N * sqrt(q (1 - q) / theta) with q = sigma / N.
    """
    graph = random_graph(seed, n, k)
    w = edge_weights(graph)
    rounds = 20_000
    worlds = sample_worlds(w, rounds, np.random.default_rng(seed))
    rr = sample_rr_sets(graph, w, rounds, np.random.default_rng(seed + 1))
    sets = rr_list(rr)
    for seeds in SEED_SETS:
        seeds = [s % n for s in seeds]
        truth, sd = exact_spread(graph, w, seeds)
        mc = world_spread(graph, worlds, seeds)
        assert abs(mc - truth) < 4 * sd / math.sqrt(rounds) + 1e-9, (seeds, mc, truth)
        met = sum(1 for s in sets if s.intersection(seeds))
        q = truth / n
        ris = n * met / rr.theta
        assert abs(ris - truth) < 4 * n * math.sqrt(q * (1 - q) / rr.theta) + 1e-9
        # the greedy's own spread report uses the same estimator
        res = ris_greedy(rr, n, 1, first=seeds[0])
        assert res.spread[0] == pytest.approx(n * sum(1 for s in sets if seeds[0] in s) / rr.theta)


def test_rr_sets_start_with_their_root_and_have_no_repeats() -> None:
    graph = random_graph(7, 40, 4)
    rr = sample_rr_sets(graph, edge_weights(graph), 500, np.random.default_rng(3))
    roots = np.random.default_rng(3).integers(0, 40, size=500)
    for s in range(rr.theta):
        members = rr.nodes[rr.indptr[s] : rr.indptr[s + 1]]
        assert members[0] == roots[s]
        assert len(set(members.tolist())) == members.shape[0]


# ---------------------------------------------------------------------------------------------
# selection (L0)


def _pool_params(i: int) -> tuple[int, int, int, int]:
    rng = np.random.default_rng(5_000 + i)
    return (
        int(rng.integers(20, 121)),
        int(rng.integers(2, 7)),
        int(rng.integers(5, 21)),
        int(rng.integers(3, 11)),
    )


@pytest.mark.parametrize("i", range(32))
def test_celf_equals_plain_greedy_on_the_same_worlds(i: int) -> None:
    """L0: CELF picks (order included) and spreads equal a brute-force plain greedy.

    Both see the same R live-edge worlds (the test replays `sample_worlds`' documented draws);
    the brute force evaluates every candidate at every step, ties to the lower position.
    """
    n, k, rounds, budget = _pool_params(i)
    graph = random_graph(i, n, k)
    first_seed = "reference" if i % 4 == 3 else "greedy"
    res = ideal_greedy(
        graph,
        budget,
        rounds=rounds,
        method="celf",
        first_seed=first_seed,
        rng=np.random.default_rng(i),
    )
    reach = replay_worlds(graph, rounds, i)
    picks, totals = brute_greedy(reach, n, budget, 0 if first_seed == "reference" else None)
    assert res.method == "celf"
    assert res.picks == picks
    assert res.spread == pytest.approx([t / rounds for t in totals], abs=1e-12)
    # CELF's saving: never more evaluations than plain greedy's N per pick
    assert res.evaluations <= n * budget


def test_celf_ties_go_to_the_lower_position() -> None:
    """With no live edge at all every gain ties at R: greedy must return 0, 1, 2, ..."""
    graph = random_graph(3, 30, 3)
    worlds = np.zeros((4, 30, 3), dtype=np.bool_)
    res = world_celf(graph, worlds, 6)
    assert res.picks == [0, 1, 2, 3, 4, 5]
    assert res.spread == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]


@pytest.mark.parametrize("i", range(30))
def test_ris_greedy_equals_brute_force_max_coverage(i: int) -> None:
    """L0: RIS greedy = brute-force max coverage on the same RR sets, ties to the lower position.

    `ideal_greedy(method="ris", theta=T)` draws exactly `sample_rr_sets(graph, w, T, rng)`.
    """
    n, k, _rounds, budget = _pool_params(100 + i)
    graph = random_graph(100 + i, n, k)
    theta = 50 + 10 * i
    res = ideal_greedy(graph, budget, method="ris", theta=theta, rng=np.random.default_rng(i))
    rr = sample_rr_sets(graph, edge_weights(graph), theta, np.random.default_rng(i))
    picks, met = brute_max_coverage(rr_list(rr), n, budget)
    assert res.method == "ris" and res.theta == theta
    assert res.picks == picks
    assert res.spread == pytest.approx([n * m / theta for m in met])


def test_ris_picks_the_rest_by_position_once_everything_is_covered() -> None:
    rr = RRSets(indptr=np.array([0, 2, 3], dtype=np.int64), nodes=np.array([4, 1, 4], np.int32))
    res = ris_greedy(rr, 6, 5)
    assert res.picks == [4, 0, 1, 2, 3]
    assert res.spread == [6.0, 6.0, 6.0, 6.0, 6.0]


# ---------------------------------------------------------------------------------------------
# first seed, budgets, dispatch, determinism


@pytest.mark.parametrize(
    "kwargs",
    [
        {"method": "celf"},
        {"method": "ris", "theta": 300},
        {"method": "ris"},
        {"ic_variant": "reference"},
    ],
)
def test_first_seed_reference_returns_index_zero_first(kwargs: dict[str, object]) -> None:
    graph = random_graph(11, 60, 4)
    res = ideal_greedy(graph, 5, first_seed="reference", rng=np.random.default_rng(0), **kwargs)
    assert res.picks[0] == 0
    assert len(res.picks) == len(set(res.picks)) == 5
    assert all(a <= b + 1e-12 for a, b in itertools.pairwise(res.spread))


def test_auto_method_switches_at_exact_max_n() -> None:
    graph = random_graph(12, 50, 3)
    assert ideal_greedy(graph, 3, rng=np.random.default_rng(0)).method == "celf"
    res = ideal_greedy(graph, 3, exact_max_n=49, rng=np.random.default_rng(0))
    assert res.method == "ris"
    # theta=None: the pilot sets are the first draws, the rule tops them up to ris_theta
    pilot = sample_rr_sets(graph, edge_weights(graph), RIS_PILOT_SETS, np.random.default_rng(0))
    mean_size = pilot.nodes.shape[0] / pilot.theta
    assert res.theta == max(ris_theta(50, mean_size), RIS_PILOT_SETS)


def test_ris_theta_rule() -> None:
    assert ris_theta(100_000, 12.5) == math.ceil(64 * 100_000 / 12.5)
    assert ris_theta(100, 50.0) == 1_000  # floor
    assert ris_theta(10_000_000, 10.0) == 5_000_000  # memory cap: 50M entries / 10


def test_budget_edges_and_progress() -> None:
    graph = random_graph(13, 25, 3)
    calls: list[tuple[int, int]] = []
    res = ideal_greedy(
        graph, 40, rng=np.random.default_rng(0), progress=lambda d, t: calls.append((d, t))
    )
    assert sorted(res.picks) == list(range(25))
    assert calls == [(i, 25) for i in range(1, 26)]
    empty = ideal_greedy(graph, 0, rng=np.random.default_rng(0))
    assert empty == IdealResult(picks=[], spread=[], evaluations=0, method="celf")
    with pytest.raises(ValueError):
        ideal_greedy(graph, -1, rng=np.random.default_rng(0))
    with pytest.raises(ValueError):
        ideal_greedy(graph, 3, rounds=0, rng=np.random.default_rng(0))
    with pytest.raises(ValueError):
        ideal_greedy(graph, 3, ic_variant="reference", method="celf", rng=np.random.default_rng(0))


def test_graph_without_edges() -> None:
    """k = 0 (a pool of one item, or no neighbours): every node reaches only itself."""
    graph = KnnGraph(
        nbr=np.empty((3, 0), dtype=np.int32),
        sim=np.empty((3, 0), dtype=np.float32),
        voters_indptr=np.zeros(4, dtype=np.int64),
        voters_indices=np.empty(0, dtype=np.int32),
        exact=True,
    )
    res = ideal_greedy(graph, 2, method="celf", rng=np.random.default_rng(0))
    assert res.picks == [0, 1]
    assert res.spread == [1.0, 2.0]
    rr = sample_rr_sets(graph, edge_weights(graph), 100, np.random.default_rng(0))
    assert rr.nodes.shape[0] == 100  # every RR set is its root alone
    res = ideal_greedy(graph, 3, method="ris", theta=100, rng=np.random.default_rng(0))
    assert sorted(res.picks) == [0, 1, 2]
    assert res.spread[-1] == pytest.approx(3.0)


@pytest.mark.parametrize(
    "kwargs", [{"method": "celf"}, {"method": "ris"}, {"ic_variant": "reference"}]
)
def test_deterministic_under_a_seed(kwargs: dict[str, object]) -> None:
    graph = random_graph(14, 70, 5)
    a = ideal_greedy(graph, 6, rng=np.random.default_rng(42), **kwargs)
    b = ideal_greedy(graph, 6, rng=np.random.default_rng(42), **kwargs)
    assert a == b


def test_uses_build_knn_graph_output() -> None:
    """The project's graph builder feeds IDEAL directly; on continuous data its rows equal ours."""
    from selection.graph import build_knn_graph, center_normalize

    x = np.random.default_rng(15).standard_normal((80, 16))
    ours = brute_graph(x, 5)
    theirs = build_knn_graph(center_normalize(x.astype(np.float32))[0], 5)
    np.testing.assert_array_equal(theirs.nbr, ours.nbr)
    a = ideal_greedy(ours, 5, rng=np.random.default_rng(1))
    b = ideal_greedy(theirs, 5, rng=np.random.default_rng(1))
    assert a.picks == b.picks


# ---------------------------------------------------------------------------------------------
# the reference cascade


def test_reference_insertion_order() -> None:
    nbr = np.array([[2, 1], [3, 0], [1, 0], [0, 2]], dtype=np.int32)
    graph = KnnGraph(
        nbr=nbr,
        sim=np.ones((4, 2), dtype=np.float32),
        voters_indptr=np.zeros(5, dtype=np.int64),
        voters_indices=np.empty(0, dtype=np.int32),
        exact=True,
    )
    # 0, then 0's neighbours least similar first (1, 2), then 1's (0, 3) -> 3
    assert reference_insertion_order(graph).tolist() == [0, 1, 2, 3]
    nbr2 = np.array([[3, 2], [0, 2], [1, 0], [0, 1]], dtype=np.int32)
    graph2 = KnnGraph(
        nbr=nbr2,
        sim=np.ones((4, 2), dtype=np.float32),
        voters_indptr=np.zeros(5, dtype=np.int64),
        voters_indices=np.empty(0, dtype=np.int32),
        exact=True,
    )
    assert reference_insertion_order(graph2).tolist() == [0, 2, 3, 1]


def _batch_mean_se(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values)
    return float(arr.mean()), float(arr.std(ddof=1) / math.sqrt(arr.shape[0]))


@pytest.mark.parametrize("seed", range(3))
def test_reference_cascade_inflates_the_standard_spread(seed: int) -> None:
    """The duplicate quirk: the reference's mean count exceeds standard IC sigma(S).

    Statistical, with fixed seeds: 20 batches of 1,000 rounds for each estimator; the
    difference must exceed 4 combined standard errors (batch-means SE).
    """
    graph = random_graph(200 + seed, 30, 5)
    w = edge_weights(graph)
    seeds = [0, 1, 2]
    ref_rng = np.random.default_rng(seed)
    std_rng = np.random.default_rng(seed + 50)
    ref = [reference_spread(graph, w, seeds, 1_000, ref_rng) for _ in range(20)]
    std = [world_spread(graph, sample_worlds(w, 1_000, std_rng), seeds) for _ in range(20)]
    (rm, rse), (sm, sse) = _batch_mean_se(ref), _batch_mean_se(std)
    assert rm - sm > 4 * math.hypot(rse, sse), (rm, sm, rse, sse)


def test_reference_cascade_without_duplicates_is_standard_ic() -> None:
    """On an out-tree whose back edges point only at already-active nodes, no node can be
    reached twice in one step, so the reference cascade from the root is the standard IC:
    its mean is within 4 SE of the exact sigma (L3, R = 20,000 rounds, SE from the exact sd)."""
    # 0 -> 1, 2; 1 -> 3, 4; 2 -> 5, 6; leaves point back at the root and their parent
    nbr = np.array([[1, 2], [3, 4], [5, 6], [0, 1], [0, 1], [0, 2], [0, 2]], dtype=np.int32)
    sim = np.array(
        [[0.6, 0.4], [0.5, 0.3], [0.7, 0.2], [0.5, 0.5], [0.2, 0.6], [0.4, 0.4], [0.1, 0.3]],
        dtype=np.float32,
    )
    graph = KnnGraph(
        nbr=nbr,
        sim=sim,
        voters_indptr=np.zeros(8, dtype=np.int64),
        voters_indices=np.empty(0, dtype=np.int32),
        exact=True,
    )
    w = edge_weights(graph)
    rounds = 20_000
    truth, sd = exact_spread(graph, w, [0])
    est = reference_spread(graph, w, [0], rounds, np.random.default_rng(5))
    assert abs(est - truth) < 4 * sd / math.sqrt(rounds)


def test_reference_variant_greedy_shape() -> None:
    graph = random_graph(16, 40, 4)
    res = ideal_greedy(graph, 4, ic_variant="reference", rng=np.random.default_rng(3))
    assert res.method == "reference"
    assert len(set(res.picks)) == 4
    # fresh estimates of every candidate at every step: N + (N-1) + (N-2) + (N-3)
    assert res.evaluations == 40 + 39 + 38 + 37


# ---------------------------------------------------------------------------------------------
# params


def test_params_defaults_and_validation() -> None:
    p = IdealParams()
    assert (p.k, p.rounds, p.first_seed, p.ic_variant, p.method, p.theta) == (
        10,
        10,
        "greedy",
        "standard",
        "auto",
        None,
    )
    assert p.exact_max_n == 100_000
    for bad in ({"rounds": 0}, {"rounds": 1001}, {"method": "exact"}, {"unknown": 1}):
        with pytest.raises(ValidationError):
            IdealParams.model_validate(bad)
    for name, f in IdealParams.model_fields.items():
        assert f.description, name
