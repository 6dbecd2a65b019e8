"""Where a selection embeds its query: on the event loop when the request found the server
idle and is still alone, else on a worker thread (with micro-batching). Checked through the
real request middleware."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from numpy.typing import NDArray

from app.main import create_app
from app.metrics import Metrics
from app.pipeline import INLINE_AFTER_IDLE_S, INLINE_QUERY_CHARS, Pipeline
from app.settings import EmbeddingSettings, Settings
from retrievers.hashing import HashingEmbedder
from tests.conftest import make_settings, upload
from tests.datasets import topic_rows
from tests.fakes.upstream import FakeUpstream


class LoopRecordingEmbedder:
    """A hashing embedder that records, for each text, whether it was embedded on a thread
    that runs an event loop."""

    def __init__(self) -> None:
        self.inner = HashingEmbedder(dim=64)
        self.name = self.inner.name
        self.dim = self.inner.dim
        self.on_loop: dict[str, bool] = {}

    def embed(self, texts: Sequence[str]) -> NDArray[np.float32]:
        try:
            asyncio.get_running_loop()
            on_loop = True
        except RuntimeError:
            on_loop = False
        for text in texts:
            self.on_loop[text] = on_loop
        return self.inner.embed(texts)


@pytest.fixture
def embedder() -> LoopRecordingEmbedder:
    return LoopRecordingEmbedder()


@pytest.fixture
def recording_client(settings: Settings, embedder: LoopRecordingEmbedder) -> Iterator[TestClient]:
    with TestClient(create_app(settings, embedder=embedder)) as client:
        upload(client, "p", topic_rows(60))
        yield client


def select(client: TestClient, query: str, *, after_idle: float = 0.01) -> None:
    time.sleep(after_idle)  # the server idle for a moment, as between a lone client's calls
    response = client.post("/v1/pools/p/select", json={"query": query, "k": 3})
    assert response.status_code == 200, response.text


def test_a_lone_request_embeds_on_the_event_loop(
    recording_client: TestClient, embedder: LoopRecordingEmbedder
) -> None:
    select(recording_client, "the striker scored in the final")
    assert embedder.on_loop["the striker scored in the final"] is True


def test_a_long_query_goes_to_a_worker_thread(
    recording_client: TestClient, embedder: LoopRecordingEmbedder
) -> None:
    short = "word " * (INLINE_QUERY_CHARS // 5)
    long = short + "more"
    assert len(short) == INLINE_QUERY_CHARS
    select(recording_client, short)
    select(recording_client, long)
    assert embedder.on_loop[short] is True
    assert embedder.on_loop[long] is False


def test_a_request_with_company_goes_to_a_worker_thread(
    recording_client: TestClient, embedder: LoopRecordingEmbedder, upstream: FakeUpstream
) -> None:
    # A chat call held at the upstream keeps a second request in flight.
    upstream.set_fault("stall_before_headers", seconds=3.0, times=1)
    seen = len(upstream.requests)
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "hello"}]}
    background = threading.Thread(
        target=lambda: recording_client.post("/v1/chat/completions", json=body), daemon=True
    )
    background.start()
    deadline = time.monotonic() + 10
    while len(upstream.requests) == seen:
        assert time.monotonic() < deadline, "the chat call never reached the upstream"
        time.sleep(0.01)
    select(recording_client, "the central bank raised rates")
    background.join(timeout=10)
    assert not background.is_alive()
    assert embedder.on_loop["the central bank raised rates"] is False
    # Alone again once the chat call has been answered.
    select(recording_client, "the chef roasted garlic")
    assert embedder.on_loop["the chef roasted garlic"] is True


def test_requests_in_flight_gauge(recording_client: TestClient) -> None:
    text = recording_client.get("/metrics").text
    # The scrape itself is the only request being served.
    assert "iclserve_requests_in_flight 1.0" in text.splitlines()


def test_a_remote_embedder_never_embeds_on_the_event_loop(
    tmp_path: Path, upstream: FakeUpstream, embedder: LoopRecordingEmbedder
) -> None:
    # Configured as remote (the recording embedder stands in for it): its calls wait on the
    # network, so even a lone request must not make them on the event loop.
    remote = EmbeddingSettings(kind="openai", base_url=upstream.base_url, model="fake-embed")
    settings = make_settings(tmp_path / "data", upstream, embedding=remote)
    with TestClient(create_app(settings, embedder=embedder)) as client:
        upload(client, "p", topic_rows(20))
        select(client, "the striker scored in the final")
    assert embedder.on_loop["the striker scored in the final"] is False


def test_idle_time_is_counted_from_the_last_answer() -> None:
    clock = [100.0]
    metrics = Metrics(clock=lambda: clock[0])
    clock[0] = 100.5
    assert metrics.request_started() == pytest.approx(0.5)
    clock[0] = 100.6
    assert metrics.request_started() == 0.0  # the first one is still being served
    metrics.request_answered()
    clock[0] = 100.7
    metrics.request_answered()
    clock[0] = 100.7004
    assert metrics.request_started() == pytest.approx(0.0004)
    assert metrics.requests_in_flight == 1


def test_a_request_read_just_after_another_was_answered_goes_to_a_worker_thread(
    settings: Settings,
) -> None:
    # Under load the next request is read as soon as the previous one is answered, while
    # the others still wait unread in the kernel: it looks alone, but the server was not idle.
    alone = Pipeline(
        None,  # type: ignore[arg-type]  # the decision reads neither the store nor the pool
        HashingEmbedder(dim=64),
        settings.limits,
        default_k=3,
        requests_in_flight=lambda: 1,
    )
    assert alone._runs_inline("a query", idle_before_s=INLINE_AFTER_IDLE_S) is True
    assert alone._runs_inline("a query", idle_before_s=INLINE_AFTER_IDLE_S / 2) is False
