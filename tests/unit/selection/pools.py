"""Seeded random candidate pools for the selection tests (ALGORITHMS.md 8, shared fixture).

Gaussian vectors (no duplicate rows with probability 1), unit-normalised, labels drawn from C
classes with skewed frequencies and some NO_LABEL items, distinct random int64 ids, and the
candidates shuffled so no selector can rely on the input being best first.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from selection.base import NO_LABEL, Candidates, SelectionContext


@dataclass(frozen=True)
class Pool:
    seed: int
    query: np.ndarray
    candidates: Candidates
    n_labels: int

    @property
    def n(self) -> int:
        return len(self.candidates)


def make_pool(
    seed: int,
    n: int | None = None,
    dim: int | None = None,
    n_labels: int | None = None,
    unlabeled: float = 0.15,
) -> Pool:
    rng = np.random.default_rng(10_000 + seed)
    dim = int(rng.choice([8, 16])) if dim is None else dim
    n = int(rng.integers(10, 121)) if n is None else n
    n_labels = int(rng.choice([2, 3, 5])) if n_labels is None else n_labels

    vecs = rng.standard_normal((n, dim))
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    vectors = vecs.astype(np.float32)
    q = rng.standard_normal(dim)
    query = (q / np.linalg.norm(q)).astype(np.float32)
    scores = (vectors.astype(np.float64) @ query.astype(np.float64)).astype(np.float32)

    # skewed label frequencies so that some labels run short of their quota
    freq = rng.dirichlet(np.full(n_labels, 0.6))
    labels = rng.choice(n_labels, size=n, p=freq).astype(np.int32)
    labels[rng.random(n) < unlabeled] = NO_LABEL
    ids = rng.choice(1_000_000, size=n, replace=False).astype(np.int64)

    perm = rng.permutation(n)
    cands = Candidates(
        ids=ids[perm], scores=scores[perm], vectors=vectors[perm], labels=labels[perm]
    )
    return Pool(seed=seed, query=query, candidates=cands, n_labels=n_labels)


def make_ctx(seed: int = 0, label_names: tuple[str, ...] = ()) -> SelectionContext:
    return SelectionContext(pool="test", pool_version=1, seed=seed, label_names=label_names)


def id_list(c: Candidates) -> list[int]:
    return [int(i) for i in c.ids]


def handmade(
    ids: list[int], scores: list[float], labels: list[int], vectors: list[list[float]] | None = None
) -> Candidates:
    """A small hand-written candidate set (vectors default to distinct axis vectors)."""
    n = len(ids)
    vec = np.eye(max(n, 1), dtype=np.float32)[:n] if vectors is None else np.asarray(vectors)
    return Candidates(
        ids=np.asarray(ids, dtype=np.int64),
        scores=np.asarray(scores, dtype=np.float32),
        vectors=vec.astype(np.float32),
        labels=np.asarray(labels, dtype=np.int32),
    )
