"""IDEAL: influence-driven pool selection (ALGORITHMS.md 2.7; Zhang et al., ICLR 2024).

Picks the `budget` pool items whose joint influence over the kNN graph (ALGORITHMS.md 1.2) is
largest. Each item i has directed edges i -> j to its graph neighbours j with probability
p(i->j) = cc(i,j) / sum_j' cc(i,j'); influence is the expected number of items reached by an
independent cascade (IC) started from the picks.

Three estimators, all seeded through the caller's `np.random.Generator`:

* `method="celf"`: standard IC with common random numbers (CRN). R live-edge worlds are drawn
  once; sigma_R(S) = mean over worlds of |Reach_w(S)| is monotone submodular, so CELF lazy greedy
  returns exactly the plain greedy's picks on those worlds (2.7 scalable step 3, L0).
* `method="ris"`: reverse influence sampling (step 4): theta reverse-reachable (RR) sets, greedy
  maximum coverage; sigma(S) ~ N * covered / theta is unbiased.
* `ic_variant="reference"`: the reference cascade with its duplicate-activation quirk and a
  fresh Monte-Carlo estimate per evaluation, for A/B runs on small pools only.

Positions are pool indices 0..N-1. The inner loops (BFS, covered bitmaps, heap, RR sampling)
are numba-compiled; numba draws from the caller's Generator directly, so results are a
deterministic function of the generator's state.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field

from selection.graph import GRAPH_EXACT_MAX_N, KnnGraph
from selection.heap import sift_down
from selection.jit import njit

__all__ = [
    "DEFAULT_EXACT_MAX_N",
    "DEFAULT_K",
    "DEFAULT_ROUNDS",
    "RIS_MAX_ENTRIES",
    "RIS_PILOT_SETS",
    "RIS_THETA_FACTOR",
    "IdealParams",
    "IdealResult",
    "RRSets",
    "edge_weights",
    "ideal_greedy",
    "reference_insertion_order",
    "reference_spread",
    "ris_greedy",
    "ris_theta",
    "sample_rr_sets",
    "sample_worlds",
    "world_celf",
    "world_spread",
]

DEFAULT_K = 10
"""Graph degree of the reference (`infmax(k=10)`)."""

DEFAULT_ROUNDS = 10
"""Live-edge worlds per estimate; the reference's `rand_iter` (100+ gives steadier picks)."""

DEFAULT_EXACT_MAX_N = 100_000
"""`method="auto"` runs CELF on the exact worlds up to this pool size, RIS above it."""

RIS_THETA_FACTOR = 64.0
"""theta = RIS_THETA_FACTOR * N / (mean RR-set size): see `ris_theta`."""

RIS_PILOT_SETS = 2_000
"""RR sets drawn first to measure the mean RR-set size before theta is fixed."""

RIS_MAX_ENTRIES = 50_000_000
"""Cap on the total size of all RR sets (int32 entries, 200 MB); theta is cut to fit."""

Method = Literal["auto", "celf", "ris"]
FirstSeed = Literal["greedy", "reference"]
IcVariant = Literal["standard", "reference"]
Progress = Callable[[int, int], None]


@dataclass(slots=True)
class IdealResult:
    """What `ideal_greedy` picked.

    `picks` are pool positions in pick order; `spread[t]` is the estimated influence
    sigma(picks[: t + 1]) under the estimator used; `evaluations` counts marginal-gain (or, for
    the reference variant, sigma) evaluations, one per candidate over all worlds, so CELF's
    saving over plain greedy (N per pick) is visible. `method` is the estimator actually run
    ("celf", "ris" or "reference"); `theta` the number of RR sets for RIS; `extras` holds
    diagnostics (RIS: `mean_rr_size`, the mean RR-set size = estimated mean singleton spread).
    """

    picks: list[int]
    spread: list[float]
    evaluations: int
    method: str = "celf"
    theta: int | None = None
    extras: dict[str, float] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------
# Edge weights and live-edge worlds


def edge_weights(graph: KnnGraph) -> NDArray[np.float64]:
    """Activation probabilities p(i -> nbr[i, j]) as an (N, k) float64 array (2.7 step 1).

    p(i->j) = cc(i,j) / sum_{j' in nbr[i]} cc(i,j'), computed in float64 from `graph.sim`, then
    clipped to [0, 1]: edges with a negative centered cosine never fire, and an edge whose
    ratio exceeds 1 (possible when some neighbours of i are negative) always fires, exactly as
    `random() < p` behaves in the reference. Rows whose similarity sum is <= 0 (or not finite)
    get all-zero weights: such an item influences nobody. (The reference would divide by the
    non-positive sum and let its *negative* neighbours fire; with k = 10 nearest neighbours by
    centered cosine this does not arise on real pools.) Deterministic; O(N k).
    """
    sim = np.asarray(graph.sim, dtype=np.float64)
    total = sim.sum(axis=1, keepdims=True)
    ok = np.isfinite(total) & (total > 0.0)
    safe = np.where(ok, total, 1.0)
    weights = np.where(ok, sim / safe, 0.0)
    return np.clip(weights, 0.0, 1.0)


