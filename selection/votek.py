"""Vote-k bank selection over a pool's kNN graph (ALGORITHMS.md 2.4, 2.5) and the
token-budgeted similar-first assembly that two-stage vote-k prompts are built with (1.3).

Every position here is a pool position 0..N-1 (the rows of the `KnnGraph`); the app maps
positions to example ids. Two modes:

* default — the spec's canonical behaviour: exact-arithmetic scores (level L0 of 0.4
  against a literal port of the reference loop run with `fractions.Fraction`), zero-score
  candidates stay eligible, a selected item is never picked twice.
* `reference_compat=True` — the float64 choices of the reference code (HKUNLP
  icl-selective-annotation `two_steps.py`): same summation order, same first-maximum
  argmax, and in two-stage mode the missing `c(v)` update after stage-2 picks. Where the
  reference would pick an already selected item again (it runs out of scorable candidates)
  we fall back to the canonical behaviour instead; that is the only deviation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field

from selection.graph import GRAPH_EXACT_MAX_N, KnnGraph
from selection.heap import before
from selection.jit import njit

ConfidenceFn = Callable[[list[int], list[int]], NDArray[np.float64]]
"""`confidence(bank_positions, target_positions)`: one score per target, HIGHER = MORE
confident (the app converts LM signals: classification `-min option NLL`, generation mean
token log-prob, sampling the majority fraction)."""

NEAR_TIE_REL = 1e-12
"""Relative window (ALGORITHMS.md 2.4 step 4) inside which float64 scores are re-decided
exactly; widened automatically for hubs whose float sums could err by more."""

SUBSAMPLE_FLOOR = 3000
"""Default two-stage sample: the whole pool up to max(3000, 30*M) items, else that many."""


@dataclass(slots=True)
class VoteKResult:
    """Outcome of a vote-k run.

    `picks`: pool positions in pick order (distinct). `random_fill`: how many of them (the
    last ones of their stage) were drawn uniformly at random because no candidate was left
    (2.4: U minus L empty; 2.5: buckets exhausted). `exact_tie_checks`: decisions where float64
    scores were within the near-tie window and exact integer arithmetic decided (default mode).
    Two-stage only: `stage1` = picks made by fast vote-k, `sample_size` = |S| scored by the
    confidence function, `bucket_width` = w of 2.5 step 4 (0 when stage 2 had no bucket).
    """

    picks: list[int]
    random_fill: int = 0
    exact_tie_checks: int = 0
    stage1: int = 0
    sample_size: int = 0
    bucket_width: int = 0


# --------------------------------------------------------------------------------------------
# shared graph-derived state


@dataclass(slots=True)
class _VoteState:
    """Mutable selection state over one graph: L (`sel`), c(v) (`times`) and the term table."""

    nbr: NDArray[np.int32]
    indptr: NDArray[np.int64]
    voters: NDArray[np.int32]
    sel: NDArray[np.bool_]
    times: NDArray[np.int64]
    terms: NDArray[np.float64]
    rho: Fraction

    @staticmethod
    def create(graph: KnnGraph, rho: float, budget: int) -> _VoteState:
        # rho < 1 would make rho**-c overflow for large c; rho = 1 is plain vote counting
        if not (math.isfinite(rho) and rho >= 1):
            raise ValueError(f"rho must be a finite number >= 1, got {rho}")
        n = graph.n
        # term[c] = rho ** -c exactly as the reference's `10 ** (-c)` evaluates it (C pow);
        # c(v) never exceeds the number of picks
        terms = np.array([float(rho) ** (-c) for c in range(budget + 2)], dtype=np.float64)
        return _VoteState(
            nbr=np.ascontiguousarray(graph.nbr, dtype=np.int32),
            indptr=np.ascontiguousarray(graph.voters_indptr, dtype=np.int64),
            voters=np.ascontiguousarray(graph.voters_indices, dtype=np.int32),
            sel=np.zeros(n, dtype=np.bool_),
            times=np.zeros(n, dtype=np.int64),
            terms=terms,
            rho=Fraction(float(rho)),
        )

    def select(self, u: int, *, update_times: bool = True) -> None:
        self.sel[u] = True
        if update_times:
            _bump_times(self.indptr, self.voters, self.times, u)

    def exact_best(self, members: NDArray[np.int64]) -> int:
        """Index into `members` of the largest exact score, first one on equality.

        score(u) = Σ_{v ∈ voters(u) \\ L} ρ^(−c(v)); with ρ = p/q exactly (a float ρ is its
        binary value) and C = the largest c(v) among the members' unselected voters,
        p^C·score(u) = Σ p^(C−c(v))·q^c(v) is an integer, so comparing those Python integers
        compares the scores exactly (2.4 step 4 with D = C ≤ M; the scale is common to all).
        """
        hist = _histograms(members, self.indptr, self.voters, self.sel, self.times)
        p, q = self.rho.numerator, self.rho.denominator
        top = hist.shape[1] - 1
        weights = [p ** (top - c) * q**c for c in range(top + 1)]
        best_i, best_v = 0, -1
        for i in range(hist.shape[0]):
            row = hist[i]
            value = sum(int(row[c]) * weights[c] for c in np.flatnonzero(row).tolist())
            if value > best_v:
                best_i, best_v = i, value
        return best_i


def _pi_order(graph: KnnGraph) -> NDArray[np.int64]:
    """Candidates U in the canonical tie order π of ALGORITHMS.md 2.4.

    Vote count descending; equal counts by the position of u's first vote in the scan
    "v = 0..N-1, within v its neighbours from least to most similar" — the reference appends
    to a dict in that scan and sorts it stably by count, so this is its iteration order.
    """
    counts = graph.in_degree()
    first = _first_vote(np.ascontiguousarray(graph.nbr, dtype=np.int32), graph.n)
    cand = np.flatnonzero(counts > 0)
    order = np.lexsort((first[cand], -counts[cand]))
    return cand[order].astype(np.int64)


def _random_fill(sel: NDArray[np.bool_], need: int, rng: np.random.Generator) -> list[int]:
    """`need` distinct unselected positions, `rng.choice(free, need, replace=False)` over the
    unselected positions in ascending order; the draw order is the pick order."""
    if need <= 0:
        return []
    free = np.flatnonzero(~sel)
    draw = rng.choice(free, size=min(need, free.shape[0]), replace=False)
    return [int(x) for x in draw]


# --------------------------------------------------------------------------------------------
# fast vote-k (2.4)


def fast_votek(
    graph: KnnGraph,
    budget: int,
    *,
    rho: float = 10.0,
    reference_compat: bool = False,
    rng: np.random.Generator,
) -> VoteKResult:
    """Fast vote-k (ALGORITHMS.md 2.4): min(budget, N) distinct pool positions in pick order.

    Every item votes for its k graph neighbours; with c(v) = |nbr[v] ∩ L|, each round picks
    the unselected candidate u (|voters(u)| ≥ 1) maximising
    score(u) = Σ_{v ∈ voters(u), v ∉ L} ρ^(−c(v)), ties by π (vote count descending, then
    first vote in scan order), and then adds 1 to c(v) for every voter of the pick.

    Default mode (L0 vs the exact-rational reference loop): lazy max-heap keyed by
    (−score, rank in π). A pick marks the scores it changes stale (steps 3a/3b: nbr[s] and
    nbr[v] for v ∈ voters(s)) and bumps c (3c); a stale entry reaching the top is re-scored
    from scratch. Every float score is therefore the same fixed-order sum of (v, c(v)) terms,
    never an accumulation of deltas: it only ever decreases (so heap keys are upper bounds)
    and its relative error is at most (in-degree + 2)·2^−53. Entries within
    max(1e-12, 4·(max in-degree + 2)·2^−53) of the best are then decided by exact integer
    arithmetic (`exact_tie_checks` counts those decisions), then by π. Zero-score candidates
    stay eligible; when U \\ L is empty the rest is drawn uniformly from the unselected pool
    with `rng` (`random_fill`). Cost: O(N·k) set-up plus O(k + |voters(s)|·k) per pick plus
    O(in-degree) per re-scored entry.

    `reference_compat=True`: the reference loop's float64 choices — every round re-sums each
    candidate's unselected voters in ascending v with the terms `float(rho) ** -c`, and takes
    the first maximum in π order; candidates without unselected voters are not scored. If
    nothing is left to score, where the reference re-picks a selected item, this falls back
    to the canonical zero-score / random-fill rule. O(M·N·k); for parity on small pools.

    Consumes `rng` only for the random fill. Raises ValueError for budget < 0 or rho < 1.
    """
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    m = min(budget, graph.n)
    st = _VoteState.create(graph, rho, m)
    order = _pi_order(graph)
    if reference_compat:
        picks = _reference_rounds(st, order, m)
        checks = 0
    else:
        picks, checks = _heap_rounds(st, order, m, graph.in_degree())
    for u in picks:
        st.sel[u] = True
    fill = _random_fill(st.sel, m - len(picks), rng)
    return VoteKResult(picks=picks + fill, random_fill=len(fill), exact_tie_checks=checks)


def _window(max_degree: int) -> tuple[float, float]:
    """Relative and absolute slack of the near-tie window for sums of <= max_degree terms."""
    rel = max(NEAR_TIE_REL, 4.0 * (max_degree + 2) * 2.0**-53)
    # subnormal terms lose relative precision: cover their absolute error too
    return rel, (max_degree + 1) * 2.0**-1022


def _heap_rounds(
    st: _VoteState, order: NDArray[np.int64], m: int, indeg: NDArray[np.int64]
) -> tuple[list[int], int]:
    n_cand = order.shape[0]
    # sorted by π and the initial scores (vote counts) are π's primary key, so the array is
    # already a valid heap
    heap_s = indeg[order].astype(np.float64)
    heap_r = np.arange(n_cand, dtype=np.int64)
    size = np.array([n_cand], dtype=np.int64)
    stale = np.zeros(indeg.shape[0], dtype=np.bool_)
    out_r = np.empty(n_cand, dtype=np.int64)
    out_s = np.empty(n_cand, dtype=np.float64)
    rel, slack = _window(int(indeg.max()) if indeg.shape[0] else 0)
    picks: list[int] = []
    checks = 0
    while len(picks) < m:
        cnt = _collect_top(
            heap_s, heap_r, size, order, st.sel, stale, st.indptr, st.voters, st.times,
            st.terms, rel, slack, out_r, out_s,
        )  # fmt: skip
        if cnt == 0:
            break  # U \ L is empty
        best = 0
        if cnt > 1:
            checks += 1
            # float order is not π order among exact ties: offer the members by rank so the
            # first exact maximum is the π-first one
            by_rank = np.argsort(out_r[:cnt], kind="stable")
            best = int(by_rank[st.exact_best(order[out_r[:cnt][by_rank]])])
        for i in range(cnt):
            if i != best:
                _heap_push(heap_s, heap_r, size, out_s[i], out_r[i])
        s = int(order[out_r[best]])
        picks.append(s)
        st.sel[s] = True
        _apply_pick(st.nbr, st.indptr, st.voters, st.times, stale, s)
    return picks, checks


def _reference_rounds(st: _VoteState, order: NDArray[np.int64], m: int) -> list[int]:
    picks: list[int] = []
    while len(picks) < m:
        u = int(_reference_argmax(order, st.sel, st.indptr, st.voters, st.times, st.terms))
        if u < 0:
            # the reference would re-pick a selected item here; take the canonical rule
            # (first unselected candidate in π order, all of which score zero now)
            free = order[~st.sel[order]]
            if free.shape[0] == 0:
                break
            u = int(free[0])
        picks.append(u)
        st.select(u)
    return picks


# --------------------------------------------------------------------------------------------
# two-stage vote-k (2.5)


def two_stage_votek(
    graph: KnnGraph,
    budget: int,
    *,
    confidence: ConfidenceFn,
    stage1: int = 10,
    rho: float = 10.0,
    coverage: float = 0.9,
    sample_size: int | None = None,
    reference_compat: bool = False,
    rng: np.random.Generator,
) -> VoteKResult:
    """Vote-k with LM confidence (ALGORITHMS.md 2.5): min(budget, N) distinct positions.

    1. L = `fast_votek(graph, min(stage1, budget))` (same mode and ρ).
    2. S = the positions to score: the whole pool when `sample_size` is None and
       N <= max(3000, 30*budget) or `sample_size` >= N; else a seeded uniform sample
       (`rng.choice(N, size, replace=False)`, sorted ascending) of `sample_size` items, or of
       max(3000, 30*budget) when it is None — the L4 adaptation of 2.5; with S = pool this is
       L0 against the reference given the same confidences.
    3. `confidence(L, S \\ L)` (both ascending lists of positions; selected items are not
       sent, which saves their LM calls) returns one float per target, HIGHER = MORE
       confident. Ranking: S \\ L by ascending confidence (stable, so ties keep ascending
       position), then S ∩ L last (the reference's ∓inf for selected items).
    4. M2 = budget − |L|; bucket width w = int(|S| * coverage / M2) in float arithmetic like
       the reference; for t = 0, 1, … while short and t·w < |S|, bucket t = ranks
       [t·w, (t+1)·w): pick the unselected member with the largest vote-k score (2.4; no
       votes ⇒ 0), ties by the first in the bucket (least confident). Default mode: scores
       exact (near-ties decided in integers) and c(v) updated after each pick.
       `reference_compat`: float64 reference sums, c(v) frozen after stage 1 (the reference
       never applies the stage-2 update), and an item whose voters are all selected is not
       eligible (the reference never enters it in its score table). Both modes skip a bucket
       with no eligible member (the reference would re-pick a selected one); w = 0 means no
       bucket at all (the reference would fail on an empty bucket).
    5. Short of M (tiny pools, skipped buckets): uniform random fill from the unselected pool.

    `rng` draws, in order: stage-1 fill (if any), the sample (if subsampled), the final fill.
    Raises ValueError for a confidence array of the wrong shape or with NaN.
    """
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    if not 0.0 < coverage <= 1.0:
        raise ValueError(f"coverage must be in (0, 1], got {coverage}")
    n = graph.n
    m = min(budget, n)
    first = fast_votek(
        graph, min(max(stage1, 0), m), rho=rho, reference_compat=reference_compat, rng=rng
    )
    st = _VoteState.create(graph, rho, m)
    for u in first.picks:
        st.select(u)
    picks = list(first.picks)
    result = VoteKResult(
        picks=picks,
        random_fill=first.random_fill,
        exact_tie_checks=first.exact_tie_checks,
        stage1=len(picks),
    )
    m2 = m - len(picks)
    if m2 <= 0:
        return result

    sample = _two_stage_sample(n, m, sample_size, rng)
    result.sample_size = int(sample.shape[0])
    in_bank = st.sel[sample]
    targets = sample[~in_bank]
    conf = np.asarray(confidence(list(picks), [int(x) for x in targets]), dtype=np.float64)
    if conf.shape != targets.shape:
        raise ValueError(f"confidence returned shape {conf.shape}, expected {targets.shape}")
    if np.isnan(conf).any():
        raise ValueError("confidence returned NaN")
    ranked = np.concatenate([targets[np.argsort(conf, kind="stable")], sample[in_bank]])

    width = int(sample.shape[0] * coverage / m2)
    result.bucket_width = width
    if width > 0:
        rel, slack = _window(int(np.diff(st.indptr).max()) if n else 0)
        t = 0
        while len(picks) < m and t * width < ranked.shape[0]:
            bucket = ranked[t * width : (t + 1) * width]
            t += 1
            if reference_compat:
                u = int(
                    _reference_bucket_pick(bucket, st.sel, st.indptr, st.voters, st.times, st.terms)
                )
            else:
                u, tie = _bucket_pick(st, bucket, rel, slack)
                result.exact_tie_checks += tie
            if u < 0:
                continue  # every member already selected
            picks.append(u)
            st.select(u, update_times=not reference_compat)

    fill = _random_fill(st.sel, m - len(picks), rng)
    picks.extend(fill)
    result.random_fill += len(fill)
    return result


def _two_stage_sample(
    n: int, budget: int, sample_size: int | None, rng: np.random.Generator
) -> NDArray[np.int64]:
    if sample_size is None:
        size = max(SUBSAMPLE_FLOOR, 30 * budget)
    else:
        if sample_size < 1:
            raise ValueError(f"sample_size must be >= 1, got {sample_size}")
        size = sample_size
    if size >= n:
        return np.arange(n, dtype=np.int64)
    return np.sort(rng.choice(n, size=size, replace=False)).astype(np.int64)


def _bucket_pick(
    st: _VoteState, bucket: NDArray[np.int64], rel: float, slack: float
) -> tuple[int, int]:
    """Default-mode bucket decision: (position or -1, 1 if exact arithmetic decided)."""
    members = bucket[~st.sel[bucket]]
    if members.shape[0] == 0:
        return -1, 0
    scores = _fresh_scores(members, st.sel, st.indptr, st.voters, st.times, st.terms)
    top = float(scores.max())
    near = np.flatnonzero(scores >= top - (top * rel + slack))
    if near.shape[0] == 1:
        return int(members[near[0]]), 0
    # exact_best keeps the first of equal values, i.e. the least confident one
    return int(members[near[st.exact_best(members[near])]]), 1


# --------------------------------------------------------------------------------------------
# 1.3 assembly


def assemble_similar(
    query_pos: int | None,
    bank: Sequence[int],
    sims: NDArray[np.floating],
    lengths: Sequence[int],
    *,
    query_tokens: int,
    max_total: int = 1000,
    max_single: int | None = 250,
) -> list[int]:
    """Similar-first token-budgeted demonstrations for one query (ALGORITHMS.md 1.3).

    `bank[j]` is a pool position, `sims[j]` its similarity to the query, `lengths[j]` its
    tokens(input) + tokens(output). Walk the bank by descending similarity (ties by
    ascending position), starting from `used = query_tokens`: skip an item whose similarity
    is exactly 1 or whose position is `query_pos` (the query itself); skip it if
    `max_single` is set and its length exceeds it; otherwise add its length and stop the
    walk at the first item that takes `used` past `max_total` (no later, shorter item is
    tried), else keep it. Returns the kept positions in ascending similarity (nearest last).
    L0 against the reference walk (whose unstable argsort leaves exact ties unspecified).
    """
    pos = np.asarray(bank, dtype=np.int64)
    s = np.asarray(sims)
    if s.shape != pos.shape or len(lengths) != pos.shape[0]:
        raise ValueError("bank, sims and lengths must be aligned")
    walk = np.lexsort((pos, -s.astype(np.float64)))
    used = query_tokens
    kept: list[int] = []
    for j in walk.tolist():
        if s[j] == 1 or (query_pos is not None and int(pos[j]) == query_pos):
            continue
        size = int(lengths[j])
        if max_single is not None and size > max_single:
            continue
        used += size
        if used > max_total:
            break
        kept.append(int(pos[j]))
    kept.reverse()
    return kept


# --------------------------------------------------------------------------------------------
# API parameters


class VoteKParams(BaseModel):
    """Parameters of a fast vote-k fit (ALGORITHMS.md 2.4)."""

    model_config = ConfigDict(extra="forbid")

    k: int = Field(
        150,
        ge=1,
        le=1000,
        description="Graph degree: each item votes for its k nearest neighbours (centered "
        "cosine). 150 reproduces the paper on 3,000-item pools; consider 20-50 at 1M.",
    )
    rho: float = Field(
        10.0,
        gt=1.0,
        description="Discount: a voter that already voted for c selected items adds rho**-c.",
    )
    reference_compat: bool = Field(
        False,
        description="Reproduce the reference code's float64 choices instead of the exact "
        "canonical ones (parity runs on small pools; O(M*N*k)).",
    )
    graph_exact_max_n: int = Field(
        GRAPH_EXACT_MAX_N,
        ge=0,
        description="Largest pool given an exact kNN graph; bigger pools use IVF with "
        "measured recall.",
    )


class TwoStageParams(VoteKParams):
    """Parameters of two-stage vote-k with LM confidence (ALGORITHMS.md 2.5)."""

    stage1: int = Field(
        10, ge=0, description="Items picked by fast vote-k before the confidence pass (M1)."
    )
    coverage: float = Field(
        0.9,
        gt=0.0,
        le=1.0,
        description="Fraction of the confidence ranking split into buckets; the most "
        "confident rest is never considered.",
    )
    sample_size: int | None = Field(
        None,
        ge=1,
        description="Items scored by the LM (one call each); default the whole pool up to "
        "max(3000, 30*budget) items, else a seeded sample of that many.",
    )
    max_total_tokens: int = Field(
        1000, ge=1, description="Token budget of a confidence prompt (demonstrations + query)."
    )
    max_example_tokens: int | None = Field(
        250,
        ge=1,
        description="Demonstrations longer than this are skipped; null for no limit.",
    )


# --------------------------------------------------------------------------------------------
# numba kernels


@njit
def _first_vote(nbr: NDArray[np.int32], n: int) -> NDArray[np.int64]:
    """Scan position of each item's first vote (-1: never voted for), in the π scan order."""
    rows, k = nbr.shape
    first = np.full(n, -1, dtype=np.int64)
    for v in range(rows):
        for j in range(k - 1, -1, -1):  # least similar neighbour first
            u = nbr[v, j]
            if first[u] < 0:
                first[u] = v * k + (k - 1 - j)
    return first


@njit
def _score(
    u: int,
    sel: NDArray[np.bool_],
    indptr: NDArray[np.int64],
    voters: NDArray[np.int32],
    times: NDArray[np.int64],
    terms: NDArray[np.float64],
) -> float:
    """Σ over u's unselected voters, ascending v, of rho**-c(v): the reference's order."""
    s = 0.0
    for p in range(indptr[u], indptr[u + 1]):
        v = voters[p]
        if not sel[v]:
            s += terms[times[v]]
    return s


@njit
def _fresh_scores(
    members: NDArray[np.int64],
    sel: NDArray[np.bool_],
    indptr: NDArray[np.int64],
    voters: NDArray[np.int32],
    times: NDArray[np.int64],
    terms: NDArray[np.float64],
) -> NDArray[np.float64]:
    out = np.empty(members.shape[0], dtype=np.float64)
    for i in range(members.shape[0]):
        out[i] = _score(members[i], sel, indptr, voters, times, terms)
    return out


@njit
def _histograms(
    members: NDArray[np.int64],
    indptr: NDArray[np.int64],
    voters: NDArray[np.int32],
    sel: NDArray[np.bool_],
    times: NDArray[np.int64],
) -> NDArray[np.int64]:
    """hist[i, c] = number of unselected voters v of members[i] with c(v) = c."""
    top = 0
    for i in range(members.shape[0]):
        u = members[i]
        for p in range(indptr[u], indptr[u + 1]):
            v = voters[p]
            if not sel[v] and times[v] > top:
                top = times[v]
    hist = np.zeros((members.shape[0], top + 1), dtype=np.int64)
    for i in range(members.shape[0]):
        u = members[i]
        for p in range(indptr[u], indptr[u + 1]):
            v = voters[p]
            if not sel[v]:
                hist[i, times[v]] += 1
    return hist


@njit
def _bump_times(
    indptr: NDArray[np.int64], voters: NDArray[np.int32], times: NDArray[np.int64], s: int
) -> None:
    for p in range(indptr[s], indptr[s + 1]):
        times[voters[p]] += 1


@njit
def _apply_pick(
    nbr: NDArray[np.int32],
    indptr: NDArray[np.int64],
    voters: NDArray[np.int32],
    times: NDArray[np.int64],
    stale: NDArray[np.bool_],
    s: int,
) -> None:
    """Steps 3a-3c of 2.4 for pick s: mark every score that changes stale, bump c(v)."""
    k = nbr.shape[1]
    for j in range(k):  # (a) s no longer votes
        stale[nbr[s, j]] = True
    for p in range(indptr[s], indptr[s + 1]):  # (b) each voter's vote is discounted
        v = voters[p]
        times[v] += 1  # (c)
        for j in range(k):
            stale[nbr[v, j]] = True


@njit
def _heap_push(
    hs: NDArray[np.float64], hr: NDArray[np.int64], size: NDArray[np.int64], s: float, r: int
) -> None:
    i = size[0]
    size[0] += 1
    while i > 0:
        parent = (i - 1) // 2
        if not before(s, r, hs[parent], hr[parent]):
            break
        hs[i] = hs[parent]
        hr[i] = hr[parent]
        i = parent
    hs[i] = s
    hr[i] = r


@njit
def _heap_pop(
    hs: NDArray[np.float64], hr: NDArray[np.int64], size: NDArray[np.int64]
) -> tuple[float, int]:
    top_s = hs[0]
    top_r = hr[0]
    size[0] -= 1
    n = size[0]
    if n > 0:
        s = hs[n]
        r = hr[n]
        i = 0
        while True:
            child = 2 * i + 1
            if child >= n:
                break
            if child + 1 < n and before(hs[child + 1], hr[child + 1], hs[child], hr[child]):
                child += 1
            if not before(hs[child], hr[child], s, r):
                break
            hs[i] = hs[child]
            hr[i] = hr[child]
            i = child
        hs[i] = s
        hr[i] = r
    return top_s, top_r


@njit
def _collect_top(
    hs: NDArray[np.float64],
    hr: NDArray[np.int64],
    size: NDArray[np.int64],
    order: NDArray[np.int64],
    sel: NDArray[np.bool_],
    stale: NDArray[np.bool_],
    indptr: NDArray[np.int64],
    voters: NDArray[np.int32],
    times: NDArray[np.int64],
    terms: NDArray[np.float64],
    rel: float,
    slack: float,
    out_r: NDArray[np.int64],
    out_s: NDArray[np.float64],
) -> int:
    """Pop the current best candidate and every other one within the near-tie window.

    Selected entries are dropped, stale ones re-scored and pushed back (keys only decrease,
    so a fresh entry on top is the float maximum). Returns how many fresh entries were
    popped into out_r / out_s (best first); 0 if the heap ran empty.
    """
    cnt = 0
    thr = 0.0
    while size[0] > 0:
        if cnt > 0 and hs[0] < thr:
            break
        s, r = _heap_pop(hs, hr, size)
        u = order[r]
        if sel[u]:
            continue
        if stale[u]:
            stale[u] = False
            _heap_push(hs, hr, size, _score(u, sel, indptr, voters, times, terms), r)
            continue
        if cnt == 0:
            thr = s - (s * rel + slack)
        out_r[cnt] = r
        out_s[cnt] = s
        cnt += 1
    return cnt


@njit
def _reference_argmax(
    order: NDArray[np.int64],
    sel: NDArray[np.bool_],
    indptr: NDArray[np.int64],
    voters: NDArray[np.int32],
    times: NDArray[np.int64],
    terms: NDArray[np.float64],
) -> int:
    """One round of the reference loop: first maximum, in π order, over candidates that
    still have an unselected voter; -1 when none has."""
    best = -1
    best_s = 0.0
    for i in range(order.shape[0]):
        u = order[i]
        if sel[u]:
            continue
        s = 0.0
        scored = False
        for p in range(indptr[u], indptr[u + 1]):
            v = voters[p]
            if not sel[v]:
                s += terms[times[v]]
                scored = True
        if scored and (best < 0 or s > best_s):
            best = u
            best_s = s
    return best


@njit
def _reference_bucket_pick(
    bucket: NDArray[np.int64],
    sel: NDArray[np.bool_],
    indptr: NDArray[np.int64],
    voters: NDArray[np.int32],
    times: NDArray[np.int64],
    terms: NDArray[np.float64],
) -> int:
    """Reference stage-2 bucket: first maximum of the float sums, -1 if nobody is eligible.

    As in the reference score table: an item nobody votes for scores 0; an item whose voters
    are all selected is never entered (not eligible); selected members are excluded (the
    reference's -100, except that it could re-pick one when nothing else is eligible)."""
    best = -1
    best_s = 0.0
    for i in range(bucket.shape[0]):
        u = bucket[i]
        if sel[u]:
            continue
        s = 0.0
        scored = indptr[u] == indptr[u + 1]
        for p in range(indptr[u], indptr[u + 1]):
            v = voters[p]
            if not sel[v]:
                s += terms[times[v]]
                scored = True
        if scored and (best < 0 or s > best_s):
            best = u
            best_s = s
    return best
