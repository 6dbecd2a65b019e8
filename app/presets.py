"""Presets: one optimized, ordered demonstration set per name, found with the upstream LLM.

A preset is the ordered k-tuple of a pool's labeled examples (plus, optionally, one of the
caller's candidate instructions) that scored best on a validation set, searched by EASE
(Wu et al., NeurIPS 2024; ALGORITHMS.md 4.3) or by plain random search. It is computed once
by a job and stored; serving it (`{"method": "preset", "name": ...}`) costs nothing more than a
subset, and every query gets the same system message and demonstrations: a byte-identical
prompt prefix.

The job, in order:

1. validation set: a seeded sample of `limit` labeled rows of a pool (when that is the preset's
   own pool, those rows are kept out of the bank), or the request's inline examples;
2. bank: the pool's labeled examples (or a ready subset's labeled members), without the
   validation rows; when more than `bank_size` remain, the `bank_size` most relevant to the
   validation set are kept: highest max cosine between the example's stored vector and the
   embedded validation inputs, ties by id (the reference only ever looks at 100 items);
3. representations: each bank item and validation item as `"Input: {input}\\nOutput: {output}"`
   embedded with the server's embedder (the one uploads use), rows of unit length;
4. search: `selection.ease.ease_search` (or `random_search`) with `ChatEvaluator`, which
   renders every validation prompt exactly as serving renders it and scores the answers
   (`app.llm.scoring`: label match on classification pools, else normalised exact match);
5. the best tuple's example ids, its instruction, score, history and counters are stored.

A preset is *stale* once the pool's members or vectors changed after it was computed, as for
subsets; labeling with PATCH does not make it stale.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Final, Literal

import numpy as np
from numpy.typing import NDArray
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
)

from app.errors import Conflict, InvalidRequest, NotFound
from app.llm.client import UpstreamClient
from app.llm.evaluator import ChatEvaluator, EvaluationCancelled, ValidationItem
from app.llm.scoring import Metric
from app.named import NamedRows
from app.settings import Limits
from app.snapshot import PoolSnapshot
from app.store import PoolStore, iso, new_job_id
from app.subsets import SubsetStore
from app.templates import Demo, Template
from retrievers.base import Embedder
from selection.ease import EaseParams, SearchResult, ease_search, random_search
from selection.fixed import SET_NAME_PATTERN

log = logging.getLogger("iclserve.presets")

PresetMethod = Literal["ease", "random_search"]

DEFAULT_EVALUATIONS: Final = 165
"""The reference's `total_iter`: 40 initial tuples plus 125 bandit rounds."""
MAX_VALIDATION: Final = 500
MAX_INSTRUCTIONS: Final = 100
MAX_INSTRUCTION_CHARS: Final = 4000
MAX_BANK: Final = 1000
SIM_DECIMALS: Final = 9
_ID_LISTS: Final = ("bank_ids", "validation_ids")
"""Keys of `info` left out of list answers: up to a thousand ids each."""


class PresetCancelled(Exception):
    """Raised from a progress callback to stop a job that was cancelled or is shutting down."""


class ValidationFromPool(BaseModel):
    """Validation rows drawn from a pool's labeled examples."""

    model_config = ConfigDict(extra="forbid")

    pool: str = Field(
        pattern=SET_NAME_PATTERN,
        description="Pool to draw labeled validation rows from (may be the preset's own pool: "
        "then those rows are left out of the bank).",
    )
    limit: int = Field(
        20, ge=1, le=MAX_VALIDATION, description="How many rows to draw (seeded, at random)."
    )


class ValidationExample(BaseModel):
    """One inline validation example."""

    model_config = ConfigDict(extra="forbid")

    input: str = Field(min_length=1, description="The query.")
    output: str = Field(min_length=1, description="The expected answer.")
    label: str | None = Field(
        None,
        min_length=1,
        description="Class label (classification pools; defaults to `output` there).",
    )


class ValidationInline(BaseModel):
    """Validation examples given in the request."""

    model_config = ConfigDict(extra="forbid")

    examples: list[ValidationExample] = Field(
        min_length=1, max_length=MAX_VALIDATION, description="The validation examples."
    )


def _validation_kind(value: Any) -> str:
    if isinstance(value, dict):
        return "examples" if "examples" in value else "pool"
    return "examples" if isinstance(value, ValidationInline) else "pool"


