"""Dense, reference-style ports of fast vote-k, MFL and IDEAL (ALGORITHMS.md 2.3, 2.4, 2.7).

These work the way the reference code does: a full similarity row (or the whole N x N matrix)
and a full argsort per item, then the reference's greedy loops in plain Python with list
membership tests and float arithmetic. They are written from the spec's description of the
references, not copied from them, and exist for two reasons: the side-by-side benchmark
(showing where the dense approach stops running: see `dense_memory_bytes`) and as extra
oracles for the scalable selectors on small pools. They are deliberately slow; never call
them from the service.

All take raw embeddings `E` (N x d, pool order) and center them with the pool mean, then
normalise rows (ALGORITHMS.md 0.2); output positions are 0..N-1.
"""

from __future__ import annotations

import random
from collections import defaultdict

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "dense_ideal_reference",
    "dense_memory_bytes",
    "dense_mfl_reference",
    "dense_votek_reference",
]

_RHO = 10  # vote-k's discount base, hard-coded in the reference (ALGORITHMS.md 2.4)


def dense_memory_bytes(n: int) -> int:
    """Bytes of the dense N x N float32 similarity matrix that the reference MFL holds.

    The reference holds at least this much (and a same-sized temporary per greedy round);
    3,000 items: 36 MB, 30,000: 3.6 GB, 100,000: 40 GB.
    """
    return 4 * n * n


