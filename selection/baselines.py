"""Pool-level baselines: random, diversity and maximum facility location (ALGORITHMS.md 2.1-2.3).

Every function takes the pool in pool order and returns an ordered list of distinct pool
positions 0..N-1 (the bank). Diversity and MFL take `X_centered`: the pool's embeddings with
the pool mean subtracted and every row L2-normalised (ALGORITHMS.md 0.2), so that the centered
cosine is `cc(i, j) = <X_i, X_j>`. The callers own the centering (the pool mean is stored with
the index); nothing here re-centers.

Conformance (ALGORITHMS.md 0.4, 8 items 3-4):
* `random_subset`: L2 with the reference given the same seed.
* `diversity_subset`: L1 against a float64 brute force fed the same generator draws.
* `mfl_subset(mode="exact")`: L1 against the dense greedy (float32 similarities, so the
  near-tie threshold is the float32 one, 1e-5 relative).
* `mfl_subset(mode="sparse")`: L0 against a brute-force greedy on the sparse objective over the
  same graph; L4 against the dense objective.
"""

from __future__ import annotations

import heapq
import random
from typing import Literal

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field

from selection.graph import GRAPH_EXACT_MAX_N, KnnGraph
from selection.heap import sift_down
from selection.jit import njit

__all__ = [
    "MFL_AUTO_EXACT_MAX_N",
    "MFL_MATRIX_MAX_BYTES",
    "DiversityParams",
    "MflParams",
    "RandomParams",
    "diversity_subset",
    "mfl_objective",
    "mfl_subset",
    "random_subset",
]

MFL_MATRIX_MAX_BYTES = 1 << 30
"""Default memory budget of exact MFL for keeping the N x N float32 similarity matrix
(1 GiB: pools up to 16,384 items); larger pools recompute similarity rows on demand."""

MFL_AUTO_EXACT_MAX_N = 16_384
"""`MflParams(mode="auto")` runs exact CELF up to this pool size and sparse MFL above it: the
largest pool whose N x N float32 matrix fits `MFL_MATRIX_MAX_BYTES`. Measured on the shared
2-core box (d = 384, M = 100): exact 0.5 s at N = 3,000 and 18 s at N = 16,384 (mostly the one
N x N sgemm); without the matrix, about 11 recomputation passes of N^2 * d: 8 min at 30,000."""

# Largest similarity block (rows x N float32 entries) materialised at once: 2^24 floats = 64 MiB.
# It bounds memory independently of N while keeping blocks large enough for an efficient sgemm.
_BLOCK_ELEMS = 1 << 24
_MAX_BATCH_ROWS = 1024
# Diversity keeps a float64 copy of X when it is at most this many elements (16 MiB); larger
# pools are converted at every step in blocks of about 1 MiB of float64, small enough to stay
# in L2 between the conversion and the product (measured: as fast as a full float64 copy,
# while 20k-row blocks were 4x slower).
_F64_COPY_MAX_ELEMS = 1 << 21
_F64_BLOCK_ELEMS = 1 << 17


def _check_budget(budget: int) -> None:
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")


def _check_matrix(x: NDArray[np.float32]) -> None:
    if x.ndim != 2:
        raise ValueError(f"X_centered must be 2-D (N, d), got shape {x.shape}")


# --------------------------------------------------------------------------------------------
# 2.1 random


def random_subset(n: int, budget: int, *, seed: int) -> list[int]:
    """`budget` distinct positions of a pool of `n`, uniformly at random (ALGORITHMS.md 2.1).

    Exactly `random.Random(seed).sample(range(n), budget)`, so it is L2 with the reference's
    `random.sample` when fed the same seed (the reference seeds the global generator once and
    draws the pool from it first; parity tests call this directly). A private generator is
    used, never the global one (0.3). `budget > n` returns all `n` positions in sampled order
    (a random permutation) instead of raising like `random.sample`. Cost O(budget).
    """
    _check_budget(budget)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return random.Random(seed).sample(range(n), min(budget, n))


