"""PoolSnapshot.retrieve against brute force over the labeled members of a version."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.typing import NDArray

from app.settings import IndexSettings
from app.snapshot import MemberLabels, PoolSnapshot
from selection.base import CandidateRequest

DIM = 16
LABELS = ("neg", "neu", "pos")


def snapshot(kind: str) -> PoolSnapshot:
    rng = np.random.default_rng(11)
    n = 400
    vectors = rng.standard_normal((n, DIM)).astype(np.float32)
    vectors[200:230] = vectors[100]  # exact ties, broken by id
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    labeled = rng.random(n) < 0.8
    labels = [LABELS[i % 3] if labeled[i] else None for i in range(n)]
    members = MemberLabels(ids=np.arange(n, dtype=np.int64) * 5 + 3, labeled=labeled, labels=labels)
    # ef_search above the pool size: the graph walk is exhaustive, so the result is exact.
    settings = IndexSettings(kind=kind, hnsw_ef_search=1_000)  # type: ignore[arg-type]
    return PoolSnapshot.build(
        pool="p",
        version=1,
        embedder_name="test",
        dim=DIM,
        members=members,
        vectors=vectors,
        index_settings=settings,
    )


def brute_force(
    snap: PoolSnapshot, query: NDArray[np.float32], top_n: int, per_label: int
) -> list[int]:
    pos = snap.labeled_pos
    scores = (snap.vectors[pos].astype(np.float64) @ query.astype(np.float64)).astype(np.float32)
    ranked = sorted(range(pos.size), key=lambda i: (-float(scores[i]), int(snap.ids[pos[i]])))
    chosen = set(ranked[:top_n])
    for code in range(len(snap.label_names)):
        of_label = [i for i in ranked if snap.label_codes[pos[i]] == code]
        chosen.update(of_label[:per_label])
    return [int(snap.ids[pos[i]]) for i in ranked if i in chosen]


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
@pytest.mark.parametrize(("top_n", "per_label"), [(8, 0), (40, 0), (400, 0), (8, 3), (0, 4)])
def test_retrieve_matches_brute_force(kind: str, top_n: int, per_label: int) -> None:
    snap = snapshot(kind)
    queries = np.random.default_rng(12).standard_normal((20, DIM)).astype(np.float32)
    queries[0] = snap.vectors[100]  # a query on the tied rows
    for query in queries:
        got = snap.retrieve(query, CandidateRequest(top_n=top_n, per_label=per_label))
        assert got.ids.tolist() == brute_force(snap, query, top_n, per_label)
        pos = snap.positions(got.ids)
        np.testing.assert_array_equal(got.vectors, snap.vectors[pos])
        np.testing.assert_array_equal(got.labels, snap.label_codes[pos])
        exact = (snap.vectors[pos].astype(np.float64) @ query.astype(np.float64)).astype(np.float32)
        np.testing.assert_array_equal(got.scores, exact)