def _centered_unit(e: NDArray[np.floating]) -> NDArray[np.float32]:
    """Center with the pool mean and L2-normalise rows (zero rows stay zero, like sklearn)."""
    x = np.asarray(e, dtype=np.float32)
    x = x - x.mean(axis=0, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    out: NDArray[np.float32] = (x / norms).astype(np.float32)
    return out


def _row_neighbours(x: NDArray[np.float32], i: int, k: int) -> list[int]:
    """The reference window rule (ALGORITHMS.md 1.2): full cosine row, full ascending argsort,
    keep the k+1 largest minus the very largest, drop i if still present; least similar first.
    """
    row = x @ x[i]
    order = np.argsort(row).tolist()  # default (unstable) kind, as the reference
    window = order[-k - 1 : -1] if k + 1 <= len(order) else order[:-1]
    return [int(j) for j in window if j != i]


def dense_votek_reference(E: NDArray[np.floating], budget: int, k: int = 150) -> list[int]:
    """Fast vote-k the way the reference runs it (ALGORITHMS.md 2.4), in pick order.

    Graph: per item a full cosine row and argsort (O(N^2 * d + N^2 log N)); each item votes for
    its window neighbours, vote lists filled in the scan order "v = 0..N-1, neighbours from
    least to most similar"; candidates sorted by vote count, descending, stable (that is the
    tie order pi). Greedy, `budget` rounds: every round rescores every candidate from scratch,
    score(u) = sum over voters v of u not yet selected of 10 ** -c(v), with Python floats and
    `in` tests against the selected list (O(budget^2 * N * k) operations: tens of minutes at
    N = 3,000, k = 150, budget = 100); selected candidates score -100; the first maximum in pi
    order wins; then c(v) += 1 for every voter v of the pick.

    Reference quirk kept: a candidate whose voters are all selected is absent from the round's
    score table, so when every unselected candidate is absent the -100 of a selected one is
    the maximum and it is picked again (only for budgets close to the number of candidates).
    """
    x = _centered_unit(E)
    n = int(x.shape[0])
    votes: dict[int, list[int]] = defaultdict(list)
    for v in range(n):
        for u in _row_neighbours(x, v, k):
            votes[u].append(v)
    ranked = sorted(votes.items(), key=lambda item: len(item[1]), reverse=True)
    selected: list[int] = []
    times: dict[int, int] = defaultdict(int)
    while len(selected) < budget and ranked:
        scores: dict[int, float] = {}
        for u, voters in ranked:
            if u in selected:
                scores[u] = -100.0
                continue
            for v in voters:
                if v not in selected:
                    scores[u] = scores.get(u, 0.0) + _RHO ** (-times[v])
        pick = max(scores.items(), key=lambda item: item[1])[0]
        selected.append(int(pick))
        for v in votes[pick]:
            times[v] += 1
    return selected


def dense_mfl_reference(E: NDArray[np.floating], budget: int) -> list[int]:
    """Maximum facility location the way the reference runs it (ALGORITHMS.md 2.3).

    One float32 matmul builds the dense N x N centered-cosine matrix (the reference's
    `torch.einsum`; `dense_memory_bytes(N)` bytes); best_i = -1; `budget` rounds of
    gain(j) = sum_i max(0, cc(j, i) - best_i) over the whole matrix, float32 throughout,
    selected items' gains set to 0, arg-max (first index), best updated with the pick's row.
    Returns the selected set sorted by position (the reference's `torch.nonzero` of a mask),
    so a re-pick (possible only when every unselected gain is 0) yields fewer items.
    Time O(budget * N^2). The per-round temporary is computed in row blocks (the reference
    materialises a second N x N array; only the matrix itself is kept here).
    """
    x = _centered_unit(E)
    n = int(x.shape[0])
    sims = np.einsum("id,jd->ij", x, x)
    best = np.full(n, -1.0, dtype=np.float32)
    chosen = np.zeros(n, dtype=bool)
    block = 1024
    for _ in range(min(budget, n) if n else 0):
        gains = np.empty(n, dtype=np.float32)
        for lo in range(0, n, block):
            part = sims[lo : lo + block] - best[None, :]
            gains[lo : lo + block] = np.maximum(part, 0.0).sum(axis=1, dtype=np.float32)
        gains[chosen] = 0.0
        j = int(np.argmax(gains))
        chosen[j] = True
        best = np.maximum(best, sims[j])
    return [int(i) for i in np.flatnonzero(chosen)]


def _ideal_graph(
    x: NDArray[np.float32], k: int
) -> tuple[list[int], dict[int, list[tuple[int, float]]]]:
    """IDEAL's directed graph: i -> j for j in the window neighbours of i (least similar
    first, the insertion order), weight cc(i, j) / sum over i's neighbours; plus the node
    insertion order (each node enters when first seen as an edge end)."""
    n = int(x.shape[0])
    succ: dict[int, list[tuple[int, float]]] = {}
    order: list[int] = []
    seen: set[int] = set()
    for i in range(n):
        row = x @ x[i]
        nbrs = _row_neighbours(x, i, k)
        total = float(sum(float(row[j]) for j in nbrs))
        edges: list[tuple[int, float]] = []
        for j in nbrs:
            edges.append((j, float(row[j]) / total if total != 0.0 else 0.0))
            for node in (i, j):
                if node not in seen:
                    seen.add(node)
                    order.append(node)
        succ[i] = edges
    for i in range(n):  # isolated nodes (no edges at all) still exist in the graph
        if i not in seen:
            seen.add(i)
            order.append(i)
    return order, succ


def _ic_reference_round(
    seeds: list[int], succ: dict[int, list[tuple[int, float]]], rng: random.Random
) -> int:
    """One cascade of the reference's diffusion (ALGORITHMS.md 2.7, with its duplicate quirk):
    a successor is tried only if not yet in `active`, so two frontier nodes can both activate
    the same node in one step; it is then appended, counted and expanded twice."""
    active = list(seeds)
    frontier = list(seeds)
    while frontier:
        new: list[int] = []
        for v in frontier:
            for w, p in succ.get(v, []):
                if w not in active and rng.random() < p:
                    new.append(w)
        active.extend(new)
        frontier = new
    return len(active)


def dense_ideal_reference(
    E: NDArray[np.floating], budget: int, k: int = 10, rounds: int = 10, seed: int = 0
) -> list[int]:
    """IDEAL's greedy influence maximisation the way the reference runs it (ALGORITHMS.md 2.7).

    Graph by a full cosine row and argsort per item (O(N^2 * d + N^2 log N)). First seed: the
    first node in graph insertion order with maximal out-degree, which is pool position 0
    whenever every node has k out-edges (it is not chosen by influence). Then `budget - 1`
    times: for every node not yet selected, in insertion order, a fresh `rounds`-round
    simulation of S + {v} (list-based cascades, one `random()` draw per attempt, from a
    private `random.Random(seed)` instead of the global generator); the first strictly largest
    mean wins. Slow by design: (budget - 1) * N * rounds cascades, each quadratic in its active
    list; minutes already at a few thousand items. Returns seeds in pick order.
    """
    x = _centered_unit(E)
    n = int(x.shape[0])
    if budget <= 0 or n == 0:
        return []
    order, succ = _ideal_graph(x, k)
    rng = random.Random(seed)
    top_degree = max(len(succ.get(v, [])) for v in order)
    selected = [next(v for v in order if len(succ.get(v, [])) == top_degree)]
    while len(selected) < min(budget, n):
        best_node = -1
        best_spread = -1.0
        for v in order:
            if v in selected:
                continue
            trial = [*selected, v]
            spread = sum(_ic_reference_round(trial, succ, rng) for _ in range(rounds)) / rounds
            if spread > best_spread:
                best_node, best_spread = v, spread
        selected.append(best_node)
    return selected