ValidationSpec = Annotated[
    Annotated[ValidationFromPool, Tag("pool")] | Annotated[ValidationInline, Tag("examples")],
    Discriminator(_validation_kind),
]


class PresetCreate(BaseModel):
    """The body of `POST /v1/pools/{pool}/presets`."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=SET_NAME_PATTERN, description="Name of the preset in its pool.")
    method: PresetMethod = Field(
        description="`ease` (neural bandit with an optimal-transport filter) or "
        "`random_search` (uniformly random tuples, the baseline)."
    )
    k: int = Field(5, ge=1, description="Demonstrations in the preset.")
    validation: ValidationSpec = Field(
        description='`{"pool": name, "limit": 20}` or `{"examples": [{"input", "output", '
        '"label"?}]}`.'
    )
    budget: int | None = Field(
        None,
        ge=1,
        description="Most validation LLM calls: evaluations = budget // validation size "
        f"(default: {DEFAULT_EVALUATIONS} evaluations).",
    )
    model: str = Field(
        min_length=1, max_length=200, description="Upstream model that answers (routable)."
    )
    template: Template | None = Field(
        None, description="Overrides of the pool's template, field by field, for this preset."
    )
    instructions: (
        list[Annotated[str, Field(min_length=1, max_length=MAX_INSTRUCTION_CHARS)]] | None
    ) = Field(
        None,
        max_length=MAX_INSTRUCTIONS,
        description="Candidate instructions (system messages); the search picks one.",
    )
    seed: int = Field(
        0, ge=0, le=2**63 - 1, description="Seed of the validation draw and the search."
    )
    concurrency: int = Field(4, ge=1, le=64, description="Validation calls in flight at most.")
    subset: str | None = Field(
        None, pattern=SET_NAME_PATTERN, description="Take the bank from this ready subset."
    )
    bank_size: int = Field(
        100, ge=1, le=MAX_BANK, description="Most candidate examples the search considers."
    )
    max_tokens: int = Field(64, ge=1, le=4096, description="max_tokens of each answer.")
    params: dict[str, Any] = Field(
        default_factory=dict, description="EASE parameters (`ease` only)."
    )

    @field_validator("instructions")
    @classmethod
    def _plain_instructions(cls, value: list[str] | None) -> list[str] | None:
        for n, text in enumerate(value or []):
            try:
                Template(instruction=text)
            except ValidationError as exc:
                problem = exc.errors()[0]["msg"].removeprefix("Value error, ")
                raise ValueError(f"item {n}: {problem}") from None
        return value or None


def validate_params(method: str, params: dict[str, Any]) -> EaseParams | None:
    """The method's parameters (None for random search, which takes none)."""
    if method == "random_search":
        if params:
            key = sorted(params)[0]
            raise InvalidRequest(
                f"params.{key}: random_search takes no parameters", param=f"params.{key}"
            )
        return None
    try:
        return EaseParams.model_validate(params)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in ("params", *first["loc"]))
        raise InvalidRequest(f"{loc}: {first['msg']}", param=loc) from exc


def preset_template(
    pool_template: Template, override: Template | None, instruction: str | None
) -> Template:
    """The template a preset is scored and served with.

    The pool's template, the preset's own overrides field by field, then the chosen
    instruction as `instruction`. Serving merges the request's template over this one.
    """
    merged = pool_template
    if override is not None:
        given = override.model_dump(exclude_unset=True)
        merged = Template.model_validate({**merged.model_dump(), **given})
    if instruction is not None:
        merged = Template.model_validate({**merged.model_dump(), "instruction": instruction})
    return merged


def draw_validation(snapshot: PoolSnapshot, limit: int, seed: int) -> NDArray[np.int64]:
    """A seeded sample of `limit` labeled ids of a pool version (all when fewer), ascending."""
    labeled = snapshot.ids[snapshot.labeled_pos]
    n = min(limit, int(labeled.shape[0]))
    picked = np.random.default_rng(seed).choice(labeled.shape[0], size=n, replace=False)
    return np.sort(labeled[picked]).astype(np.int64)


def most_relevant(
    ids: NDArray[np.int64],
    vectors: NDArray[np.floating[Any]],
    queries: NDArray[np.floating[Any]],
    keep: int,
) -> NDArray[np.int64]:
    """The `keep` ids whose vector has the highest max cosine to a query row, ascending ids.

    Ties by ascending id; similarities are rounded so that exact ties stay ties whatever
    order the matrix product summed in.
    """
    if ids.shape[0] <= keep:
        return ids
    relevance = np.round((_unit(vectors) @ _unit(queries).T).max(axis=1), SIM_DECIMALS)
    order = np.lexsort((ids, -relevance))
    return np.sort(ids[order[:keep]])


