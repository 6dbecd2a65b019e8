"""Pool-level subsets: vote-k, IDEAL, MFL, diversity and random selections, run as jobs.

A subset is an ordered list of example ids chosen from a published pool version (labeled or
not: choosing what to annotate is the point). It is computed once by a job and stored; a
request never computes one. It is *stale* once the pool's members or vectors changed since
(an upload, append or replace, published after it); labeling by PATCH does not make it stale,
because annotating the chosen examples is the next step of the workflow.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.errors import Conflict, InvalidRequest, NotFound
from app.llm.client import UpstreamClient
from app.llm.confidence import ChatConfidence
from app.named import NamedRows
from app.snapshot import PoolSnapshot
from app.store import PoolStore, iso, new_job_id
from selection.baselines import (
    DiversityParams,
    MflParams,
    RandomParams,
    diversity_subset,
    mfl_subset,
    random_subset,
)
from selection.fixed import SET_NAME_PATTERN
from selection.graph import KnnGraph, build_knn_graph, center_normalize
from selection.ideal import IdealParams, ideal_greedy
from selection.votek import (
    ConfidenceFn,
    TwoStageParams,
    VoteKParams,
    fast_votek,
    two_stage_votek,
)

log = logging.getLogger("iclserve.subsets")

SubsetMethod = Literal["votek", "votek_two_stage", "ideal", "mfl", "diversity", "random"]
Progress = Callable[[int, int], bool]


class SubsetCancelled(Exception):
    """Raised from a progress callback to stop a job that was cancelled or is shutting down."""


class SubsetCreate(BaseModel):
    """The body of `POST /v1/pools/{pool}/subsets`."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=SET_NAME_PATTERN, description="Name of the subset in its pool.")
    method: SubsetMethod = Field(description="Pool-level selection algorithm (ALGORITHMS.md 2).")
    budget: int = Field(ge=1, description="How many examples to choose (M).")
    params: dict[str, Any] = Field(
        default_factory=dict, description="Method parameters; see the method's documentation."
    )
    seed: int = Field(
        0, ge=0, le=2**63 - 1, description="Seed of every random draw the method makes."
    )


class TwoStageVoteKParams(TwoStageParams):
    """Two-stage vote-k (ALGORITHMS.md 2.5) scored by an upstream chat model.

    The stage-1 picks become the demonstrations of every confidence prompt, so they must be
    labeled: the job fails naming the unlabeled ones (label them with PATCH and resubmit;
    the picks do not change under the same seed). One call per scored item (plus a probe).
    """

    model: str = Field(
        min_length=1,
        max_length=200,
        description="Upstream model that scores the confidence prompts (must be routable).",
    )
    concurrency: int = Field(4, ge=1, le=64, description="Scoring calls in flight at most.")


PARAMS: dict[str, type[BaseModel]] = {
    "votek": VoteKParams,
    "votek_two_stage": TwoStageVoteKParams,
    "ideal": IdealParams,
    "mfl": MflParams,
    "diversity": DiversityParams,
    "random": RandomParams,
}


def validate_params(method: str, params: dict[str, Any]) -> BaseModel:
    try:
        return PARAMS[method].model_validate(params)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in ("params", *first["loc"]))
        raise InvalidRequest(f"{loc}: {first['msg']}", param=loc) from exc


@dataclass(frozen=True, slots=True)
class Fitted:
    positions: list[int]
    info: dict[str, Any]


def _graph(
    X: NDArray[np.float32], k: int, exact_max_n: int, seed: int, progress: Progress
) -> KnnGraph:
    n = X.shape[0]
    return build_knn_graph(
        X, k, exact_max_n=exact_max_n, seed=seed, progress=lambda done, _: progress(done, n)
    )


def _graph_info(graph: KnnGraph, seconds: float) -> dict[str, Any]:
    return {
        "graph": {
            "k": graph.k,
            "exact": graph.exact,
            "recall": graph.recall,
            "seconds": round(seconds, 3),
        }
    }