def sample_worlds(
    weights: NDArray[np.float64], rounds: int, rng: np.random.Generator
) -> NDArray[np.bool_]:
    """R live-edge worlds: mask[w, i, j] is True when edge i -> nbr[i, j] is live in world w.

    Each edge is live independently with probability weights[i, j] (the live-edge view of the
    standard IC model, 2.7 step 2). Draws: `rng.random((N, k))` once per world, world 0 first,
    compared with `<` (so p = 1 is always live, p = 0 never). Memory R*N*k bytes.
    """
    if rounds < 1:
        raise ValueError("rounds must be >= 1")
    n, k = weights.shape
    worlds = np.empty((rounds, n, k), dtype=np.bool_)
    # one world at a time keeps the float64 draw buffer at N*k, not R*N*k
    for w in range(rounds):
        worlds[w] = rng.random((n, k)) < weights
    return worlds


@njit
def _live_csr(
    nbr: NDArray[np.int32], worlds: NDArray[np.bool_]
) -> tuple[NDArray[np.int64], NDArray[np.int32]]:
    # Flat CSR of the live edges of every world: world w's successors of i are
    # idx[ptr[w, i]:ptr[w, i + 1]]. Near-critical weights leave ~1 live edge per node, so this
    # is ~k times smaller and more cache-friendly than scanning the (N, k) mask in every BFS.
    r, n, k = worlds.shape
    ptr = np.empty((r, n + 1), dtype=np.int64)
    total = 0
    for w in range(r):
        for i in range(n):
            ptr[w, i] = total
            for j in range(k):
                if worlds[w, i, j]:
                    total += 1
        ptr[w, n] = total
    idx = np.empty(total, dtype=np.int32)
    pos = 0
    for w in range(r):
        for i in range(n):
            for j in range(k):
                if worlds[w, i, j]:
                    idx[pos] = nbr[i, j]
                    pos += 1
    return ptr, idx


@njit
def _gain(
    v: int,
    ptr: NDArray[np.int64],
    idx: NDArray[np.int32],
    covered: NDArray[np.bool_],
    stamp: NDArray[np.int64],
    epoch: NDArray[np.int64],
    queue: NDArray[np.int32],
) -> int:
    # Marginal gain of v summed over worlds: nodes reached from v without entering covered
    # nodes (whatever a covered node reaches is covered already). `stamp` is an epoch-stamped
    # visited array, so no per-BFS clearing of an N-sized buffer.
    r = covered.shape[0]
    total = 0
    for w in range(r):
        if covered[w, v]:
            continue
        epoch[0] += 1
        ep = epoch[0]
        stamp[v] = ep
        queue[0] = v
        head = 0
        tail = 1
        while head < tail:
            u = queue[head]
            head += 1
            for e in range(ptr[w, u], ptr[w, u + 1]):
                x = idx[e]
                if stamp[x] != ep and not covered[w, x]:
                    stamp[x] = ep
                    queue[tail] = x
                    tail += 1
        total += tail
    return total


@njit
def _all_gains(
    ptr: NDArray[np.int64],
    idx: NDArray[np.int32],
    covered: NDArray[np.bool_],
    stamp: NDArray[np.int64],
    epoch: NDArray[np.int64],
    queue: NDArray[np.int32],
    excluded: NDArray[np.bool_],
) -> NDArray[np.int64]:
    # Every candidate's gain, world by world: one world's CSR stays in cache while all N
    # BFS run in it (v-major order over R worlds was ~6x slower at N = 30k, R = 100).
    r, n = covered.shape
    out = np.zeros(n, dtype=np.int64)
    for w in range(r):
        for v in range(n):
            if excluded[v] or covered[w, v]:
                continue
            epoch[0] += 1
            ep = epoch[0]
            stamp[v] = ep
            queue[0] = v
            head = 0
            tail = 1
            while head < tail:
                u = queue[head]
                head += 1
                for e in range(ptr[w, u], ptr[w, u + 1]):
                    x = idx[e]
                    if stamp[x] != ep and not covered[w, x]:
                        stamp[x] = ep
                        queue[tail] = x
                        tail += 1
            out[v] += tail
    return out


