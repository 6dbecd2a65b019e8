"""Prompt-order policies for chosen demonstrations (ALGORITHMS.md 0.5, 3.1, 3.4 step 4, 4.1).

Every orderer returns a permutation of the chosen candidates, first item = top of the prompt,
last item = the one adjacent to the query.
"""

from __future__ import annotations

from collections import deque
from typing import Literal, get_args

import numpy as np
from numpy.typing import NDArray

from selection.base import Candidates, Orderer, SelectionContext, rank_best_first

OrderName = Literal["nearest_last", "nearest_first", "random", "as_selected", "interleave"]
"""Names accepted by `build_orderer`."""

ORDER_NAMES: tuple[str, ...] = get_args(OrderName)
"""Every valid order name, in declaration order."""


class NearestLastOrderer:
    """Ascending similarity: the most similar demo sits right before the query (0.5).

    Exactly the reverse of `rank_best_first` (so equal scores come by descending id).
    Deterministic; O(n log n). VK/ID prompt construction, KATE "reverse" order.
    """

    def order(
        self, query: NDArray[np.float32], chosen: Candidates, ctx: SelectionContext
    ) -> Candidates:
        """Return `chosen` sorted least similar first."""
        return chosen.take(rank_best_first(chosen.scores, chosen.ids)[::-1])


class NearestFirstOrderer:
    """Descending similarity, ties by ascending id (`rank_best_first`); KATE / OpenICL TopK.

    Deterministic; O(n log n).
    """

    def order(
        self, query: NDArray[np.float32], chosen: Candidates, ctx: SelectionContext
    ) -> Candidates:
        """Return `chosen` sorted most similar first."""
        return chosen.take(rank_best_first(chosen.scores, chosen.ids))


class RandomOrderer:
    """A uniformly random permutation, `ctx.rng.permutation(n)`; deterministic per seed. O(n)."""

    def order(
        self, query: NDArray[np.float32], chosen: Candidates, ctx: SelectionContext
    ) -> Candidates:
        """Return `chosen` shuffled by the request's generator."""
        return chosen.take(np.asarray(ctx.rng.permutation(len(chosen)), dtype=np.intp))


class AsSelectedOrderer:
    """Identity: keep the selector's pick order (e.g. MMR pick order, random draw order)."""

    def order(
        self, query: NDArray[np.float32], chosen: Candidates, ctx: SelectionContext
    ) -> Candidates:
        """Return `chosen` unchanged."""
        return chosen


class InterleaveOrderer:
    """Label-interleaved order of ALGORITHMS.md 3.4 step 4.

    Positions are filled from the one adjacent to the query backwards. Each label keeps its
    items best first (descending score, ties ascending id). At each position choose, among
    labels with items left and different from the label just placed (when such a label
    remains), the label whose next item has the highest score, ties to the lower label code,
    and place that item. `NO_LABEL` (-1) counts as a label of its own (and is thus the lowest
    code on ties). The most similar item ends adjacent to the query; same-label neighbours
    occur only when unavoidable for this greedy. Deterministic; O(n log n + n·C) for C labels.
    """

    def order(
        self, query: NDArray[np.float32], chosen: Candidates, ctx: SelectionContext
    ) -> Candidates:
        """Return `chosen` interleaved by label, most similar item last."""
        scores = chosen.scores.astype(np.float64).tolist()
        labels = chosen.labels.tolist()
        queues: dict[int, deque[int]] = {}
        for pos in rank_best_first(chosen.scores, chosen.ids).tolist():
            queues.setdefault(labels[pos], deque()).append(pos)
        placed: list[int] = []  # from the query-adjacent position backwards
        previous: int | None = None
        for _ in range(len(labels)):
            live = [c for c, q in queues.items() if q]
            options = [c for c in live if c != previous] or live
            label = min(options, key=lambda c: (-scores[queues[c][0]], c))
            placed.append(queues[label].popleft())
            previous = label
        placed.reverse()
        return chosen.take(np.asarray(placed, dtype=np.intp))


_ORDERERS: dict[str, Orderer] = {
    "nearest_last": NearestLastOrderer(),
    "nearest_first": NearestFirstOrderer(),
    "random": RandomOrderer(),
    "as_selected": AsSelectedOrderer(),
    "interleave": InterleaveOrderer(),
}


def build_orderer(name: str) -> Orderer:
    """The orderer called `name` (one of `ORDER_NAMES`); raises ValueError naming valid ones.

    Orderers are stateless, so the same instance is returned on every call.
    """
    try:
        return _ORDERERS[name]
    except KeyError:
        valid = ", ".join(ORDER_NAMES)
        raise ValueError(f"unknown order {name!r}; valid orders: {valid}") from None
