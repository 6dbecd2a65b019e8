"""From a query to ordered, rendered demonstrations (ARCHITECTURE.md, steps 2-6).

embed (LRU cache first) -> retrieve candidates from the pool's active snapshot -> select ->
order -> load the rows -> render. The CPU-bound part runs in one worker thread hop.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import anyio
import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field

from app.errors import Conflict, InvalidRequest, NotFound
from app.presets import PresetStore, UsablePreset, preset_template
from app.settings import Limits
from app.snapshot import PoolSnapshot
from app.store import ExampleRow, PoolSettings, PoolStore
from app.subsets import SubsetStore
from app.templates import Demo, Template, render_chat, render_chat_demos, render_text
from retrievers.base import Embedder, embed_query
from retrievers.cache import CachedEmbedder
from selection.base import Candidates, SelectionContext
from selection.ordering import OrderName, build_orderer
from selection.specs import PresetSpec, SelectorSpec, SubsetSpec

POOL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"

INLINE_QUERY_CHARS = 1_000
"""The longest query a lone request embeds on the event loop (about 250 tokens at most)."""

LOOP_TURNS_BEFORE_INLINE = 3
"""Event-loop turns a lone request lets pass before deciding to embed on the loop, so that
requests already in the server's socket buffers are read and counted: in the worst case one
turn polls the sockets, the next runs the read handlers (which start the requests' tasks),
and the next runs those tasks into the request middleware."""


class SelectParams(BaseModel):
    """Selection fields shared by `/select` and the `icl` object of completions."""

    model_config = ConfigDict(extra="forbid")

    k: int | None = Field(None, ge=0, description="Number of demonstrations (pool default).")
    selector: SelectorSpec | None = Field(None, description="Selection strategy (pool default).")
    order: OrderName | None = Field(None, description="Prompt order (pool default).")
    subset: str | None = Field(None, description="Restrict candidates to a named subset.")
    allow_stale: bool = Field(
        False,
        description="Use a subset or preset even if the pool's examples changed since it was "
        "computed.",
    )
    seed: int | None = Field(
        None,
        ge=0,
        le=2**63 - 1,
        description="Seed for random strategies; default derived from the request.",
    )
    template: Template | None = Field(None, description="Overrides of the pool's template.")


class SelectRequest(SelectParams):
    query: str = Field(min_length=1, description="The text to find demonstrations for.")
    mode: Literal["chat", "text"] = "chat"


class IclSpec(SelectParams):
    pool: str = Field(pattern=POOL_NAME_PATTERN)
    query: str | None = Field(
        None, min_length=1, description="Retrieval query; default: the last user message."
    )


@dataclass(frozen=True, slots=True)
class Selection:
    pool: str
    version: int
    template: Template
    demonstrations: list[tuple[ExampleRow, float]]
    timing_ms: dict[str, float]

    @property
    def ids(self) -> list[int]:
        return [row.id for row, _ in self.demonstrations]

    @property
    def demos(self) -> list[Demo]:
        return [
            Demo(input=row.input, output=row.output or "", label=row.label)
            for row, _ in self.demonstrations
        ]

    def demonstrations_json(self) -> list[dict[str, Any]]:
        return [
            {
                "id": row.id,
                "external_id": row.external_id,
                "input": row.input,
                "output": row.output,
                "label": row.label,
                "score": round(float(score), 6),
                "metadata": row.metadata if row.metadata is not None else {},
            }
            for row, score in self.demonstrations
        ]

    def chat_demo_messages(self) -> list[dict[str, str]]:
        return render_chat_demos(self.template, self.demos)

    def select_response(self, query: str) -> dict[str, Any]:
        return {
            "pool": self.pool,
            "version": self.version,
            "demonstrations": self.demonstrations_json(),
            "messages": render_chat(self.template, self.demos, query),
            "prompt": render_text(self.template, self.demos, query),
            "timing_ms": self.timing_ms,
        }


def _default_seed(pool: str, version: int, query: str) -> int:
    # Identical requests get identical prompts, which keeps upstream prompt caches warm.
    digest = hashlib.blake2b(f"{pool}\0{version}\0{query}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _merge_template(pool_template: Template, override: Template | None) -> Template:
    if override is None:
        return pool_template
    given = override.model_dump(exclude_unset=True)
    return Template.model_validate({**pool_template.model_dump(), **given})


class Pipeline:
    def __init__(
        self,
        store: PoolStore,
        embedder: Embedder,
        limits: Limits,
        default_k: int,
        observe_stage: Any = None,
        requests_in_flight: Callable[[], int] | None = None,
    ) -> None:
        """`requests_in_flight` counts the HTTP requests being served; with it, a lone
        request with a short query selects on the event loop's thread (see `_may_embed_inline`).
        Leave it None when the embedder is not computed here."""
        self.store = store
        self.embedder = embedder
        self.limits = limits
        self.default_k = default_k
        self._observe = observe_stage
        self._requests_in_flight = requests_in_flight
        self.subsets: SubsetStore | None = None
        self.presets: PresetStore | None = None

    def _snapshot(self, pool: str) -> PoolSnapshot:
        snapshot = self.store.snapshot(pool)
        if snapshot is None:
            info = self.store.pool_info(pool)
            job = info.get("active_job")
            hint = f" (job {job} is publishing it)" if job else ""
            raise Conflict(
                f"pool '{pool}' has no published version yet{hint}", code="pool_not_ready"
            )
        if snapshot.embedder_name != self.embedder.name:
            raise Conflict(
                f"pool '{pool}' was embedded with {snapshot.embedder_name} but the server "
                f"embeds queries with {self.embedder.name}; re-upload it",
                code="embedder_mismatch",
            )
        return snapshot

    def _resolve(
        self, settings: PoolSettings, params: SelectParams, preset: UsablePreset | None = None
    ) -> tuple[OrderName, int]:
        spec = params.selector if params.selector is not None else settings.selector
        if params.order is not None:
            order = params.order
        elif isinstance(spec, SubsetSpec | PresetSpec):
            order = "as_selected"  # a fixed set keeps its own order: a stable prompt prefix
        else:
            order = settings.order
        if params.k is not None:
            k = params.k
        elif preset is not None:
            k = preset.k  # the size it was optimized at
        else:
            k = settings.k or self.default_k
        if k > self.limits.max_k:
            raise InvalidRequest(
                f"k={k} is more than the limit of {self.limits.max_k}",
                param="k",
                code="k_too_large",
            )
        return order, k

    def _preset(self, pool: str, name: str, allow_stale: bool) -> UsablePreset:
        if self.presets is None:
            raise NotFound(f"preset '{name}' does not exist", param="preset")
        return self.presets.usable(pool, name, allow_stale=allow_stale)

    def _subset_ids(self, pool: str, name: str, allow_stale: bool) -> NDArray[np.int64]:
        if self.subsets is None:
            raise NotFound(f"subset '{name}' does not exist", param="subset")
        return self.subsets.usable_ids(pool, name, allow_stale=allow_stale)

    def _choose(
        self,
        snapshot: PoolSnapshot,
        query: str,
        spec: SelectorSpec,
        order: OrderName,
        k: int,
        seed: int | None,
        *,
        allowed: NDArray[np.int64] | None = None,
        fixed: NDArray[np.int64] | None = None,
        alone: bool = False,
    ) -> tuple[Candidates, dict[str, float]]:
        t0 = time.perf_counter()
        vector = embed_query(self.embedder, query, alone=alone)
        t1 = time.perf_counter()
        request = spec.candidate_request(k)
        if request.top_n > self.limits.max_fetch_k:
            raise InvalidRequest(
                f"the selector would fetch {request.top_n} candidates, more than the limit "
                f"of {self.limits.max_fetch_k}",
                param="selector",
            )
        candidates = snapshot.retrieve(vector, request, allowed=allowed, fixed=fixed)
        t2 = time.perf_counter()
        if seed is None:
            seed = _default_seed(snapshot.pool, snapshot.version, query)
        ctx = SelectionContext(
            pool=snapshot.pool,
            pool_version=snapshot.version,
            seed=seed,
            label_names=snapshot.label_names,
        )
        chosen = spec.build(snapshot.label_names).select(vector, candidates, k, ctx)
        ordered = build_orderer(order).order(vector, chosen, ctx)
        t3 = time.perf_counter()
        return ordered, {
            "embed": (t1 - t0) * 1e3,
            "search": (t2 - t1) * 1e3,
            "select": (t3 - t2) * 1e3,
        }

    def select_sync(
        self, pool: str, query: str, params: SelectParams, *, alone: bool = False
    ) -> Selection:
        """The selection for `query`; `alone` says that this request is the only one in
        flight (see `retrievers.base.embed_query`)."""
        started = time.perf_counter()
        settings = self.store.settings_of(pool)
        spec = params.selector if params.selector is not None else settings.selector
        preset = None
        base_template = settings.template
        if isinstance(spec, PresetSpec):
            preset = self._preset(pool, spec.name, params.allow_stale)
            # Scored with this template, so served with it; a request's template still wins.
            base_template = preset_template(settings.template, preset.template, preset.instruction)
        order, k = self._resolve(settings, params, preset)
        template = _merge_template(base_template, params.template)
        snapshot = self._snapshot(pool)
        allowed = fixed = None
        if params.subset is not None:
            allowed = self._subset_ids(pool, params.subset, params.allow_stale)
        if isinstance(spec, SubsetSpec):
            fixed = self._subset_ids(pool, spec.name, params.allow_stale)
        if preset is not None:
            fixed = preset.ids
        if k == 0:
            ordered, timing = (
                Candidates.empty(snapshot.dim),
                {"embed": 0.0, "search": 0.0, "select": 0.0},
            )
        else:
            ordered, timing = self._choose(
                snapshot,
                query,
                spec,
                order,
                k,
                params.seed,
                allowed=allowed,
                fixed=fixed,
                alone=alone,
            )
        rows = self.store.examples_by_id(pool, snapshot.version, [int(i) for i in ordered.ids])
        timing["total"] = (time.perf_counter() - started) * 1e3
        if self._observe is not None:
            for stage, ms in timing.items():
                self._observe(stage, ms / 1e3)
        return Selection(
            pool=pool,
            version=snapshot.version,
            template=template,
            demonstrations=list(zip(rows, (float(s) for s in ordered.scores), strict=True)),
            timing_ms={name: round(ms, 3) for name, ms in timing.items()},
        )

    async def select(self, pool: str, query: str, params: SelectParams) -> Selection:
        if self._embedding_is_cached(query):
            # Only the embedding is worth a worker thread: with it cached, the search, the
            # selection and the row lookup take less time than the hop to a thread and back.
            return self.select_sync(pool, query, params)
        if self._may_embed_inline(query):
            # Requests already received but not yet read count as company only once they
            # have started; embedding here first would keep them unread, and under load each
            # would in turn look alone: a convoy on the loop instead of shared batches.
            for _ in range(LOOP_TURNS_BEFORE_INLINE):
                await asyncio.sleep(0)
            if self._alone():
                return self.select_sync(pool, query, params, alone=True)
        return await anyio.to_thread.run_sync(self.select_sync, pool, query, params)

    def _embedding_is_cached(self, query: str) -> bool:
        return isinstance(self.embedder, CachedEmbedder) and query in self.embedder

    def _alone(self) -> bool:
        return self._requests_in_flight is not None and self._requests_in_flight() <= 1

    def _may_embed_inline(self, query: str) -> bool:
        """Whether a request may embed its query on the event loop's thread.

        A request that is the only one in flight has nothing to wait for but its own
        embedding, and the event loop's thread runs it fastest: a worker thread woken for it
        tends to be placed on an idle core, which on small virtual machines runs the forward
        pass 1-2 ms slower. A short query bounds how long the loop is held.
        """
        return self._alone() and len(query) <= INLINE_QUERY_CHARS
