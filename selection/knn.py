"""kNN / KATE / OpenICL TopK demonstration selection (ALGORITHMS.md 3.1)."""

from __future__ import annotations

from typing import Literal

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field

from selection.base import (
    CandidateRequest,
    Candidates,
    SelectionContext,
    Selector,
    rank_best_first,
)


class KnnSelector:
    """The k candidates most similar to the query (ALGORITHMS.md 3.1; Liu et al. 2022, KATE).

    Guarantees: returns min(k, n) distinct candidates (none for k <= 0), best first: descending
    `candidates.scores`, ties by ascending id (`rank_best_first`). Independent of the input
    order and of `ctx.rng` (fully deterministic). O(n log n) for n candidates.
    """

    def select(
        self,
        query: NDArray[np.float32],
        candidates: Candidates,
        k: int,
        ctx: SelectionContext,
    ) -> Candidates:
        """Pick the k best candidates; the result is in pick (best-first) order."""
        take = max(0, min(k, len(candidates)))
        order = rank_best_first(candidates.scores, candidates.ids)[:take]
        return candidates.take(order)


class KnnSpec(BaseModel):
    """Spec of plain kNN selection: `{"method": "knn"}`.

    Asks retrieval for the top-k neighbours only (`CandidateRequest(top_n=k)`).
    """

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    method: Literal["knn"] = Field(
        "knn", description="k nearest neighbours of the query by cosine similarity."
    )

    def build(self, label_names: tuple[str, ...] = ()) -> Selector:
        """A `KnnSelector`; `label_names` is unused (uniform signature across specs)."""
        return KnnSelector()

    def candidate_request(self, k: int) -> CandidateRequest:
        """The retrieval this strategy needs for k demonstrations: the top k."""
        return CandidateRequest(top_n=max(0, k))