def _unit(x: NDArray[np.floating[Any]]) -> NDArray[np.float64]:
    rows = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.where(norms > 0, norms, 1.0)


def demo_text(input_: str, output: str) -> str:
    """An example as EASE's representations see it."""
    return f"Input: {input_}\nOutput: {output}"


@dataclass(frozen=True, slots=True)
class UsablePreset:
    """What serving needs of a ready preset."""

    ids: NDArray[np.int64]
    k: int
    instruction: str | None
    template: Template | None


@dataclass(frozen=True, slots=True)
class _Plan:
    snapshot: PoolSnapshot
    validation_snapshot: PoolSnapshot | None
    validation_ids: NDArray[np.int64] | None
    validation_size: int
    bank_candidates: NDArray[np.int64]
    evaluations: int


@dataclass(frozen=True, slots=True)
class _ValidationRow:
    id: int | None
    input: str
    output: str
    label: str | None


def _finite(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return float(value)


def _validation_summary(request: dict[str, Any]) -> dict[str, Any]:
    validation = request.get("validation") or {}
    if "examples" in validation:
        return {"examples": len(validation["examples"])}
    return {"pool": validation.get("pool"), "limit": validation.get("limit")}


class PresetStore(NamedRows):
    """Preset rows in the pool store's SQLite file, and the preset jobs that fill them."""

    table = "presets"
    noun = "preset"

    def __init__(
        self,
        store: PoolStore,
        *,
        embedder: Embedder,
        upstream: UpstreamClient | None,
        subsets: SubsetStore | None,
        limits: Limits,
        batch_size: int = 64,
    ) -> None:
        self.store = store
        self.embedder = embedder
        """The embedder uploads use: bank, validation and sequence texts are embedded alike."""
        self.upstream = upstream
        self.subsets = subsets
        self.limits = limits
        self.batch_size = batch_size
        self._cache: dict[tuple[str, str], tuple[str | None, UsablePreset]] = {}

    # ---------------------------------------------------------------------------- writes

    def create(self, pool: str, request: PresetCreate) -> dict[str, Any]:
        params = validate_params(request.method, request.params)
        if request.k > self.limits.max_k:
            raise InvalidRequest(
                f"k={request.k} is more than the limit of {self.limits.max_k}",
                param="k",
                code="k_too_large",
            )
        self._check_model(request.model)
        if isinstance(request.validation, ValidationInline):
            self._check_inline(request.validation)
        plan = self._plan(pool, request)
        job_id = new_job_id()
        now = time.time()
        stored = request.model_dump(mode="json", exclude={"template"})
        stored["template"] = (
            request.template.model_dump(mode="json", exclude_unset=True)
            if request.template is not None
            else None
        )
        dumped = params.model_dump(mode="json", by_alias=True) if params is not None else {}
        with self.store.db.write() as conn:
            prow = conn.execute(
                "SELECT active_version FROM pools WHERE name = ?", (pool,)
            ).fetchone()
            if prow is None:
                raise NotFound(f"pool '{pool}' does not exist", param="pool", code="pool_not_found")
            current = conn.execute(
                "SELECT status, job_id FROM presets WHERE pool = ? AND name = ?",
                (pool, request.name),
            ).fetchone()
            if current is not None and current["status"] == "computing":
                raise Conflict(
                    f"preset '{request.name}' is being computed by job {current['job_id']}",
                    code="preset_computing",
                )
            conn.execute(
                "INSERT OR REPLACE INTO presets (pool, name, method, k, params, request, seed, "
                "status, job_id, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, 'computing', ?, ?)",
                (
                    pool,
                    request.name,
                    request.method,
                    request.k,
                    json.dumps(dumped),
                    json.dumps(stored),
                    request.seed,
                    job_id,
                    now,
                ),
            )
            conn.execute(
                "INSERT INTO jobs (id, kind, pool, status, total, params, created_at) "
                "VALUES (?, 'preset', ?, 'queued', ?, ?, ?)",
                (
                    job_id,
                    pool,
                    plan.evaluations,
                    json.dumps(
                        {
                            "preset": request.name,
                            "method": request.method,
                            "k": request.k,
                            "model": request.model,
                            "evaluations": plan.evaluations,
                            "validation_size": plan.validation_size,
                        }
                    ),
                    now,
                ),
            )
        self._cache.pop((pool, request.name), None)
        return self.get(pool, request.name)

    def _check_model(self, model: str) -> None:
        if self.upstream is None:
            raise InvalidRequest(
                "presets need an upstream LLM and none is configured", param="model"
            )
        try:
            self.upstream.route(model)
        except InvalidRequest as exc:
            raise InvalidRequest(exc.message, param="model", code=exc.code) from exc

    def _check_inline(self, validation: ValidationInline) -> None:
        limit = self.limits.max_field_chars
        for n, example in enumerate(validation.examples):
            for field in ("input", "output", "label"):
                value = getattr(example, field)
                if value is not None and len(value) > limit:
                    param = f"validation.examples.{n}.{field}"
                    raise InvalidRequest(
                        f"{param}: {len(value)} characters, more than the limit of {limit}",
                        param=param,
                    )

    def _snapshot(self, pool: str, *, param: str = "pool") -> PoolSnapshot:
        try:
            snapshot = self.store.snapshot(pool)
        except NotFound as exc:
            raise NotFound(exc.message, param=param, code=exc.code) from exc
        if snapshot is None:
            raise Conflict(
                f"pool '{pool}' has no published version yet", param=param, code="pool_not_ready"
            )
        if snapshot.embedder_name != self.embedder.name:
            raise Conflict(
                f"pool '{pool}' was embedded with {snapshot.embedder_name} but the server "
                f"embeds with {self.embedder.name}; re-upload it",
                param=param,
                code="embedder_mismatch",
            )
        return snapshot

    def _plan(self, pool: str, request: PresetCreate) -> _Plan:
        """What the job will work on, checked now so a bad request stores nothing."""
        if request.bank_size < request.k:
            raise InvalidRequest(
                f"bank_size {request.bank_size} is smaller than k={request.k}",
                param="bank_size",
            )
        snapshot = self._snapshot(pool)
        validation = request.validation
        validation_ids: NDArray[np.int64] | None = None
        vsnap: PoolSnapshot | None = None
        if isinstance(validation, ValidationFromPool):
            vsnap = (
                snapshot
                if validation.pool == pool
                else self._snapshot(validation.pool, param="validation.pool")
            )
            validation_ids = draw_validation(vsnap, validation.limit, request.seed)
            if validation_ids.shape[0] == 0:
                raise InvalidRequest(
                    f"validation pool '{validation.pool}' has no labeled examples",
                    param="validation.pool",
                    code="validation_unlabeled",
                )
            size = int(validation_ids.shape[0])
        else:
            size = len(validation.examples)
        exclude = (
            validation_ids
            if isinstance(validation, ValidationFromPool) and validation.pool == pool
            else None
        )
        bank = self._bank_candidates(pool, snapshot, request.subset, exclude)
        if bank.shape[0] < request.k:
            where = f"subset '{request.subset}'" if request.subset else f"pool '{pool}'"
            also = " outside the validation rows" if exclude is not None else ""
            raise InvalidRequest(
                f"{where} has {bank.shape[0]} labeled examples{also}, fewer than k={request.k}",
                param="k",
                code="bank_too_small",
            )
        evaluations = self._evaluations(request.budget, size)
        return _Plan(snapshot, vsnap, validation_ids, size, bank, evaluations)

    def _evaluations(self, budget: int | None, validation_size: int) -> int:
        if budget is None:
            evaluations = DEFAULT_EVALUATIONS
        else:
            if budget < validation_size:
                raise InvalidRequest(
                    f"budget {budget} is smaller than the validation set ({validation_size} "
                    f"examples): one evaluation takes {validation_size} LLM calls",
                    param="budget",
                    code="budget_too_small",
                )
            evaluations = budget // validation_size
        calls = evaluations * validation_size
        if calls > self.limits.max_preset_calls:
            raise InvalidRequest(
                f"{evaluations} evaluations of {validation_size} validation examples take "
                f"{calls} LLM calls, more than the limit of {self.limits.max_preset_calls}; "
                "set a smaller budget",
                param="budget",
                code="budget_too_large",
            )
        return evaluations

    def _bank_candidates(
        self,
        pool: str,
        snapshot: PoolSnapshot,
        subset: str | None,
        exclude: NDArray[np.int64] | None,
    ) -> NDArray[np.int64]:
        """Labeled ids the bank may take, ascending."""
        ids = snapshot.ids[snapshot.labeled_pos]
        if subset is not None:
            if self.subsets is None:
                raise NotFound(f"subset '{subset}' does not exist", param="subset")
            allowed = self.subsets.usable_ids(pool, subset, allow_stale=False)
            ids = ids[np.isin(ids, allowed)]
        if exclude is not None:
            ids = ids[~np.isin(ids, exclude)]
        return ids.astype(np.int64)

    def _forget(self, pool: str, name: str) -> None:
        self._cache.pop((pool, name), None)

    # ----------------------------------------------------------------------------- reads

    def _describe(self, row: Any, content_version: int, *, full: bool) -> dict[str, Any]:
        request = json.loads(row["request"])
        info = json.loads(row["info"]) if row["info"] else None
        counters = info or {}
        if info is not None and not full:
            info = {key: v for key, v in info.items() if key not in _ID_LISTS}
        ids = json.loads(row["ids"]) if row["ids"] else []
        out: dict[str, Any] = {
            "pool": row["pool"],
            "name": row["name"],
            "method": row["method"],
            "k": row["k"],
            "model": request.get("model"),
            "params": json.loads(row["params"]),
            "seed": row["seed"],
            "validation": _validation_summary(request),
            "budget": request.get("budget"),
            "subset": request.get("subset"),
            "bank_size": request.get("bank_size"),
            "max_tokens": request.get("max_tokens"),
            "concurrency": request.get("concurrency"),
            "template": request.get("template"),
            "instructions": len(request.get("instructions") or []),
            "status": row["status"],
            "job": row["job_id"],
            "score": row["score"],
            "instruction": row["instruction"],
            "calls": counters.get("calls"),
            "prompt_tokens": counters.get("prompt_tokens"),
            "completion_tokens": counters.get("completion_tokens"),
            "pool_version": row["pool_version"],
            "size": len(ids),
            "stale": row["status"] == "ready" and row["content_version"] != content_version,
            "timing": json.loads(row["timing"]) if row["timing"] else None,
            "info": info,
            "error": row["error"],
            "created_at": iso(row["created_at"]),
            "finished_at": iso(row["finished_at"]),
        }
        if full:
            out["ids"] = ids
            out["history"] = json.loads(row["history"]) if row["history"] else None
        return out

    def get(self, pool: str, name: str) -> dict[str, Any]:
        row, content = self._read(pool, name)
        return self._describe(row, content, full=True)

    def list_presets(self, pool: str) -> list[dict[str, Any]]:
        rows, content = self._read_all(pool)
        return [self._describe(r, content, full=False) for r in rows]

    def usable(self, pool: str, name: str, *, allow_stale: bool) -> UsablePreset:
        """The preset for serving; 409 while computing, failed, or stale."""
        row, content = self._read(pool, name)
        self._check_servable(row, content, allow_stale=allow_stale)
        key = (pool, name)
        finished = iso(row["finished_at"])
        cached = self._cache.get(key)
        if cached is None or cached[0] != finished:
            template = json.loads(row["request"]).get("template")
            usable = UsablePreset(
                ids=np.asarray(json.loads(row["ids"]), dtype=np.int64),
                k=int(row["k"]),
                instruction=row["instruction"],
                template=Template.model_validate(template) if template is not None else None,
            )
            cached = (finished, usable)
            self._cache[key] = cached
        return cached[1]

    # ------------------------------------------------------------------------------ jobs

    def run_job(self, job_id: str, should_stop: Callable[[], bool]) -> str:
        """Compute the preset of `job_id` (in a worker thread); returns the outcome."""
        claimed = self._claim(job_id)
        if claimed is None:
            return "cancelled"
        pool, name, row, content = claimed
        try:
            return self._compute(job_id, pool, name, row, content, should_stop)
        except Exception as exc:  # record every failure on the preset and its job
            if should_stop():
                # Shutting down: a call cut short is no verdict on the preset. The row stays
                # computing and the job running, and recover() reports both on restart.
                log.info("preset job %s stopped by shutdown", job_id)
                return "cancelled"
            if isinstance(exc, PresetCancelled | EvaluationCancelled):
                self._abandon(pool, name, job_id, "cancelled")
                return "cancelled"
            return self._fail(pool, name, job_id, exc)

    def _compute(
        self,
        job_id: str,
        pool: str,
        name: str,
        row: Any,
        content_version: int,
        should_stop: Callable[[], bool],
    ) -> str:
        store = self.store
        started = time.perf_counter()
        request = PresetCreate.model_validate(json.loads(row["request"]))
        params = validate_params(request.method, request.params)
        if self.upstream is None:
            raise InvalidRequest("presets need an upstream LLM and none is configured")
        self.upstream.route(request.model)  # the configuration may have changed since
        # The plan is made again on the version the job sees: the pool may have changed.
        plan = self._plan(pool, request)
        snapshot = plan.snapshot
        settings = store.settings_of(pool)
        classification = settings.task == "classification"
        validation = self._validation_rows(request, plan, classification=classification)

        t0 = time.perf_counter()
        bank_ids = plan.bank_candidates
        if bank_ids.shape[0] > request.bank_size:
            queries = self._embed([v.input for v in validation])
            pos = snapshot.positions(bank_ids)
            bank_ids = most_relevant(bank_ids, snapshot.vectors[pos], queries, request.bank_size)
        bank = store.examples_by_id(pool, snapshot.version, [int(i) for i in bank_ids])
        bank_texts = [demo_text(r.input, r.output or "") for r in bank]
        item_vectors = self._embed(bank_texts)
        validation_vectors = self._embed([demo_text(v.input, v.output) for v in validation])
        instructions = request.instructions or []
        instruction_vectors = self._embed(instructions) if instructions else None
        embed_seconds = time.perf_counter() - t0

        labels = sorted(
            {v.label for v in validation if v.label is not None}
            | {r.label for r in bank if r.label is not None}
        )
        metric: Metric = (
            "label" if classification and all(v.label is not None for v in validation) else "exact"
        )
        items = [
            ValidationItem(
                input=v.input,
                reference=(v.label or v.output) if metric == "label" else v.output,
            )
            for v in validation
        ]
        chosen: list[str | None] = list(instructions) if instructions else [None]
        templates = [preset_template(settings.template, request.template, t) for t in chosen]
        evaluator = ChatEvaluator(
            self.upstream,
            model=request.model,
            templates=templates,
            demos=[Demo(input=r.input, output=r.output or "", label=r.label) for r in bank],
            validation=items,
            metric=metric,
            labels=labels,
            max_tokens=request.max_tokens,
            seed=request.seed,
            concurrency=request.concurrency,
            should_stop=should_stop,
        )

        def report(done: int, total: int, best: float | None) -> None:
            result = {"best_score": _finite(best), "evaluations": done, "calls": evaluator.calls}
            if should_stop() or not store.progress(
                job_id, min(done, total), total=total, result=result
            ):
                raise PresetCancelled
            with store.db.write() as conn:
                conn.execute(
                    "UPDATE presets SET score=? WHERE pool=? AND name=? AND job_id=?",
                    (_finite(best), pool, name, job_id),
                )

        def embed_sequences(
            tuples: list[tuple[tuple[int, ...], int | None]],
        ) -> NDArray[np.float64]:
            texts = [
                ("" if i is None else f"Instruction: {instructions[i]}\n\n")
                + "\n\n".join(bank_texts[p] for p in positions)
                for positions, i in tuples
            ]
            return self._embed(texts)

        report(0, plan.evaluations, None)
        if params is None:
            result = random_search(
                len(bank),
                request.k,
                evaluator,
                plan.evaluations,
                seed=request.seed,
                n_instructions=len(instructions),
                progress=report,
            )
        else:
            result = ease_search(
                item_vectors,
                validation_vectors,
                request.k,
                evaluator,
                plan.evaluations,
                params=params,
                seed=request.seed,
                instruction_vectors=instruction_vectors,
                embed_sequences=embed_sequences if params.features == "text" else None,
                progress=report,
            )
        seconds = time.perf_counter() - started
        return self._store_result(
            job_id,
            pool,
            name,
            request,
            params,
            result,
            bank_ids=[r.id for r in bank],
            evaluator=evaluator,
            plan=plan,
            validation=validation,
            snapshot_version=snapshot.version,
            content_version=content_version,
            timing={
                "seconds": round(seconds, 3),
                "embed_seconds": round(embed_seconds, 3),
                "llm_seconds": round(evaluator.seconds, 3),
                "search_cpu_seconds": round(sum(result.cpu_seconds), 3),
                "pool_size": snapshot.size,
            },
        )

    def _validation_rows(
        self, request: PresetCreate, plan: _Plan, *, classification: bool
    ) -> list[_ValidationRow]:
        validation = request.validation
        if isinstance(validation, ValidationInline):
            return [
                _ValidationRow(
                    id=None,
                    input=e.input,
                    output=e.output,
                    label=e.label if e.label is not None or not classification else e.output,
                )
                for e in validation.examples
            ]
        assert plan.validation_ids is not None and plan.validation_snapshot is not None
        rows = self.store.examples_by_id(
            validation.pool,
            plan.validation_snapshot.version,
            [int(i) for i in plan.validation_ids],
        )
        return [
            _ValidationRow(id=r.id, input=r.input, output=r.output or "", label=r.label)
            for r in rows
        ]

    def _embed(self, texts: Sequence[str]) -> NDArray[np.float64]:
        parts = [
            np.asarray(self.embedder.embed(list(texts[start : start + self.batch_size])))
            for start in range(0, len(texts), self.batch_size)
        ]
        if not parts:
            return np.empty((0, self.embedder.dim), dtype=np.float64)
        return _unit(np.concatenate(parts))

    def _store_result(
        self,
        job_id: str,
        pool: str,
        name: str,
        request: PresetCreate,
        params: EaseParams | None,
        result: SearchResult,
        *,
        bank_ids: list[int],
        evaluator: ChatEvaluator,
        plan: _Plan,
        validation: list[_ValidationRow],
        snapshot_version: int,
        content_version: int,
        timing: dict[str, Any],
    ) -> str:
        best = result.best
        ids = [bank_ids[p] for p in best.positions]
        instructions = request.instructions or []
        instruction = instructions[best.instruction] if best.instruction is not None else None
        cpu = result.cpu_seconds
        info: dict[str, Any] = {
            **evaluator.info(),
            "evaluations": len(result.trials),
            "evaluations_planned": plan.evaluations,
            "stopped_early": result.stopped_early,
            "exhausted": result.exhausted,
            "ot_solves": result.ot_solves,
            "validation_size": len(validation),
            "validation_ids": [v.id for v in validation] if validation[0].id is not None else None,
            "bank_size": len(bank_ids),
            "bank_candidates": int(plan.bank_candidates.shape[0]),
            "bank_ids": bank_ids,
            "labels": evaluator.labels if evaluator.metric == "label" else None,
            "instructions": len(instructions),
            "instruction_index": best.instruction,
            "features": params.features if params is not None else None,
            "cpu_seconds_per_round": {
                "rounds": len(cpu),
                "mean": round(sum(cpu) / len(cpu), 4) if cpu else None,
                "max": round(max(cpu), 4) if cpu else None,
            },
        }
        score = float(best.score)
        with self.store.db.write() as conn:
            cur = conn.execute(
                "UPDATE presets SET status='ready', ids=?, instruction=?, score=?, history=?, "
                "info=?, timing=?, pool_version=?, content_version=?, finished_at=?, error=NULL "
                "WHERE pool=? AND name=? AND job_id=?",
                (
                    json.dumps(ids),
                    instruction,
                    score,
                    json.dumps(result.history(bank_ids)),
                    json.dumps(info),
                    json.dumps(timing),
                    snapshot_version,
                    content_version,
                    time.time(),
                    pool,
                    name,
                    job_id,
                ),
            )
            if cur.rowcount != 1:
                return "cancelled"
            conn.execute(
                "UPDATE jobs SET status='succeeded', done=?, finished_at=?, result=? "
                "WHERE id=? AND status='running'",
                (
                    len(result.trials),
                    time.time(),
                    json.dumps(
                        {
                            "preset": name,
                            "score": score,
                            "best_score": score,
                            "evaluations": len(result.trials),
                            "calls": evaluator.calls,
                        }
                    ),
                    job_id,
                ),
            )
        self._cache.pop((pool, name), None)
        log.info(
            "preset %s/%s (%s, k=%d) scored %.3f after %d evaluations, %d calls, in %.1fs",
            pool,
            name,
            request.method,
            request.k,
            score,
            len(result.trials),
            evaluator.calls,
            timing["seconds"],
        )
        return "succeeded"
