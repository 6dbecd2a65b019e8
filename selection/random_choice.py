"""Uniform random demonstration selection (ALGORITHMS.md 2.1 per query; OpenICL random)."""

from __future__ import annotations

from typing import Literal

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field

from selection.base import CandidateRequest, Candidates, SelectionContext, Selector


class RandomSelector:
    """k distinct candidates drawn uniformly without replacement, query ignored.

    Draws `ctx.rng.choice(n, size=min(k, n), replace=False)` over the candidates in the order
    delivered (pool order for `CandidateRequest(everything=True)`) and returns them in draw
    order. Deterministic given the seed of `ctx.rng` and the delivered order (level L2 of
    ALGORITHMS.md 0.4); consumes no randomness when k <= 0 or there are no candidates.
    Cost: one numpy draw, O(n) time worst case.
    """

    def select(
        self,
        query: NDArray[np.float32],
        candidates: Candidates,
        k: int,
        ctx: SelectionContext,
    ) -> Candidates:
        """Draw min(k, n) candidates; the result is in draw order."""
        n = len(candidates)
        size = max(0, min(k, n))
        if size == 0:
            return candidates.take(np.empty(0, dtype=np.intp))
        draw = ctx.rng.choice(n, size=size, replace=False)
        return candidates.take(np.asarray(draw, dtype=np.intp))


class RandomSpec(BaseModel):
    """Spec of random selection: `{"method": "random"}`.

    Asks retrieval for every labeled example of the pool (`everything=True`, no neighbours).
    """

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    method: Literal["random"] = Field(
        "random", description="Uniformly random demonstrations (seeded by the request)."
    )

    def build(self, label_names: tuple[str, ...] = ()) -> Selector:
        """A `RandomSelector`; `label_names` is unused (uniform signature across specs)."""
        return RandomSelector()

    def candidate_request(self, k: int) -> CandidateRequest:
        """The retrieval this strategy needs: all labeled examples, no nearest neighbours."""
        return CandidateRequest(top_n=0, everything=True)
