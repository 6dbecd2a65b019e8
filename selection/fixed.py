"""Query-independent demonstrations: the first k of a named, ordered set (a subset)."""

from __future__ import annotations

from typing import Literal

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field

from selection.base import CandidateRequest, Candidates, SelectionContext, Selector

SET_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class FixedSelector:
    """The first k candidates in the order delivered; the query is ignored.

    With `CandidateRequest(fixed=True)` the app delivers the labeled members of a named set in
    the set's own order, so the result is that set's first k labeled members: the same
    demonstrations for every query, which keeps the prompt prefix stable (and cacheable
    upstream). Deterministic; O(k).
    """

    def select(
        self,
        query: NDArray[np.float32],
        candidates: Candidates,
        k: int,
        ctx: SelectionContext,
    ) -> Candidates:
        """The first min(k, n) candidates, in delivered order."""
        return candidates.take(np.arange(max(0, min(k, len(candidates))), dtype=np.intp))


class SubsetSpec(BaseModel):
    """Spec of `{"method": "subset", "name": ...}`: the first k of a computed subset.

    Subsets are computed by pool-level selection jobs (vote-k, IDEAL, MFL, ...); unlabeled
    members are skipped, since unlabeled examples are never demonstrations.
    """

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    method: Literal["subset"] = Field(
        "subset", description="The first k labeled members of a named subset, for every query."
    )
    name: str = Field(pattern=SET_NAME_PATTERN, description="Name of the pool's subset.")

    def build(self, label_names: tuple[str, ...] = ()) -> Selector:
        """A `FixedSelector`; `label_names` is unused (uniform signature across specs)."""
        return FixedSelector()

    def candidate_request(self, k: int) -> CandidateRequest:
        """The subset's labeled members in subset order, no nearest-neighbour search."""
        return CandidateRequest(top_n=0, fixed=True)