# --------------------------------------------------------------------------------------------
# 2.2 diversity


def _column_f64(
    x: NDArray[np.float32], x64: NDArray[np.float64] | None, j: int
) -> NDArray[np.float64]:
    """`X @ X_j` in float64, streaming X in blocks when no float64 copy is kept."""
    v = x[j].astype(np.float64)
    if x64 is not None:
        col: NDArray[np.float64] = x64 @ v
        return col
    n, d = x.shape
    rows = max(1, _F64_BLOCK_ELEMS // max(d, 1))
    out = np.empty(n, dtype=np.float64)
    for lo in range(0, n, rows):
        hi = min(n, lo + rows)
        out[lo:hi] = x[lo:hi].astype(np.float64) @ v
    return out


def diversity_subset(
    X_centered: NDArray[np.float32], budget: int, *, rng: np.random.Generator
) -> list[int]:
    """Min-total-similarity greedy, in pick order (ALGORITHMS.md 2.2).

    First item `int(rng.integers(N))` (the reference's `random.choice`, drawn from the
    caller's generator instead of the global state); then `budget - 1` times the arg-min over
    unselected i of `T(i) = sum_{s in L} cc(i, s)`, first index on ties (`np.argmin`).
    `T` is a running float64 sum updated with one column `X @ x_new` per pick, computed in
    float64 so that it agrees with a float64 brute force up to 1e-9-relative near-ties (L1);
    selected items hold `+inf`. Returns `min(budget, N)` items; `budget == 0` or an empty pool
    returns `[]` without drawing from `rng`.

    Cost O(budget * N * d) time; memory O(N) beyond X, plus a float64 copy of X for pools of
    at most 2^23 elements (otherwise X is converted in blocks at each step).
    """
    _check_matrix(X_centered)
    _check_budget(budget)
    n = int(X_centered.shape[0])
    m = min(budget, n)
    if m == 0:
        return []
    x = np.ascontiguousarray(X_centered, dtype=np.float32)
    x64 = x.astype(np.float64) if x.size <= _F64_COPY_MAX_ELEMS else None
    first = int(rng.integers(n))
    picks = [first]
    total = _column_f64(x, x64, first)
    # +inf survives every later addition of a finite column, so one assignment excludes s.
    total[first] = np.inf
    while len(picks) < m:
        s = int(np.argmin(total))
        picks.append(s)
        total += _column_f64(x, x64, s)
        total[s] = np.inf
    return picks


# --------------------------------------------------------------------------------------------
# 2.3 maximum facility location: exact CELF


@njit
def _fl_gains(
    sims: NDArray[np.float32], best: NDArray[np.float64], out: NDArray[np.float64]
) -> None:
    """out[r] = sum_i max(0, sims[r, i] - best[i]), accumulated in float64 in ascending i."""
    rows, n = sims.shape
    for r in range(rows):
        acc = 0.0
        for i in range(n):
            diff = np.float64(sims[r, i]) - best[i]
            if diff > 0.0:
                acc += diff
        out[r] = acc


@njit
def _fl_gains_rows(
    mat: NDArray[np.float32],
    rows: NDArray[np.int64],
    best: NDArray[np.float64],
    out: NDArray[np.float64],
) -> None:
    """`_fl_gains` for rows of a stored similarity matrix, without copying them out."""
    n = mat.shape[1]
    for r in range(rows.shape[0]):
        row = rows[r]
        acc = 0.0
        for i in range(n):
            diff = np.float64(mat[row, i]) - best[i]
            if diff > 0.0:
                acc += diff
        out[r] = acc


def _exact_gains(
    x: NDArray[np.float32],
    mat: NDArray[np.float32] | None,
    rows: list[int],
    best: NDArray[np.float64],
) -> NDArray[np.float64]:
    """Exact facility-location gains of `rows` against `best`: read from the stored matrix,
    or one sgemm block (`len(rows)` x N) when there is none."""
    out = np.empty(len(rows), dtype=np.float64)
    if mat is not None:
        _fl_gains_rows(mat, np.asarray(rows, dtype=np.int64), best, out)
    else:
        _fl_gains(np.ascontiguousarray(x[rows] @ x.T), best, out)
    return out


def _first_round_upper_bounds(x: NDArray[np.float32]) -> NDArray[np.float64]:
    """Rigorous upper bounds on every item's first-round gain, in O(N * d).

    With best = -1 everywhere the gain of j is sum_i max(0, cc(i, j) + 1), and for unit
    vectors cc >= -1, so it equals N + <x_j, sum_i x_i>: linear, no N x N work. The slack
    covers what makes the computed gain differ from that identity: rows whose float32 norm
    exceeds 1 (cc may dip below -1, so the clamp adds a little), the sgemm rounding of every
    cc (|err| <= gamma_d * |x_i||x_j|), and float64 summation over N terms. Upper bounds are
    all CELF needs: the first pick still compares exact gains, computed lazily for the few
    items whose bound reaches the best exact gain, instead of all N up front.
    """
    n, d = x.shape
    total = x.sum(axis=0, dtype=np.float64)
    lin = np.empty(n, dtype=np.float64)
    norm2_max = 0.0
    rows = max(1, _F64_BLOCK_ELEMS // max(d, 1))
    for lo in range(0, n, rows):  # float64 in blocks: no full float64 copy of X
        blk = x[lo : lo + rows].astype(np.float64)
        lin[lo : lo + rows] = n + blk @ total
        norm2_max = max(norm2_max, float(np.max(np.einsum("ij,ij->i", blk, blk))))
    u32 = 2.0**-24
    gamma_d = (d + 2) * u32 / (1.0 - (d + 2) * u32)
    slack = n * (max(0.0, norm2_max - 1.0) + 2.0 * gamma_d * norm2_max)
    slack += 4.0 * (n + d) * 2.0**-53 * n * (2.0 + norm2_max) + 1e-9 * n
    bound: NDArray[np.float64] = lin + slack + 1e-12 * np.abs(lin)
    return bound


def _mfl_exact(x: NDArray[np.float32], m: int, max_matrix_bytes: int) -> list[int]:
    """CELF lazy greedy on F(S) = sum_i max(-1, max_{s in S} cc(i, s)), picks in pick order.

    Heap entries are (-key, position); `fresh[j] == t` means j's key is its exact gain given the
    first t picks. Gains only shrink as `best` grows (submodularity), so a stale key is an
    upper bound and a fresh entry on top is the true arg-max, ties to the lower position (the
    same as `argmax`). Stale entries are re-evaluated in batches that double while the top
    stays stale (1, 2, 4, ... rows, capped so a block holds <= 2^24 floats, at most twice the
    evaluations strictly needed): the early rounds re-evaluate nearly every item (every pick
    lowers nearly every gain; round 2 starts from keys that are all close to N), and a batched
    sgemm does that far faster than N separate row products, while a round that needs one or
    two evaluations stays at one or two rows. Evaluating extra items never changes the
    result, only the work.

    Measured: about 11 evaluations per item for 100 picks (N = 3,000 and 16,384). When the
    N x N float32 matrix fits `max_matrix_bytes` it is built once (one sgemm) and evaluations
    read its rows, O(N) each instead of O(N * d); with fixed similarity bits every gain is
    then exactly non-increasing (rounded addition is monotone), so the picks are exactly the
    plain greedy's on that matrix. Otherwise rows are recomputed (a batch may round them
    differently from another batch: L1).
    """
    n = int(x.shape[0])
    mat = x @ x.T if 4 * n * n <= max_matrix_bytes else None
    best = np.full(n, -1.0, dtype=np.float64)
    ub = _first_round_upper_bounds(x)
    heap: list[tuple[float, int]] = [(-float(ub[j]), j) for j in range(n)]
    heapq.heapify(heap)
    fresh = np.full(n, -1, dtype=np.int64)  # -1: key is the analytic bound, never fresh
    cap = max(1, min(_MAX_BATCH_ROWS, _BLOCK_ELEMS // max(n, 1)))
    picks: list[int] = []
    for t in range(m):
        batch_size = 1
        while True:
            top = heap[0][1]
            if fresh[top] == t:
                heapq.heappop(heap)
                break
            batch: list[int] = []
            while heap and len(batch) < batch_size and fresh[heap[0][1]] != t:
                batch.append(heapq.heappop(heap)[1])
            gains = _exact_gains(x, mat, batch, best)
            for j, g in zip(batch, gains.tolist(), strict=True):
                fresh[j] = t
                heapq.heappush(heap, (-g, j))
            batch_size = min(2 * batch_size, cap)
        picks.append(top)
        row = mat[top] if mat is not None else x @ x[top]
        np.maximum(best, row.astype(np.float64), out=best)
    return picks


# --------------------------------------------------------------------------------------------
# 2.3 maximum facility location: sparse kNN objective with CELF


@njit
def _voter_sims(
    nbr: NDArray[np.int32], sim: NDArray[np.float32], indptr: NDArray[np.int64]
) -> NDArray[np.float32]:
    """sim[v, p] rearranged to line up with `voters_indices` (the edge v -> nbr[v, p]).

    The CSR lists voters in ascending v, which is the order a scan v = 0..N-1 meets them, so a
    per-target cursor places every edge in O(N * k).
    """
    n, k = nbr.shape
    out = np.empty(indptr[n], dtype=np.float32)
    cursor = indptr[:n].copy()
    for v in range(n):
        for p in range(k):
            u = nbr[v, p]
            if u < 0:
                continue
            out[cursor[u]] = sim[v, p]
            cursor[u] += 1
    return out


@njit
def _sparse_gain(
    j: int,
    indptr: NDArray[np.int64],
    voters: NDArray[np.int32],
    vsim: NDArray[np.float32],
    best: NDArray[np.float64],
) -> float:
    """sum over i in voters(j) + {j}, ascending i, of max(0, w(i, j) - best_i).

    w(i, j) = cc(i, j) + 1 on a graph edge and w(j, j) = 2. The self term is added at its place
    in ascending order so the float64 sum is bit-identical to a brute force that scans i =
    0..N-1; with a fixed order every term is non-increasing in `best`, and rounded addition is
    monotone, so stale CELF keys are exact upper bounds and CELF equals the plain greedy (L0).
    """
    acc = 0.0
    self_done = False
    for e in range(indptr[j], indptr[j + 1]):
        i = voters[e]
        if not self_done and i > j:
            diff = 2.0 - best[j]
            if diff > 0.0:
                acc += diff
            self_done = True
        diff = (np.float64(vsim[e]) + 1.0) - best[i]
        if diff > 0.0:
            acc += diff
    if not self_done:
        diff = 2.0 - best[j]
        if diff > 0.0:
            acc += diff
    return acc


@njit
def _sparse_celf(
    nbr: NDArray[np.int32],
    indptr: NDArray[np.int64],
    voters: NDArray[np.int32],
    vsim: NDArray[np.float32],
    m: int,
) -> NDArray[np.int64]:
    """CELF on the sparse facility-location objective; returns picks in pick order.

    A binary max-heap on (gain, -position) in two parallel arrays; `fresh[j] == t` marks a key
    that is exact after t picks. A popped stale top is re-evaluated in place and sifted down
    (its key can only fall). After a pick s only best_s and best_v for v in voters(s) change.
    """
    n = nbr.shape[0]
    best = np.zeros(n, dtype=np.float64)
    hg = np.empty(n, dtype=np.float64)
    hi = np.empty(n, dtype=np.int64)
    fresh = np.zeros(n, dtype=np.int64)
    for j in range(n):
        hg[j] = _sparse_gain(j, indptr, voters, vsim, best)
        hi[j] = j
    size = n
    for pos in range(n // 2 - 1, -1, -1):
        sift_down(hg, hi, size, pos)
    picks = np.empty(m, dtype=np.int64)
    for t in range(m):
        while True:
            top = hi[0]
            if fresh[top] == t:
                break
            hg[0] = _sparse_gain(top, indptr, voters, vsim, best)
            fresh[top] = t
            sift_down(hg, hi, size, 0)
        picks[t] = top
        size -= 1
        hg[0] = hg[size]
        hi[0] = hi[size]
        if size > 0:
            sift_down(hg, hi, size, 0)
        best[top] = 2.0
        for e in range(indptr[top], indptr[top + 1]):
            v = voters[e]
            w = np.float64(vsim[e]) + 1.0
            if w > best[v]:
                best[v] = w
    return picks


def _graph_voter_sims(graph: KnnGraph) -> NDArray[np.float32]:
    """The edge similarities aligned with `graph.voters_indices` (sim of v -> u for voter v)."""
    return _voter_sims(
        np.ascontiguousarray(graph.nbr, dtype=np.int32),
        np.ascontiguousarray(graph.sim, dtype=np.float32),
        np.ascontiguousarray(graph.voters_indptr, dtype=np.int64),
    )


def _mfl_sparse(graph: KnnGraph, m: int) -> list[int]:
    indptr = np.ascontiguousarray(graph.voters_indptr, dtype=np.int64)
    voters = np.ascontiguousarray(graph.voters_indices, dtype=np.int32)
    vsim = _graph_voter_sims(graph)
    picks = _sparse_celf(np.ascontiguousarray(graph.nbr, dtype=np.int32), indptr, voters, vsim, m)
    return [int(p) for p in picks]


def mfl_subset(
    X_centered: NDArray[np.float32],
    budget: int,
    *,
    mode: Literal["exact", "sparse"] = "exact",
    graph: KnnGraph | None = None,
    pick_order: bool = False,
    max_matrix_bytes: int = MFL_MATRIX_MAX_BYTES,
) -> list[int]:
    """Maximum facility location bank (ALGORITHMS.md 2.3), `min(budget, N)` distinct positions.

    * `mode="exact"`: greedy on F(S) = sum_i max(-1, max_{s in S} cc(i, s)) by CELF lazy greedy
      (ties to the lower position, like the reference's `argmax`). Similarities are float32
      sgemm products like the reference's float32 matrix; gains are accumulated in float64.
      L1 against the dense greedy (float32 near-tie threshold). The first round uses analytic
      upper bounds instead of N exact gains (`_first_round_upper_bounds`), but the early picks
      lower nearly every gain, so CELF still evaluates each item about 11 times for 100 picks
      (measured at N = 3,000 and 16,384). If the N x N float32 matrix fits `max_matrix_bytes`
      (default 1 GiB, N <= 16,384) it is built once, O(N^2 * d), and each evaluation is an
      O(N) row scan: 0.5 s at N = 3,000, 18 s at 16,384 (d = 384, M = 100, shared 2-core
      box). Otherwise (or `max_matrix_bytes=0`) memory stays O(N * d) plus a 64 MiB block, but
      every evaluation recomputes its row, O(N * d): about 11 * N^2 * d in all, 8 min at
      N = 30,000 — use the sparse mode there.
    * `mode="sparse"`: the same greedy on the kNN-restricted objective: w(i, j) = cc(i, j) + 1
      on the edges of `graph` (i votes for j, j in nbr[i]) and w(j, j) = 2, floor 0;
      gain(j) = sum_{i : j in nbr[i] or i = j} max(0, w(i, j) - best_i), read through the
      reverse adjacency in O(in-degree(j)). CELF in numba; L0 against a brute-force greedy on
      this objective over the same graph (similarities are `graph.sim`). Requires `graph`
      (built once per pool and persisted, ALGORITHMS.md 9); `X_centered` only fixes N.
      Time O(N * k) to set up plus O(in-degree) per lazy evaluation.

    The output is sorted by pool position, the order the reference returns (`torch.nonzero`
    over a selected mask); `pick_order=True` returns the greedy's pick order instead.
    Unlike the reference, an item is never picked twice (the reference can re-pick a
    zero-gain selected item when every remaining gain is 0, e.g. on duplicate rows).
    """
    _check_matrix(X_centered)
    _check_budget(budget)
    n = int(X_centered.shape[0])
    m = min(budget, n)
    if mode == "sparse":
        if graph is None:
            raise ValueError("mode='sparse' needs the pool's kNN graph (selection.graph)")
        if graph.n != n:
            raise ValueError(f"graph has {graph.n} nodes but X_centered has {n} rows")
        picks = _mfl_sparse(graph, m) if m else []
    elif mode == "exact":
        x = np.ascontiguousarray(X_centered, dtype=np.float32)
        picks = _mfl_exact(x, m, max_matrix_bytes) if m else []
    else:
        raise ValueError(f"unknown MFL mode {mode!r}")
    return picks if pick_order else sorted(picks)


def mfl_objective(X_centered: NDArray[np.float32], picks: list[int]) -> float:
    """The dense objective F(S) = sum_i max(-1, max_{s in S} cc(i, s)) in float64 (2.3).

    For the L4 report `F(S_sparse) / F(S_exact)` of ALGORITHMS.md 2.3 (and benchmarks).
    F of the empty set is -N. Cost O(|S| * N * d), memory O(N).
    """
    _check_matrix(X_centered)
    x = np.ascontiguousarray(X_centered, dtype=np.float32)
    best = np.full(int(x.shape[0]), -1.0, dtype=np.float64)
    for s in picks:
        np.maximum(best, _column_f64(x, None, int(s)), out=best)
    return float(best.sum())


# --------------------------------------------------------------------------------------------
# API parameter models


class RandomParams(BaseModel):
    """Parameters of the random bank (ALGORITHMS.md 2.1): none beyond the request's budget and
    seed, which every bank request carries."""

    model_config = ConfigDict(extra="forbid")


class DiversityParams(BaseModel):
    """Parameters of the diversity bank (ALGORITHMS.md 2.2): none beyond the request's budget
    and seed (the seed drives the first, uniformly random, pick)."""

    model_config = ConfigDict(extra="forbid")


class MflParams(BaseModel):
    """Parameters of the maximum-facility-location bank (ALGORITHMS.md 2.3)."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["auto", "exact", "sparse"] = Field(
        "auto",
        description=(
            "exact: dense-objective greedy via CELF (same picks as the reference up to float "
            "near-ties; holds the N x N float32 matrix up to 16,384 items, seconds to tens of "
            "seconds; minutes beyond). sparse: the objective restricted to the kNN graph "
            "(well under a second after the graph at 1e5 items; an approximation of the dense "
            f"objective). auto: exact when the pool has at most {MFL_AUTO_EXACT_MAX_N} items, "
            "sparse above."
        ),
    )
    k: int = Field(
        50,
        ge=1,
        le=1000,
        description="Neighbours per item of the kNN graph used by the sparse mode.",
    )
    graph_exact_max_n: int = Field(
        GRAPH_EXACT_MAX_N,
        ge=0,
        description="Largest pool given an exact kNN graph; bigger pools use IVF with "
        "measured recall.",
    )

    def resolve_mode(self, n: int) -> Literal["exact", "sparse"]:
        """The concrete mode for a pool of `n` items (`auto`: exact iff n <= 16,384)."""
        if self.mode == "auto":
            return "exact" if n <= MFL_AUTO_EXACT_MAX_N else "sparse"
        return self.mode
