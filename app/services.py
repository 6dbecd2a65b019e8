"""Everything a request needs, opened once in the app's lifespan and closed at shutdown."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import anyio

from app.jobs import Worker, upload_handler
from app.llm.client import UpstreamClient
from app.llm.embeddings import OpenAIEmbedder
from app.metrics import Metrics
from app.pipeline import Pipeline
from app.presets import PresetStore
from app.settings import PACKAGED_MODEL_NAME, EmbeddingSettings, Settings
from app.store import PoolStore
from app.subsets import SubsetStore
from retrievers.base import Embedder
from retrievers.batching import BatchingEmbedder
from retrievers.cache import CachedEmbedder
from retrievers.hashing import HashingEmbedder
from retrievers.onnx_embedder import OnnxEmbedder, UnsupportedModel, default_cache_dir, model_layout
from retrievers.sentence_transformer import SentenceTransformerEmbedder

log = logging.getLogger("iclserve")


def open_embedder(config: EmbeddingSettings, *, onnx_cache_dir: Path | None = None) -> Embedder:
    """Build and load the configured embedder (blocking: loads model weights).

    `onnx_cache_dir` overrides where exported ONNX graphs are kept (tests share one).
    """
    if config.kind == "hash":
        return HashingEmbedder(dim=config.dim)
    if config.kind == "openai":
        if not config.base_url or not config.model:
            raise ValueError(
                "embedding kind 'openai' needs ICLSERVE_EMBEDDING__BASE_URL and __MODEL"
            )
        remote = OpenAIEmbedder(
            base_url=config.base_url,
            model=config.model,
            api_key=config.api_key.get_secret_value() if config.api_key else None,
            timeout=config.timeout,
            batch_size=config.batch_size,
        )
        remote.open()
        return remote
    local = _local_embedder(config, cache_dir=onnx_cache_dir)
    local.open()
    # The first forward pass pays one-off setup (allocations, kernel choice); do it here,
    # not in a request.
    local.embed(["warm-up"])
    log.info(
        "embedder %s loaded (dim %d, %s)",
        local.name or PACKAGED_MODEL_NAME,
        local.dim,
        type(local).__name__,
    )
    return local


def _local_embedder(
    config: EmbeddingSettings, *, cache_dir: Path | None
) -> OnnxEmbedder | SentenceTransformerEmbedder:
    """ONNX Runtime on CPU when the model allows it (backend auto/onnx), else PyTorch."""
    torch_model = SentenceTransformerEmbedder(
        model=config.model, device=config.device, batch_size=config.batch_size
    )
    if config.backend == "torch" or (config.backend == "auto" and config.device != "cpu"):
        return torch_model
    onnx_model = OnnxEmbedder(
        model=config.model,
        batch_size=config.batch_size,
        threads=config.threads,
        pin_threads=config.pin_threads,
        lone_query_session=config.lone_query_session,
        cache_dir=cache_dir or config.onnx_cache_dir or default_cache_dir(),
    )
    if config.backend == "onnx":
        return onnx_model
    try:
        if config.model is not None:
            model_layout(Path(config.model))
        import onnxruntime  # noqa: F401
    except (UnsupportedModel, ImportError) as exc:
        log.info("embedding with PyTorch: %s", exc)
        return torch_model
    return onnx_model


@dataclass
class Services:
    settings: Settings
    store: PoolStore
    embedder: Embedder
    query_embedder: CachedEmbedder
    pipeline: Pipeline
    upstream: UpstreamClient
    subsets: SubsetStore
    presets: PresetStore
    uploads: Worker
    computations: Worker
    preset_jobs: Worker
    metrics: Metrics

    @classmethod
    async def open(cls, settings: Settings, *, embedder: Embedder | None = None) -> Services:
        metrics = Metrics()
        store = await anyio.to_thread.run_sync(
            lambda: PoolStore(
                settings.data_dir, max_pools=settings.limits.max_pools, index=settings.index
            )
        )
        resume = await anyio.to_thread.run_sync(store.recover)
        loaded = await anyio.to_thread.run_sync(store.load_snapshots)
        if loaded:
            log.info("loaded %d published pool(s)", loaded)
        if embedder is None:
            embedder = await anyio.to_thread.run_sync(open_embedder, settings.embedding)
        query_embedder = CachedEmbedder(
            BatchingEmbedder(embedder, settings.embedding.max_query_batch),
            settings.embedding.cache_size,
        )
        metrics.bind(store, query_embedder)
        pipeline = Pipeline(
            store,
            query_embedder,
            settings.limits,
            settings.default_k,
            observe_stage=metrics.observe_stage,
            # A remote embedder waits on the network, which must never hold the event loop.
            requests_in_flight=(
                None if settings.embedding.kind == "openai" else lambda: metrics.requests_in_flight
            ),
        )
        upstream = UpstreamClient(settings.upstreams, on_result=metrics.observe_upstream)
        metrics.bind_upstream(upstream)
        subsets = SubsetStore(
            store, max_budget=settings.limits.max_subset_budget, upstream=upstream
        )
        pipeline.subsets = subsets
        presets = PresetStore(
            store,
            embedder=embedder,
            upstream=upstream,
            subsets=subsets,
            limits=settings.limits,
            batch_size=settings.embedding.batch_size,
        )
        pipeline.presets = presets
        uploads = Worker(
            "upload",
            upload_handler(store, embedder, batch_size=settings.embedding.batch_size),
            workers=settings.upload_workers,
            on_finished=metrics.observe_job,
        )
        computations = Worker("subset", subsets.run_job, on_finished=metrics.observe_job)
        # Own queue: a preset job waits on the LLM for minutes and must not hold up subsets.
        preset_jobs = Worker("preset", presets.run_job, on_finished=metrics.observe_job)
        uploads.start(resume)
        computations.start([])
        preset_jobs.start([])
        if resume:
            log.info("resuming %d interrupted upload job(s)", len(resume))
        return cls(
            settings=settings,
            store=store,
            embedder=embedder,
            query_embedder=query_embedder,
            pipeline=pipeline,
            upstream=upstream,
            subsets=subsets,
            presets=presets,
            uploads=uploads,
            computations=computations,
            preset_jobs=preset_jobs,
            metrics=metrics,
        )

    async def aclose(self) -> None:
        await self.uploads.stop()
        await self.computations.stop()
        await self.preset_jobs.stop()
        await self.upstream.aclose()
        self.store.close()
