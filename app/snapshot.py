"""An immutable, searchable view of one published pool version.

Readers take the pool's current snapshot once per request and use only it, so a publish that
happens meanwhile is invisible to them: they see the old version or the new one, never a mix.
Snapshots are never mutated after construction (FAISS indexes are not safe to mutate while
searched); a publish builds a new one and swaps the pointer. A snapshot still held by a reader
pins its version: the store does not delete rows that version can see until it is released.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from app.settings import IndexSettings
from retrievers.faiss_index import FlatIPIndex
from retrievers.hnsw_index import HNSWIPIndex
from selection.base import NO_LABEL, CandidateRequest, Candidates


@dataclass(frozen=True, slots=True)
class MemberLabels:
    """Per-member annotation state of a version, in pool order (ascending id)."""

    ids: NDArray[np.int64]
    labeled: NDArray[np.bool_]
    labels: list[str | None]


SearchIndex = FlatIPIndex | HNSWIPIndex


def build_index(
    ids: NDArray[np.int64], vectors: NDArray[np.float32], settings: IndexSettings
) -> SearchIndex:
    """The index `settings` choose for these vectors: exact, or HNSW for large pools."""
    use_graph = settings.kind == "hnsw" or (
        settings.kind == "auto" and ids.shape[0] >= settings.ann_min_size
    )
    if not use_graph or ids.shape[0] == 0:
        return FlatIPIndex.build(ids, vectors)
    return HNSWIPIndex.build(
        ids,
        vectors,
        m=settings.hnsw_m,
        ef_construction=settings.hnsw_ef_construction,
        ef_search=settings.hnsw_ef_search,
    )


@dataclass(slots=True)
class _LazyIndexes:
    lock: threading.Lock = field(default_factory=threading.Lock)
    per_label: dict[int, SearchIndex] = field(default_factory=dict)


# weakref_slot: the store tracks which snapshots requests and jobs still hold, and keeps the
# rows of their versions until they let go.
@dataclass(frozen=True, slots=True, weakref_slot=True)
class PoolSnapshot:
    pool: str
    version: int
    embedder_name: str
    dim: int
    ids: NDArray[np.int64]
    vectors: NDArray[np.float32]
    labeled_pos: NDArray[np.intp]
    labeled_mask: NDArray[np.bool_]
    label_codes: NDArray[np.int32]
    label_names: tuple[str, ...]
    index: SearchIndex
    index_settings: IndexSettings
    _lazy: _LazyIndexes = field(default_factory=_LazyIndexes, repr=False)

    @staticmethod
    def build(
        *,
        pool: str,
        version: int,
        embedder_name: str,
        dim: int,
        members: MemberLabels,
        vectors: NDArray[np.float32],
        index_settings: IndexSettings | None = None,
    ) -> PoolSnapshot:
        if vectors.shape != (members.ids.shape[0], dim):
            raise ValueError(
                f"pool {pool} v{version}: {members.ids.shape[0]} members but vectors "
                f"{vectors.shape}"
            )
        names = sorted({label for label in members.labels if label is not None})
        code_of = {name: code for code, name in enumerate(names)}
        codes = np.fromiter(
            (NO_LABEL if label is None else code_of[label] for label in members.labels),
            dtype=np.int32,
            count=len(members.labels),
        )
        labeled_pos = np.flatnonzero(members.labeled).astype(np.intp)
        index_settings = index_settings or IndexSettings()
        index = build_index(
            members.ids[labeled_pos], np.ascontiguousarray(vectors[labeled_pos]), index_settings
        )
        return PoolSnapshot(
            pool=pool,
            version=version,
            embedder_name=embedder_name,
            dim=dim,
            ids=members.ids,
            vectors=vectors,
            labeled_pos=labeled_pos,
            labeled_mask=np.asarray(members.labeled, dtype=np.bool_),
            label_codes=codes,
            label_names=tuple(names),
            index=index,
            index_settings=index_settings,
        )

    @property
    def size(self) -> int:
        return int(self.ids.shape[0])

    @property
    def labeled(self) -> int:
        return int(self.labeled_pos.shape[0])

    def stats(self, top_labels: int = 100) -> dict[str, Any]:
        counts = np.bincount(
            self.label_codes[self.label_codes >= 0], minlength=len(self.label_names)
        )
        order = sorted(range(len(self.label_names)), key=lambda c: (-int(counts[c]), c))
        labels = {self.label_names[c]: int(counts[c]) for c in order[:top_labels]}
        return {
            "size": self.size,
            "labeled": self.labeled,
            "labels": labels,
            "label_count": len(self.label_names),
        }

    def positions(self, ids: NDArray[np.int64]) -> NDArray[np.intp]:
        pos = np.searchsorted(self.ids, ids).astype(np.intp)
        if pos.size and (pos.max() >= self.ids.shape[0] or np.any(self.ids[pos] != ids)):
            raise KeyError("ids not in this pool version")
        return pos

    def candidates_at(self, pos: NDArray[np.intp], scores: NDArray[np.float32]) -> Candidates:
        return Candidates(
            ids=self.ids[pos],
            scores=scores.astype(np.float32, copy=False),
            vectors=np.ascontiguousarray(self.vectors[pos]),
            labels=self.label_codes[pos],
        )

    def _label_index(self, code: int) -> SearchIndex:
        with self._lazy.lock:
            index = self._lazy.per_label.get(code)
            if index is None:
                pos = self.labeled_pos[self.label_codes[self.labeled_pos] == code]
                # Exact, not `build_index`: these are built on a request's path, and an HNSW
                # build there would take seconds on a large label.
                index = FlatIPIndex.build(self.ids[pos], np.ascontiguousarray(self.vectors[pos]))
                self._lazy.per_label[code] = index
            return index

    def _labeled_positions_of(self, ids: NDArray[np.int64]) -> NDArray[np.intp]:
        """Positions of those `ids` that are labeled members of this version, in `ids` order."""
        if self.size == 0:
            return np.empty(0, dtype=np.intp)
        pos = np.minimum(np.searchsorted(self.ids, ids), self.size - 1).astype(np.intp)
        keep: NDArray[np.bool_] = (self.ids[pos] == ids) & self.labeled_mask[pos]
        return pos[keep]

    def retrieve(
        self,
        query: NDArray[np.float32],
        request: CandidateRequest,
        *,
        allowed: NDArray[np.int64] | None = None,
        fixed: NDArray[np.int64] | None = None,
    ) -> Candidates:
        """Labeled candidates for `query`, best first (descending score, ties by id).

        `allowed` restricts every search to those ids (a subset); `fixed` is a named ordered
        set for `CandidateRequest(fixed=True)`, delivered in its own order.
        """
        q = np.ascontiguousarray(query.reshape(1, -1), dtype=np.float32)
        if request.fixed:
            if fixed is None:
                raise ValueError("a fixed-set strategy needs the set's ids")
            pos = self._labeled_positions_of(fixed)
            scores = (np.asarray(self.vectors[pos], dtype=np.float32) @ q[0]).astype(np.float32)
            return self.candidates_at(pos, scores)
        if allowed is not None:
            return self._retrieve_within(q, request, allowed)
        if request.everything:
            # Pool order, not best first: sorting and copying every labeled vector would cost
            # more than the query-independent selectors that ask for everything.
            scores_all = np.asarray(self.vectors @ q[0], dtype=np.float32)
            if self.labeled == self.size:
                return Candidates(
                    ids=self.ids, scores=scores_all, vectors=self.vectors, labels=self.label_codes
                )
            return self.candidates_at(self.labeled_pos, scores_all[self.labeled_pos])
        else:
            found_ids: list[NDArray[np.int64]] = []
            found_scores: list[NDArray[np.float32]] = []
            if request.top_n > 0:
                s, i = self.index.search(q, request.top_n)
                found_ids.append(i[0])
                found_scores.append(s[0])
            if request.per_label > 0:
                for code in range(len(self.label_names)):
                    s, i = self._label_index(code).search(q, request.per_label)
                    found_ids.append(i[0])
                    found_scores.append(s[0])
            return self._merge(found_ids, found_scores)

    def _retrieve_within(
        self, q: NDArray[np.float32], request: CandidateRequest, allowed: NDArray[np.int64]
    ) -> Candidates:
        pos = self._labeled_positions_of(np.unique(allowed))
        if request.everything:
            scores = (np.asarray(self.vectors[pos], dtype=np.float32) @ q[0]).astype(np.float32)
            return self.candidates_at(pos, scores)
        found_ids: list[NDArray[np.int64]] = []
        found_scores: list[NDArray[np.float32]] = []
        allowed_ids = self.ids[pos]
        if request.top_n > 0:
            s, i = self.index.search_subset(q, request.top_n, allowed_ids)
            found_ids.append(i[0])
            found_scores.append(s[0])
        if request.per_label > 0:
            codes = self.label_codes[pos]
            for code in np.unique(codes[codes >= 0]):
                s, i = self._label_index(int(code)).search_subset(
                    q, request.per_label, allowed_ids[codes == code]
                )
                found_ids.append(i[0])
                found_scores.append(s[0])
        return self._merge(found_ids, found_scores)

    def _merge(
        self, found_ids: list[NDArray[np.int64]], found_scores: list[NDArray[np.float32]]
    ) -> Candidates:
        if not found_ids:
            return Candidates.empty(self.dim)
        if len(found_ids) == 1:
            # One search (kNN, MMR): its ids are distinct and already in (score, id) order.
            found = found_ids[0] >= 0
            return self.candidates_at(self.positions(found_ids[0][found]), found_scores[0][found])
        all_ids = np.concatenate(found_ids)
        all_scores = np.concatenate(found_scores)
        keep = all_ids >= 0
        unique_ids, first = np.unique(all_ids[keep], return_index=True)
        scores = all_scores[keep][first]
        pos = self.positions(unique_ids)
        order = np.lexsort((self.ids[pos], -scores.astype(np.float64)))
        return self.candidates_at(pos[order], scores[order])