def fit_subset(
    vectors: NDArray[np.float32],
    method: str,
    budget: int,
    params: BaseModel,
    seed: int,
    progress: Progress,
    *,
    confidence: ConfidenceFn | None = None,
) -> Fitted:
    """Run one pool-level method over the pool's vectors (rows in pool order).

    Two-stage vote-k needs `confidence` (positions in, HIGHER = MORE confident out); its
    `info` has `stage1` (how many of the first positions are stage-1 picks), `sample_size`
    and `bucket_width`.
    """
    n = int(vectors.shape[0])
    budget = min(budget, n)
    rng = np.random.default_rng(seed)
    if isinstance(params, RandomParams):
        return Fitted(random_subset(n, budget, seed=seed), {})
    X, _ = center_normalize(np.asarray(vectors, dtype=np.float32))
    if isinstance(params, DiversityParams):
        return Fitted(diversity_subset(X, budget, rng=rng), {})
    started = time.perf_counter()
    if isinstance(params, MflParams):
        mode = params.resolve_mode(n)
        graph = (
            _graph(X, params.k, params.graph_exact_max_n, seed, progress)
            if mode == "sparse"
            else None
        )
        info = _graph_info(graph, time.perf_counter() - started) if graph is not None else {}
        info["mode"] = mode
        return Fitted(mfl_subset(X, budget, mode=mode, graph=graph), info)
    if isinstance(params, TwoStageParams):
        if confidence is None:
            raise InvalidRequest("two-stage vote-k needs an LLM confidence function")
        graph = _graph(X, params.k, params.graph_exact_max_n, seed, progress)
        info = _graph_info(graph, time.perf_counter() - started)
        two = two_stage_votek(
            graph,
            budget,
            confidence=confidence,
            stage1=params.stage1,
            rho=params.rho,
            coverage=params.coverage,
            sample_size=params.sample_size,
            reference_compat=params.reference_compat,
            rng=rng,
        )
        info.update(
            random_fill=two.random_fill,
            stage1=two.stage1,
            sample_size=two.sample_size,
            bucket_width=two.bucket_width,
            exact_tie_checks=two.exact_tie_checks,
        )
        return Fitted(list(two.picks), info)
    if isinstance(params, VoteKParams):
        graph = _graph(X, params.k, params.graph_exact_max_n, seed, progress)
        info = _graph_info(graph, time.perf_counter() - started)
        result = fast_votek(
            graph, budget, rho=params.rho, reference_compat=params.reference_compat, rng=rng
        )
        info["random_fill"] = result.random_fill
        return Fitted(list(result.picks), info)
    if isinstance(params, IdealParams):
        graph = _graph(X, params.k, params.graph_exact_max_n, seed, progress)
        info = _graph_info(graph, time.perf_counter() - started)
        ideal = ideal_greedy(
            graph,
            budget,
            rounds=params.rounds,
            first_seed=params.first_seed,
            ic_variant=params.ic_variant,
            method=params.method,
            rng=rng,
        )
        info["spread"] = ideal.spread[-1] if ideal.spread else 0.0
        info["evaluations"] = ideal.evaluations
        return Fitted(list(ideal.picks), info)
    raise InvalidRequest(f"unknown subset method {method!r}")


