"""Maximal marginal relevance selection (ALGORITHMS.md 3.3; Carbonell & Goldstein 1998)."""

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

DEFAULT_LAMBDA = 0.5
"""LangChain's `max_marginal_relevance_search` default trade-off (ALGORITHMS.md 3.3)."""


def effective_fetch_k(fetch_k: int | None, k: int) -> int:
    """Candidates MMR works on for k picks: `fetch_k`, or max(20, 5k) when None; never below k.

    ALGORITHMS.md 3.3 recommends fetch_k = max(20, 5·K) for demonstrations.
    """
    base = fetch_k if fetch_k is not None else max(20, 5 * k)
    return max(base, k, 0)


class MmrSelector:
    """Maximal marginal relevance over the top `fetch_k` candidates (ALGORITHMS.md 3.3).

    The candidates are ranked best first (`rank_best_first`: descending score, ties ascending
    id) and cut to `effective_fetch_k(fetch_k, k)`. First pick = the top-ranked candidate; then,
    until min(k, fetch set) picks, the candidate maximising
    `lambda_ * sim(q, d) - (1 - lambda_) * max_{s picked} sim(d, s)`, ties to the earlier
    candidate in the ranking (LangChain keeps the first strictly better score).
    `sim(q, d)` is `candidates.scores`; `sim(d, s)` the inner product of `candidates.vectors`
    (unit vectors, so cosine). Scores are evaluated in float64.

    Guarantees: distinct candidates in pick order; deterministic, `ctx.rng` unused; result
    independent of the input order. Cost O(m log m + k·m·d) for m candidates, memory O(m·d).
    MMR over the top fetch_k is not MMR over the whole pool; they agree when fetch_k >= n.
    """

    def __init__(self, lambda_: float = DEFAULT_LAMBDA, fetch_k: int | None = None) -> None:
        if not 0.0 <= lambda_ <= 1.0:
            raise ValueError("lambda_ must lie in [0, 1]")
        if fetch_k is not None and fetch_k < 1:
            raise ValueError("fetch_k must be >= 1")
        self.lambda_ = float(lambda_)
        self.fetch_k = fetch_k

    def select(
        self,
        query: NDArray[np.float32],
        candidates: Candidates,
        k: int,
        ctx: SelectionContext,
    ) -> Candidates:
        """Pick up to k candidates by MMR; the result is in pick order."""
        rank = rank_best_first(candidates.scores, candidates.ids)
        pool = rank[: effective_fetch_k(self.fetch_k, k)]
        want = max(0, min(k, pool.shape[0]))
        ctx.trace["mmr"] = {"fetch_k": int(pool.shape[0]), "lambda": self.lambda_}
        if want == 0:
            return candidates.take(pool[:0])
        relevance = candidates.scores[pool].astype(np.float64)
        vectors = candidates.vectors[pool].astype(np.float64)
        lam = self.lambda_
        picked = [0]
        redundancy = vectors @ vectors[0]
        available = np.ones(pool.shape[0], dtype=bool)
        available[0] = False
        while len(picked) < want:
            gain = lam * relevance - (1.0 - lam) * redundancy
            gain[~available] = -np.inf
            best = int(np.argmax(gain))  # first maximum = earlier in similarity rank
            picked.append(best)
            available[best] = False
            np.maximum(redundancy, vectors @ vectors[best], out=redundancy)
        return candidates.take(pool[np.asarray(picked, dtype=np.intp)])


class MmrSpec(BaseModel):
    """Spec of MMR selection: `{"method": "mmr", "lambda": 0.5, "fetch_k": 32}`.

    Asks retrieval for the top `effective_fetch_k(fetch_k, k)` neighbours with their vectors.
    """

    model_config = ConfigDict(extra="forbid", populate_by_name=True, serialize_by_alias=True)

    method: Literal["mmr"] = Field(
        "mmr", description="Maximal marginal relevance: relevant but non-redundant demos."
    )
    lambda_: float = Field(
        DEFAULT_LAMBDA,
        alias="lambda",
        ge=0,
        le=1,
        description="Trade-off in [0, 1]: 1 = pure relevance (kNN), 0 = pure diversity.",
    )
    fetch_k: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="Candidates considered (top fetch_k by similarity); default max(20, 5k), "
        "never fewer than k.",
    )

    def build(self, label_names: tuple[str, ...] = ()) -> Selector:
        """An `MmrSelector`; `label_names` is unused (uniform signature across specs)."""
        return MmrSelector(lambda_=self.lambda_, fetch_k=self.fetch_k)

    def candidate_request(self, k: int) -> CandidateRequest:
        """The retrieval this strategy needs for k demonstrations: the top effective fetch_k."""
        return CandidateRequest(top_n=effective_fetch_k(self.fetch_k, k))