@njit
def _cover(
    v: int,
    ptr: NDArray[np.int64],
    idx: NDArray[np.int32],
    covered: NDArray[np.bool_],
    queue: NDArray[np.int32],
) -> int:
    # Adds Reach_w(v) to every world's covered set; returns the number of newly covered nodes.
    r = covered.shape[0]
    total = 0
    for w in range(r):
        if covered[w, v]:
            continue
        covered[w, v] = True
        queue[0] = v
        head = 0
        tail = 1
        while head < tail:
            u = queue[head]
            head += 1
            for e in range(ptr[w, u], ptr[w, u + 1]):
                x = idx[e]
                if not covered[w, x]:
                    covered[w, x] = True
                    queue[tail] = x
                    tail += 1
        total += tail
    return total


@njit
def _celf_pick(
    hg: NDArray[np.int64],
    hv: NDArray[np.int32],
    size: NDArray[np.int64],
    fresh: NDArray[np.int64],
    step: int,
    ptr: NDArray[np.int64],
    idx: NDArray[np.int32],
    covered: NDArray[np.bool_],
    stamp: NDArray[np.int64],
    epoch: NDArray[np.int64],
    queue: NDArray[np.int32],
) -> tuple[int, int, int]:
    # One CELF step. The heap holds upper bounds (gains computed at earlier steps; submodularity
    # makes them bounds). When the top's gain is current (fresh[v] == step), every other entry's
    # true gain is <= its bound, which sorts after the top, so the top is the plain greedy's
    # arg-max with ties to the lower position. Otherwise recompute the top and sift it down.
    evals = 0
    while True:
        v = hv[0]
        if fresh[v] == step:
            g = hg[0]
            n = size[0] - 1
            size[0] = n
            if n > 0:
                hg[0] = hg[n]
                hv[0] = hv[n]
                sift_down(hg, hv, n, 0)
            return v, g, evals
        hg[0] = _gain(v, ptr, idx, covered, stamp, epoch, queue)
        fresh[v] = step
        evals += 1
        sift_down(hg, hv, size[0], 0)


def world_spread(
    graph: KnnGraph, worlds: NDArray[np.bool_], seeds: list[int] | NDArray[np.int64]
) -> float:
    """sigma_R(S): mean over the given live-edge worlds of the number of nodes reachable from S.

    The CRN estimator of 2.7 step 3 (L3 vs exact sigma); also the way to score any pick list
    (e.g. RIS's) on held-out worlds. O(R (N + live edges)).
    """
    n = graph.n
    r = int(worlds.shape[0])
    ptr, idx = _live_csr(np.ascontiguousarray(graph.nbr, dtype=np.int32), worlds)
    covered = np.zeros((r, n), dtype=np.bool_)
    queue = np.empty(max(n, 1), dtype=np.int32)
    total = 0
    for s in seeds:
        total += _cover(int(s), ptr, idx, covered, queue)
    return total / r


def world_celf(
    graph: KnnGraph,
    worlds: NDArray[np.bool_],
    budget: int,
    *,
    first: int | None = None,
    progress: Progress | None = None,
) -> IdealResult:
    """CELF lazy greedy maximising sigma_R on fixed live-edge worlds (2.7 step 3).

    Returns exactly the plain greedy's picks on these worlds (L0): at each step the arg-max of
    the integer marginal gain summed over worlds, ties to the lower position. `first`, when
    given, is committed first without evaluation (the reference's `first_seed`). The first
    CELF round evaluates every candidate (N * R BFS); later rounds re-evaluate only the heap
    top until it is current. `spread` is sigma_R after each pick. Memory O(R (N + live edges)).
    """
    n = graph.n
    r = int(worlds.shape[0])
    budget = max(0, min(budget, n))
    result = IdealResult(picks=[], spread=[], evaluations=0, method="celf")
    if budget == 0:
        return result
    ptr, idx = _live_csr(np.ascontiguousarray(graph.nbr, dtype=np.int32), worlds)
    covered = np.zeros((r, n), dtype=np.bool_)
    stamp = np.zeros(n, dtype=np.int64)
    epoch = np.zeros(1, dtype=np.int64)
    queue = np.empty(n, dtype=np.int32)
    picked = np.zeros(n, dtype=np.bool_)
    reached = 0

    def commit(v: int) -> None:
        nonlocal reached
        reached += _cover(v, ptr, idx, covered, queue)
        picked[v] = True
        result.picks.append(v)
        result.spread.append(reached / r)
        if progress is not None:
            progress(len(result.picks), budget)

    if first is not None:
        commit(int(first))
    if len(result.picks) >= budget:
        return result
    gains = _all_gains(ptr, idx, covered, stamp, epoch, queue, picked)
    result.evaluations += n - int(picked.sum())
    cand = np.flatnonzero(~picked).astype(np.int32)
    # sorted by (-gain, position) is already a valid binary min-heap in that order
    order = np.lexsort((cand, -gains[cand]))
    hv = np.ascontiguousarray(cand[order])
    hg = np.ascontiguousarray(gains[hv])
    size = np.array([hv.shape[0]], dtype=np.int64)
    fresh = np.full(n, -1, dtype=np.int64)
    fresh[hv] = 0
    step = 0
    while len(result.picks) < budget:
        v, _g, evals = _celf_pick(hg, hv, size, fresh, step, ptr, idx, covered, stamp, epoch, queue)
        result.evaluations += evals
        commit(int(v))
        step += 1
    return result


