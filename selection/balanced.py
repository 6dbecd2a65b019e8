"""Label-balanced kNN selection (ALGORITHMS.md 3.4, steps 1-3).

Counters majority-label bias (Zhao et al. 2021 found GPT-3 over-predicts labels frequent in
the prompt) while keeping relevance. Step 4 (ordering, including `interleave`) lives in
`selection.ordering`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field

from selection.base import (
    NO_LABEL,
    CandidateRequest,
    Candidates,
    SelectionContext,
    Selector,
    rank_best_first,
)


class BalancedSelector:
    """Label-balanced kNN (ALGORITHMS.md 3.4 steps 1-3), label codes as in `Candidates.labels`.

    Let R be the candidates ranked best first (descending score, ties ascending id). C' is
    `labels` (or, when None, every label present among the candidates), restricted to labels
    that have at least one candidate: a requested code with no candidate, e.g. an unknown
    label name, is simply absent. `NO_LABEL` is never a member of C'.

    1. If k < |C'|, keep the k labels whose best item (first in R) has the highest score,
       ties to the lower label code.
    2. Each kept label gets floor(k / |kept|); the k mod |kept| extra slots go to the kept
       labels with the highest best-item score (ties: lower code).
    3. Each kept label contributes its top-quota items in R order. Slots a label cannot fill
       (fewer items than its quota) go to the most similar not-yet-picked items of any label
       (including labels outside C'), in R order; `NO_LABEL` items are used only once no
       labeled item is left. With C' empty this is plain kNN over labeled items first.

    Pick order of the result: kept labels in step-1 rank order, each label's items best first,
    then the fill items best first; the orderer sets prompt order. Guarantees: min(k, n)
    distinct candidates; deterministic, `ctx.rng` unused; independent of the input order.
    Cost O(n log n + n) for n candidates.
    """

    def __init__(self, labels: Sequence[int] | None = None) -> None:
        self.labels: tuple[int, ...] | None = None
        if labels is not None:
            self.labels = tuple(sorted({int(c) for c in labels if int(c) != NO_LABEL}))

    def select(
        self,
        query: NDArray[np.float32],
        candidates: Candidates,
        k: int,
        ctx: SelectionContext,
    ) -> Candidates:
        """Pick up to k candidates balanced over labels; the result is in pick order."""
        rank = rank_best_first(candidates.scores, candidates.ids).tolist()
        labels = candidates.labels.tolist()
        want = max(0, min(k, len(rank)))

        by_label: dict[int, list[int]] = {}  # label -> positions, best first
        for pos in rank:
            by_label.setdefault(labels[pos], []).append(pos)
        wanted = set(by_label) if self.labels is None else set(self.labels)
        considered = [c for c in by_label if c != NO_LABEL and c in wanted]
        # dict insertion follows R, so `considered` is already sorted by best-item score with
        # ties by ascending id; re-sort by (score desc, code asc) for the label tie rule.
        considered.sort(key=lambda c: (-float(candidates.scores[by_label[c][0]]), c))

        kept = considered[: max(0, k)]
        picks: list[int] = []
        quotas: dict[int, int] = {}
        if kept:
            base, extra = divmod(k, len(kept))
            for i, code in enumerate(kept):
                quotas[code] = base + (1 if i < extra else 0)
                picks.extend(by_label[code][: quotas[code]])

        shortfall = want - len(picks)
        if shortfall > 0:
            taken = set(picks)
            labeled = [p for p in rank if p not in taken and labels[p] != NO_LABEL]
            unlabeled = [p for p in rank if p not in taken and labels[p] == NO_LABEL]
            picks.extend((labeled + unlabeled)[:shortfall])

        ctx.trace["balanced"] = {
            "quota": {_label_name(ctx, c): q for c, q in quotas.items()},
            "filled": max(0, shortfall),
        }
        return candidates.take(np.asarray(picks, dtype=np.intp))


def _label_name(ctx: SelectionContext, code: int) -> str:
    if 0 <= code < len(ctx.label_names):
        return ctx.label_names[code]
    return str(code)


class BalancedSpec(BaseModel):
    """Spec of label-balanced kNN: `{"method": "balanced", "labels": ["neg", "pos"]}`.

    Asks retrieval for the top 2k neighbours plus the top k of every label
    (`CandidateRequest(top_n=2k, per_label=k)`).
    """

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    method: Literal["balanced"] = Field(
        "balanced", description="Label-balanced kNN: equal quota per label, most similar first."
    )
    labels: list[str] | None = Field(
        None,
        min_length=1,
        description="Label names to balance over; default every label among the candidates. "
        "Names the pool does not have are ignored.",
    )

    def build(self, label_names: tuple[str, ...] = ()) -> Selector:
        """A `BalancedSelector`, label names resolved to codes (index in `label_names`).

        Unknown names map to no code; if none is known, selection falls back to kNN.
        """
        if self.labels is None:
            return BalancedSelector()
        code_of = {name: code for code, name in enumerate(label_names)}
        return BalancedSelector([code_of[n] for n in self.labels if n in code_of])

    def candidate_request(self, k: int) -> CandidateRequest:
        """The retrieval this strategy needs for k demonstrations."""
        k = max(0, k)
        return CandidateRequest(top_n=2 * k, per_label=k)
