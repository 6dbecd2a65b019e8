"""Domain values and the contracts every selection strategy implements.

Pure numpy: nothing here knows HTTP, storage or embedders. The app builds `Candidates` from
an index search and hands them to a `Selector`, then an `Orderer` puts the chosen ones in
prompt order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

NO_LABEL = -1
"""Label code of a candidate that has no class label."""


@dataclass(frozen=True, slots=True)
class Candidates:
    """Aligned arrays describing candidate demonstrations.

    `ids` are the server's int64 example ids, `scores` the cosine similarity of each candidate
    to the query, `vectors` their L2-normalised embeddings (n, d), and `labels` an int32 code
    per candidate (an index into `SelectionContext.label_names`, or `NO_LABEL`).
    Order is meaningful only where a stage says so: the retrieval stage delivers them best
    first (descending score, ties by ascending id).
    """

    ids: NDArray[np.int64]
    scores: NDArray[np.float32]
    vectors: NDArray[np.float32]
    labels: NDArray[np.int32]

    def __post_init__(self) -> None:
        n = self.ids.shape[0]
        if self.scores.shape != (n,) or self.labels.shape != (n,) or self.vectors.shape[0] != n:
            raise ValueError("Candidates arrays must be aligned")

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def take(self, idx: Sequence[int] | NDArray[np.intp] | NDArray[np.int64]) -> Candidates:
        """The candidates at positions `idx`, in that order."""
        pos = np.asarray(idx, dtype=np.intp)
        return Candidates(
            ids=self.ids[pos],
            scores=self.scores[pos],
            vectors=self.vectors[pos],
            labels=self.labels[pos],
        )

    @staticmethod
    def empty(dim: int) -> Candidates:
        return Candidates(
            ids=np.empty(0, dtype=np.int64),
            scores=np.empty(0, dtype=np.float32),
            vectors=np.empty((0, dim), dtype=np.float32),
            labels=np.empty(0, dtype=np.int32),
        )


@dataclass(slots=True)
class SelectionContext:
    """Per-request state shared by the stages.

    `rng` is `np.random.default_rng(seed)`, the seed taken from the request (same request +
    same seed = same prompt). `label_names` maps label codes to names; codes follow the
    sorted order of the names, so "lower label id" in ALGORITHMS.md means the
    lexicographically smaller name. Stages record their decisions in `trace`.
    """

    pool: str
    pool_version: int
    seed: int
    label_names: tuple[str, ...] = ()
    trace: dict[str, Any] = field(default_factory=dict)
    _rng: np.random.Generator | None = field(default=None, init=False, repr=False)

    @property
    def rng(self) -> np.random.Generator:
        # Made on first use: kNN, MMR and most orders never draw, and making a generator took
        # 0.3 ms of a request on an idle server.
        if self._rng is None:
            self._rng = np.random.default_rng(self.seed)
        return self._rng


@dataclass(frozen=True, slots=True)
class CandidateRequest:
    """What a selector needs from retrieval.

    `top_n`: the n labeled examples most similar to the query. `per_label`: additionally the
    `per_label` most similar examples of every label (label-balanced selection). `everything`:
    all labeled examples of the pool (query-independent selectors such as random), delivered
    in pool order rather than best first. `fixed`: the labeled members of a named, ordered
    set that the app resolves from the spec (a subset), delivered in that set's order.
    """

    top_n: int
    per_label: int = 0
    everything: bool = False
    fixed: bool = False


class Selector(Protocol):
    """Choose at most k demonstrations from `candidates`.

    Guarantees: the result is a subset of the candidates, has no duplicate ids, holds
    min(k, len(candidates)) items unless the strategy's spec says otherwise, and is
    deterministic given `ctx.rng`. The order of the result is the pick order; prompt order is
    the Orderer's job.
    """

    def select(
        self,
        query: NDArray[np.float32],
        candidates: Candidates,
        k: int,
        ctx: SelectionContext,
    ) -> Candidates: ...


class Orderer(Protocol):
    """Put chosen demonstrations in prompt order; returns a permutation of `chosen`."""

    def order(
        self,
        query: NDArray[np.float32],
        chosen: Candidates,
        ctx: SelectionContext,
    ) -> Candidates: ...


def rank_best_first(scores: NDArray[np.floating[Any]], ids: NDArray[np.int64]) -> NDArray[np.intp]:
    """Positions sorted by descending score, ties by ascending id (the canonical tie-break)."""
    return np.lexsort((ids, -scores.astype(np.float64)))