class SubsetStore(NamedRows):
    """Subset rows in the pool store's SQLite file, and the subset jobs that fill them."""

    table = "subsets"
    noun = "subset"

    def __init__(
        self, store: PoolStore, *, max_budget: int, upstream: UpstreamClient | None = None
    ) -> None:
        self.store = store
        self.max_budget = max_budget
        self.upstream = upstream
        """The app's upstream client: two-stage vote-k scores with it (None: unavailable)."""
        self._ids_cache: dict[tuple[str, str], tuple[str | None, NDArray[np.int64]]] = {}

    # ---------------------------------------------------------------------------- writes

    def create(self, pool: str, request: SubsetCreate) -> dict[str, Any]:
        params = validate_params(request.method, request.params)
        if isinstance(params, TwoStageVoteKParams):
            self._check_model(params.model)
        if request.budget > self.max_budget:
            raise InvalidRequest(
                f"budget {request.budget} is more than the limit of {self.max_budget}",
                param="budget",
            )
        job_id = new_job_id()
        now = time.time()
        db = self.store.db
        with db.write() as conn:
            prow = conn.execute(
                "SELECT active_version FROM pools WHERE name = ?", (pool,)
            ).fetchone()
            if prow is None:
                raise NotFound(f"pool '{pool}' does not exist", param="pool", code="pool_not_found")
            if not prow["active_version"]:
                raise Conflict(f"pool '{pool}' has no published version yet", code="pool_not_ready")
            current = conn.execute(
                "SELECT status, job_id FROM subsets WHERE pool = ? AND name = ?",
                (pool, request.name),
            ).fetchone()
            if current is not None and current["status"] == "computing":
                raise Conflict(
                    f"subset '{request.name}' is being computed by job {current['job_id']}",
                    code="subset_computing",
                )
            dumped = params.model_dump(mode="json")
            conn.execute(
                "INSERT OR REPLACE INTO subsets (pool, name, method, budget, params, seed, status, "
                "job_id, created_at) VALUES (?, ?, ?, ?, ?, ?, 'computing', ?, ?)",
                (
                    pool,
                    request.name,
                    request.method,
                    request.budget,
                    json.dumps(dumped),
                    request.seed,
                    job_id,
                    now,
                ),
            )
            conn.execute(
                "INSERT INTO jobs (id, kind, pool, status, total, params, created_at) "
                "VALUES (?, 'subset', ?, 'queued', 0, ?, ?)",
                (
                    job_id,
                    pool,
                    json.dumps(
                        {"subset": request.name, "method": request.method, "budget": request.budget}
                    ),
                    now,
                ),
            )
        self._ids_cache.pop((pool, request.name), None)
        return self.get(pool, request.name)

    def _check_model(self, model: str) -> None:
        if self.upstream is None:
            raise InvalidRequest(
                "votek_two_stage needs an upstream LLM and none is configured",
                param="params.model",
            )
        try:
            self.upstream.route(model)
        except InvalidRequest as exc:
            raise InvalidRequest(exc.message, param="params.model", code=exc.code) from exc

    def _forget(self, pool: str, name: str) -> None:
        self._ids_cache.pop((pool, name), None)

    # ----------------------------------------------------------------------------- reads

    def _describe(self, row: Any, content_version: int, *, with_ids: bool) -> dict[str, Any]:
        ids = json.loads(row["ids"]) if row["ids"] else []
        out: dict[str, Any] = {
            "pool": row["pool"],
            "name": row["name"],
            "method": row["method"],
            "budget": row["budget"],
            "params": json.loads(row["params"]),
            "seed": row["seed"],
            "status": row["status"],
            "job": row["job_id"],
            "pool_version": row["pool_version"],
            "size": len(ids),
            "stale": row["status"] == "ready" and row["content_version"] != content_version,
            "timing": json.loads(row["timing"]) if row["timing"] else None,
            "info": json.loads(row["info"]) if row["info"] else None,
            "error": row["error"],
            "created_at": iso(row["created_at"]),
            "finished_at": iso(row["finished_at"]),
        }
        if with_ids:
            out["ids"] = ids
        return out

    def get(self, pool: str, name: str) -> dict[str, Any]:
        row, content = self._read(pool, name)
        return self._describe(row, content, with_ids=True)

    def list(self, pool: str) -> list[dict[str, Any]]:
        rows, content = self._read_all(pool)
        return [self._describe(r, content, with_ids=False) for r in rows]

    def usable_ids(self, pool: str, name: str, *, allow_stale: bool) -> NDArray[np.int64]:
        """The subset's ids in order, for serving; 409 while computing, failed or stale."""
        row, content = self._read(pool, name)
        self._check_servable(row, content, allow_stale=allow_stale)
        key = (pool, name)
        finished = iso(row["finished_at"])
        cached = self._ids_cache.get(key)
        if cached is None or cached[0] != finished:
            cached = (finished, np.asarray(json.loads(row["ids"]), dtype=np.int64))
            self._ids_cache[key] = cached
        return cached[1]

    # ------------------------------------------------------------------------------ jobs

    def run_job(self, job_id: str, should_stop: Callable[[], bool]) -> str:
        """Compute the subset of `job_id` (in a worker thread); returns the outcome."""
        store = self.store
        claimed = self._claim(job_id)
        if claimed is None:
            return "cancelled"
        pool, name, row, content = claimed
        try:
            snapshot = store.snapshot(pool)
            if snapshot is None:
                raise Conflict(f"pool '{pool}' has no published version")
            params = validate_params(row["method"], json.loads(row["params"]))
            n = snapshot.size

            def progress(done: int, total: int) -> bool:
                if should_stop() or not store.progress(job_id, min(done, total), total=total):
                    raise SubsetCancelled
                return True

            started = time.perf_counter()
            scorer = (
                self._scorer(pool, snapshot, params, row["seed"], progress)
                if isinstance(params, TwoStageVoteKParams)
                else None
            )
            fitted = fit_subset(
                np.asarray(snapshot.vectors),
                row["method"],
                row["budget"],
                params,
                row["seed"],
                progress,
                confidence=scorer,
            )
            seconds = time.perf_counter() - started
            ids = [int(snapshot.ids[p]) for p in fitted.positions]
            if scorer is not None:
                fitted.info["stage1_ids"] = ids[: int(fitted.info.get("stage1", 0))]
                fitted.info["confidence"] = scorer.info()
                for key in ("rung", "calls", "prompt_tokens", "completion_tokens"):
                    fitted.info[key] = fitted.info["confidence"][key]
            with store.db.write() as conn:
                cur = conn.execute(
                    "UPDATE subsets SET status='ready', ids=?, pool_version=?, content_version=?, "
                    "timing=?, info=?, finished_at=?, error=NULL "
                    "WHERE pool=? AND name=? AND job_id=?",
                    (
                        json.dumps(ids),
                        snapshot.version,
                        content,
                        json.dumps({"seconds": round(seconds, 3), "pool_size": n}),
                        json.dumps(fitted.info),
                        time.time(),
                        pool,
                        name,
                        job_id,
                    ),
                )
                if cur.rowcount != 1:
                    return "cancelled"
                conn.execute(
                    "UPDATE jobs SET status='succeeded', done=total, finished_at=?, result=? "
                    "WHERE id=? AND status='running'",
                    (time.time(), json.dumps({"subset": name, "size": len(ids)}), job_id),
                )
            self._ids_cache.pop((pool, name), None)
            log.info(
                "subset %s/%s (%s, %d of %d) in %.1fs",
                pool,
                name,
                row["method"],
                len(ids),
                n,
                seconds,
            )
            return "succeeded"
        except SubsetCancelled:
            self._abandon(pool, name, job_id, "cancelled")
            return "cancelled"
        except Exception as exc:  # record every failure on the subset and its job
            return self._fail(pool, name, job_id, exc)

    def _scorer(
        self,
        pool: str,
        snapshot: PoolSnapshot,
        params: TwoStageVoteKParams,
        seed: int,
        progress: Progress,
    ) -> ChatConfidence:
        """The LLM confidence of a two-stage vote-k job, over the job's snapshot."""
        if self.upstream is None:
            raise InvalidRequest("votek_two_stage needs an upstream LLM and none is configured")
        self.upstream.route(params.model)  # the configuration may have changed since
        settings = self.store.settings_of(pool)
        store, version, ids = self.store, snapshot.version, snapshot.ids
        return ChatConfidence(
            self.upstream,
            model=params.model,
            template=settings.template,
            vectors=snapshot.vectors,
            examples=lambda positions: store.examples_by_id(
                pool, version, [int(ids[p]) for p in positions]
            ),
            labels=snapshot.label_names if settings.task == "classification" else (),
            max_total_tokens=params.max_total_tokens,
            max_example_tokens=params.max_example_tokens,
            concurrency=params.concurrency,
            seed=seed,
            progress=progress,
        )