# ------------------------------------------------------------------------------------------
# Reverse influence sampling


@dataclass(frozen=True, slots=True)
class RRSets:
    """theta reverse-reachable sets in CSR form: set s is `nodes[indptr[s]:indptr[s + 1]]`.

    Set s holds its root first, then the nodes found by the reverse BFS in visit order.
    """

    indptr: NDArray[np.int64]
    nodes: NDArray[np.int32]

    @property
    def theta(self) -> int:
        return int(self.indptr.shape[0] - 1)


def _reverse_edges(
    graph: KnnGraph, weights: NDArray[np.float64]
) -> tuple[NDArray[np.int64], NDArray[np.int32], NDArray[np.float64]]:
    # In-edges of every node u (the v with u in nbr[v]), v ascending, with p(v -> u). Built by a
    # stable sort of the flattened neighbour table, independently of graph.voters_* so that it
    # also carries the weights.
    n, k = graph.n, graph.k
    flat = np.asarray(graph.nbr, dtype=np.int64).ravel()
    order = np.argsort(flat, kind="stable")
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(flat, minlength=n), out=indptr[1:])
    src = (order // max(k, 1)).astype(np.int32)
    w = np.ascontiguousarray(weights.ravel()[order])
    return indptr, src, w


@njit
def _sample_rr(
    rev_ptr: NDArray[np.int64],
    rev_src: NDArray[np.int32],
    rev_w: NDArray[np.float64],
    roots: NDArray[np.int64],
    rng: np.random.Generator,
    stamp: NDArray[np.int64],
    epoch: NDArray[np.int64],
) -> tuple[NDArray[np.int64], NDArray[np.int32]]:
    # Reverse BFS from each root. Each in-edge of a visited node is examined once, and only while
    # its tail is unvisited (an edge into the set from a visited tail cannot change it), so each
    # edge's coin is flipped at most once per set: the set is exactly {v : v reaches root} in a
    # live-edge world drawn lazily. p <= 0 / p >= 1 need no draw.
    theta = roots.shape[0]
    indptr = np.empty(theta + 1, dtype=np.int64)
    cap = max(16, 4 * theta)
    nodes = np.empty(cap, dtype=np.int32)
    pos = 0
    for s in range(theta):
        indptr[s] = pos
        epoch[0] += 1
        ep = epoch[0]
        root = roots[s]
        stamp[root] = ep
        if pos >= cap:
            cap *= 2
            grown = np.empty(cap, dtype=np.int32)
            grown[:pos] = nodes[:pos]
            nodes = grown
        nodes[pos] = root
        head = pos
        pos += 1
        while head < pos:
            u = nodes[head]
            head += 1
            for e in range(rev_ptr[u], rev_ptr[u + 1]):
                v = rev_src[e]
                if stamp[v] == ep:
                    continue
                p = rev_w[e]
                if p <= 0.0:
                    continue
                if p < 1.0 and rng.random() >= p:
                    continue
                stamp[v] = ep
                if pos >= cap:
                    cap *= 2
                    grown = np.empty(cap, dtype=np.int32)
                    grown[:pos] = nodes[:pos]
                    nodes = grown
                nodes[pos] = v
                pos += 1
    indptr[theta] = pos
    return indptr, nodes[:pos].copy()


def sample_rr_sets(
    graph: KnnGraph, weights: NDArray[np.float64], theta: int, rng: np.random.Generator
) -> RRSets:
    """theta reverse-reachable sets under standard IC (2.7 step 4).

    Draws: the roots first (`rng.integers(0, N, size=theta)`, uniform), then one
    `rng.random()` per examined in-edge with 0 < p < 1, in BFS order, set by set. For any S,
    N * P(S meets a random RR set) = sigma(S), so N * (sets met) / theta is unbiased.
    Cost and memory are proportional to the total RR-set size, theta * E|RR| (E|RR| = mean
    singleton spread).
    """
    n = graph.n
    if theta < 0:
        raise ValueError("theta must be >= 0")
    if n == 0:
        return RRSets(np.zeros(theta + 1, dtype=np.int64), np.empty(0, dtype=np.int32))
    roots = rng.integers(0, n, size=theta).astype(np.int64)
    rev_ptr, rev_src, rev_w = _reverse_edges(graph, weights)
    stamp = np.zeros(n, dtype=np.int64)
    epoch = np.zeros(1, dtype=np.int64)
    indptr, nodes = _sample_rr(rev_ptr, rev_src, rev_w, roots, rng, stamp, epoch)
    return RRSets(indptr=indptr, nodes=nodes)


def _concat_rr(a: RRSets, b: RRSets) -> RRSets:
    indptr = np.concatenate([a.indptr[:-1], b.indptr + a.indptr[-1]])
    return RRSets(indptr=indptr, nodes=np.concatenate([a.nodes, b.nodes]))


def ris_theta(n: int, mean_rr_size: float, *, factor: float = RIS_THETA_FACTOR) -> int:
    """Number of RR sets for a pool of n items: ceil(factor * n / mean_rr_size), capped.

    Why this rule: a marginal gain of g nodes is estimated from about theta * g / n RR sets,
    so its relative standard error is ~ sqrt(n / (theta * g)). With theta = factor * n / m
    (m = mean RR-set size = mean singleton spread), a gain the size of a typical singleton
    spread is resolved to 1/sqrt(factor) (12.5 % at the default 64) and the total RR storage
    is ~ factor * n entries, linear in n. The IMM bound for (1 - 1/e - eps) with high
    probability asks for ~ 1.3 n ln(n / M) / (eps^2 m) sets, i.e. factor ~ 60 at eps = 0.5,
    M = 100, n = 1e5; tighter eps costs memory quadratically. The result is kept in
    [1_000, RIS_MAX_ENTRIES / m].
    """
    m = max(float(mean_rr_size), 1.0)
    theta = math.ceil(factor * n / m)
    cap = max(1_000, int(RIS_MAX_ENTRIES / m))
    return int(min(max(theta, 1_000), cap))


@njit
def _ris_greedy(
    indptr: NDArray[np.int64],
    nodes: NDArray[np.int32],
    n: int,
    budget: int,
    first: int,
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    # Greedy maximum coverage with exact counts: count[v] = uncovered sets containing v, kept
    # current by decrementing the members of every set a pick covers (total work = total RR
    # size); the arg-max scan returns the first maximum, i.e. ties to the lower position.
    theta = indptr.shape[0] - 1
    count = np.zeros(n, dtype=np.int64)
    for e in range(nodes.shape[0]):
        count[nodes[e]] += 1
    inv_ptr = np.zeros(n + 1, dtype=np.int64)
    for v in range(n):
        inv_ptr[v + 1] = inv_ptr[v] + count[v]
    fill = inv_ptr[:-1].copy()
    inv_set = np.empty(nodes.shape[0], dtype=np.int64)
    for s in range(theta):
        for e in range(indptr[s], indptr[s + 1]):
            v = nodes[e]
            inv_set[fill[v]] = s
            fill[v] += 1
    covered = np.zeros(theta, dtype=np.bool_)
    picks = np.empty(budget, dtype=np.int64)
    met = np.empty(budget, dtype=np.int64)
    total = 0
    for t in range(budget):
        if t == 0 and first >= 0:
            best = first
        else:
            best = -1
            best_c = -1
            for v in range(n):
                if count[v] > best_c:
                    best_c = count[v]
                    best = v
        for q in range(inv_ptr[best], inv_ptr[best + 1]):
            s = inv_set[q]
            if covered[s]:
                continue
            covered[s] = True
            total += 1
            for e in range(indptr[s], indptr[s + 1]):
                count[nodes[e]] -= 1
        count[best] = -1  # picked: never again, even when every gain has dropped to 0
        picks[t] = best
        met[t] = total
    return picks, met


def ris_greedy(
    rr: RRSets,
    n: int,
    budget: int,
    *,
    first: int | None = None,
    progress: Progress | None = None,
) -> IdealResult:
    """Greedy maximum coverage of the RR sets (2.7 step 4): L0 with brute-force max coverage.

    Each step picks the position covering the most not-yet-covered sets, ties to the lower
    position; `first`, when given, is committed first. `spread[t]` = n * covered / theta.
    `evaluations` is 0 (counts are maintained, not evaluated). O(n * budget + total RR size).
    """
    budget = max(0, min(budget, n))
    theta = rr.theta
    picks, met = _ris_greedy(rr.indptr, rr.nodes, n, budget, -1 if first is None else first)
    scale = n / theta if theta > 0 else 0.0
    result = IdealResult(
        picks=[int(v) for v in picks],
        spread=[float(c) * scale for c in met],
        evaluations=0,
        method="ris",
        theta=theta,
    )
    if progress is not None:
        for t in range(budget):
            progress(t + 1, budget)
    return result


# ------------------------------------------------------------------------------------------
# The reference cascade (A/B only)


def reference_insertion_order(graph: KnnGraph) -> NDArray[np.int64]:
    """The reference's networkx node order: 0, nbr[0] from least to most similar, 1, ...

    Each node appears at its first occurrence in that sequence; the reference greedy scans
    candidates in this order and keeps the first strict maximum.
    """
    n, k = graph.n, graph.k
    seq = np.empty((n, k + 1), dtype=np.int64)
    seq[:, 0] = np.arange(n)
    seq[:, 1:] = np.asarray(graph.nbr, dtype=np.int64)[:, ::-1]
    flat = seq.ravel()
    _, first_at = np.unique(flat, return_index=True)
    return np.asarray(flat[np.sort(first_at)], dtype=np.int64)


@njit
def _grow(buf: NDArray[np.int32], need: int) -> NDArray[np.int32]:
    if need <= buf.shape[0]:
        return buf
    grown = np.empty(max(need, 2 * buf.shape[0]), dtype=np.int32)
    grown[: buf.shape[0]] = buf
    return grown


@njit
def _reference_total(
    seeds: NDArray[np.int64],
    succ: NDArray[np.int32],
    succ_w: NDArray[np.float64],
    rounds: int,
    rng: np.random.Generator,
    active: NDArray[np.int64],
    epoch: NDArray[np.int64],
) -> int:
    # Reference `ic_diffusion_model`, summed over rounds. `active` (epoch-stamped) is updated
    # only at the end of a step, as the reference extends ActivatedNodes after the step: a node
    # reached by two frontier entries in one step is appended twice, counted twice and expands
    # twice. One draw per attempt on a not-yet-active successor, whatever its weight.
    k = succ.shape[1]
    total = 0
    frontier = np.empty(max(16, seeds.shape[0]), dtype=np.int32)
    nxt = np.empty(16, dtype=np.int32)
    for _ in range(rounds):
        epoch[0] += 1
        ep = epoch[0]
        nf = seeds.shape[0]
        for i in range(nf):
            frontier[i] = seeds[i]
            active[seeds[i]] = ep
        count = nf
        while nf > 0:
            nn = 0
            for i in range(nf):
                v = frontier[i]
                for j in range(k):
                    w = succ[v, j]
                    if active[w] != ep:
                        if rng.random() < succ_w[v, j]:
                            nxt = _grow(nxt, nn + 1)
                            nxt[nn] = w
                            nn += 1
            for i in range(nn):
                active[nxt[i]] = ep
            count += nn
            frontier = _grow(frontier, nn)
            frontier[:nn] = nxt[:nn]
            nf = nn
        total += count
    return total


@njit
def _reference_pick(
    selected: NDArray[np.int64],
    order: NDArray[np.int64],
    is_selected: NDArray[np.bool_],
    succ: NDArray[np.int32],
    succ_w: NDArray[np.float64],
    rounds: int,
    rng: np.random.Generator,
    active: NDArray[np.int64],
    epoch: NDArray[np.int64],
) -> tuple[int, int, int]:
    # One step of the reference greedy: a fresh R-round estimate of sigma(S + [v]) for every v
    # not in S, in insertion order, keeping the first strict maximum.
    m = selected.shape[0]
    trial = np.empty(m + 1, dtype=np.int64)
    trial[:m] = selected
    best = -1
    best_total = 0
    evals = 0
    for v in order:
        if is_selected[v]:
            continue
        trial[m] = v
        t = _reference_total(trial, succ, succ_w, rounds, rng, active, epoch)
        evals += 1
        if t > best_total:
            best_total = t
            best = v
    return best, best_total, evals


def _reference_tables(
    graph: KnnGraph, weights: NDArray[np.float64]
) -> tuple[NDArray[np.int32], NDArray[np.float64]]:
    # networkx successors come in edge-insertion order: least to most similar.
    succ = np.ascontiguousarray(np.asarray(graph.nbr, dtype=np.int32)[:, ::-1])
    succ_w = np.ascontiguousarray(weights[:, ::-1])
    return succ, succ_w


def reference_spread(
    graph: KnnGraph,
    weights: NDArray[np.float64],
    seeds: list[int] | NDArray[np.int64],
    rounds: int,
    rng: np.random.Generator,
) -> float:
    """The reference's `ic_diffusion_model(G, seeds, rounds)`: mean cascade count with its quirk.

    Not the standard IC spread: duplicates activated in the same step are counted (and expand)
    twice, which inflates the count (2.7 "Quirk"). Fresh draws on every call (not CRN).
    """
    succ, succ_w = _reference_tables(graph, weights)
    active = np.zeros(graph.n, dtype=np.int64)
    epoch = np.zeros(1, dtype=np.int64)
    seed_arr = np.asarray(seeds, dtype=np.int64)
    return _reference_total(seed_arr, succ, succ_w, rounds, rng, active, epoch) / rounds


def _reference_greedy(
    graph: KnnGraph,
    weights: NDArray[np.float64],
    budget: int,
    rounds: int,
    first_seed: FirstSeed,
    rng: np.random.Generator,
    progress: Progress | None,
) -> IdealResult:
    n = graph.n
    succ, succ_w = _reference_tables(graph, weights)
    order = reference_insertion_order(graph)
    active = np.zeros(n, dtype=np.int64)
    epoch = np.zeros(1, dtype=np.int64)
    is_selected = np.zeros(n, dtype=np.bool_)
    result = IdealResult(picks=[], spread=[], evaluations=0, method="reference")
    while len(result.picks) < budget:
        selected = np.asarray(result.picks, dtype=np.int64)
        if not result.picks and first_seed == "reference":
            # the reference's max-out-degree node is pool index 0; it is not estimated there,
            # one fresh estimate here fills spread[0]
            best = 0
            total = _reference_total(
                np.zeros(1, dtype=np.int64), succ, succ_w, rounds, rng, active, epoch
            )
            evals = 1
        else:
            best, total, evals = _reference_pick(
                selected, order, is_selected, succ, succ_w, rounds, rng, active, epoch
            )
        result.evaluations += evals
        is_selected[best] = True
        result.picks.append(int(best))
        result.spread.append(total / rounds)
        if progress is not None:
            progress(len(result.picks), budget)
    return result


# ------------------------------------------------------------------------------------------
# Entry point


def ideal_greedy(
    graph: KnnGraph,
    budget: int,
    *,
    rounds: int = DEFAULT_ROUNDS,
    first_seed: FirstSeed = "greedy",
    ic_variant: IcVariant = "standard",
    method: Method = "auto",
    theta: int | None = None,
    exact_max_n: int = DEFAULT_EXACT_MAX_N,
    rng: np.random.Generator,
    progress: Progress | None = None,
) -> IdealResult:
    """IDEAL selection of min(budget, N) pool positions (ALGORITHMS.md 2.7).

    Standard IC (`ic_variant="standard"`, default), weights from `edge_weights`:

    * `method="celf"` (and `"auto"` when N <= `exact_max_n`): draws `rounds` live-edge worlds
      with `sample_worlds(weights, rounds, rng)` (the only use of `rng`) and runs
      `world_celf`: the plain greedy's picks on those worlds, exactly (L0), with CELF lazy
      evaluation. `spread` is sigma_R after each pick.
    * `method="ris"` (and `"auto"` above `exact_max_n`): `theta` RR sets, greedy max coverage
      (`ris_greedy`, L0 on the sets). With `theta=None`, `RIS_PILOT_SETS` sets are drawn
      first to measure the mean RR-set size m, theta = `ris_theta(N, m)`, and the remaining
      theta - pilot sets are drawn and appended (all sets are i.i.d.). With an explicit
      `theta`, `sample_rr_sets(graph, weights, theta, rng)` is the only use of `rng`.
      `rounds` is unused.

    `first_seed="reference"` commits pool index 0 first (the reference's max-out-degree node);
    `"greedy"` runs the greedy from the empty set.

    `ic_variant="reference"` reproduces the reference `infmax` loop: at each step a *fresh*
    `rounds`-round Monte-Carlo estimate of sigma(S + [v]) with the duplicate-activation
    cascade quirk, for every v not in S in networkx insertion order, first strict maximum
    kept. It is not CRN, not submodular-safe (no CELF) and costs budget * N * rounds
    cascades: for A/B runs on small pools only; `method` must stay "auto".

    Deterministic given the generator's state. `progress(done, budget)` is called after each
    pick (RIS: once per pick after its compiled greedy loop has finished).

    Measured (2-core AMD EPYC, k = 10, R = 10, budget 100, centered random unit vectors,
    d = 384, exact graph; numba compile of ~10-20 s per process excluded): CELF 0.03 s at
    N = 3k, 0.3 s at 30k, 1.2 s at 100k (first round, N*R BFS, 0.9 s of it); RIS 0.05 / 0.9 /
    4.4 s. Mean singleton spread (= mean RR-set size) ~ 11-12: live out-degree is 1 on
    average, so cascades are near-critical but short (per world: median 3, p99 ~ 200).

    Raises ValueError on budget < 0, rounds < 1 or an invalid combination.
    """
    if budget < 0:
        raise ValueError("budget must be >= 0")
    if rounds < 1:
        raise ValueError("rounds must be >= 1")
    n = graph.n
    budget = min(budget, n)
    weights = edge_weights(graph)
    if ic_variant == "reference":
        if method != "auto":
            raise ValueError('ic_variant="reference" runs the reference greedy; use method="auto"')
        return _reference_greedy(graph, weights, budget, rounds, first_seed, rng, progress)
    first = 0 if first_seed == "reference" and budget > 0 else None
    use_ris = method == "ris" or (method == "auto" and n > exact_max_n)
    if not use_ris:
        worlds = sample_worlds(weights, rounds, rng)
        return world_celf(graph, worlds, budget, first=first, progress=progress)
    if theta is None:
        pilot = sample_rr_sets(graph, weights, RIS_PILOT_SETS, rng)
        mean_size = pilot.nodes.shape[0] / max(pilot.theta, 1)
        theta = ris_theta(n, mean_size)
        rest = sample_rr_sets(graph, weights, max(theta - pilot.theta, 0), rng)
        rr = _concat_rr(pilot, rest)
    else:
        rr = sample_rr_sets(graph, weights, theta, rng)
    result = ris_greedy(rr, n, budget, first=first, progress=progress)
    result.extras["mean_rr_size"] = rr.nodes.shape[0] / max(rr.theta, 1)
    return result


class IdealParams(BaseModel):
    """Request parameters of IDEAL bank selection (ALGORITHMS.md 2.7); see `ideal_greedy`."""

    model_config = ConfigDict(extra="forbid")

    k: int = Field(
        DEFAULT_K,
        ge=1,
        le=1000,
        description="Graph degree: out-edges per item to its k most similar items (reference 10).",
    )
    rounds: int = Field(
        DEFAULT_ROUNDS,
        ge=1,
        le=1000,
        description=(
            "Live-edge worlds (common random numbers) for the CELF estimator; the reference's "
            "rand_iter is 10, 100+ ranks candidates with less noise. Unused by RIS."
        ),
    )
    first_seed: FirstSeed = Field(
        "greedy",
        description=(
            '"greedy": pick the most influential item first; "reference": force pool index 0 '
            "first, as the reference implementation does."
        ),
    )
    ic_variant: IcVariant = Field(
        "standard",
        description=(
            '"standard": textbook independent cascade; "reference": the reference cascade that '
            "counts same-step duplicate activations twice, with fresh simulations per "
            "evaluation (slow, small pools only, for A/B comparisons)."
        ),
    )
    method: Method = Field(
        "auto",
        description=(
            '"celf": lazy greedy on sampled live-edge worlds (exact greedy on those worlds); '
            '"ris": reverse influence sampling with greedy max coverage; "auto": CELF up to '
            "exact_max_n items, RIS above."
        ),
    )
    theta: int | None = Field(
        None,
        ge=1,
        description=(
            "Number of reverse-reachable sets for RIS; null = 64 * N / (measured mean RR-set "
            "size), capped by memory."
        ),
    )
    exact_max_n: int = Field(
        DEFAULT_EXACT_MAX_N,
        ge=0,
        description='Largest pool for which method="auto" uses CELF; larger pools use RIS.',
    )
    graph_exact_max_n: int = Field(
        GRAPH_EXACT_MAX_N,
        ge=0,
        description="Largest pool given an exact kNN graph; bigger pools use IVF with "
        "measured recall.",
    )
