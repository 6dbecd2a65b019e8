"""Where a selection embeds its query: on the event loop, through the embedder's lone path,
when the request is the only one in flight, else on a worker thread (with micro-batching).
Checked through the real request middleware, and with requests waiting in the kernel on a
real uvicorn server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import uvicorn
from fastapi.testclient import TestClient
from numpy.typing import NDArray

from app.main import create_app
from app.pipeline import INLINE_QUERY_CHARS
from app.settings import EmbeddingSettings, Settings
from retrievers.hashing import HashingEmbedder
from tests.conftest import make_settings, upload
from tests.datasets import topic_rows
from tests.fakes.upstream import FakeUpstream


class LoopRecordingEmbedder:
    """A hashing embedder that records, for each text, whether it was embedded on a thread
    that runs an event loop, and whether through `embed_alone`."""

    def __init__(self) -> None:
        self.inner = HashingEmbedder(dim=64)
        self.name = self.inner.name
        self.dim = self.inner.dim
        self.on_loop: dict[str, bool] = {}
        self.alone: dict[str, bool] = {}

    def embed(self, texts: Sequence[str]) -> NDArray[np.float32]:
        return self._embed(texts, alone=False)

    def embed_alone(self, text: str) -> NDArray[np.float32]:
        return self._embed([text], alone=True)[0]

    def _embed(self, texts: Sequence[str], *, alone: bool) -> NDArray[np.float32]:
        try:
            asyncio.get_running_loop()
            on_loop = True
        except RuntimeError:
            on_loop = False
        for text in texts:
            self.on_loop[text] = on_loop
            self.alone[text] = alone
        return self.inner.embed(texts)


@pytest.fixture
def embedder() -> LoopRecordingEmbedder:
    return LoopRecordingEmbedder()


@pytest.fixture
def recording_client(settings: Settings, embedder: LoopRecordingEmbedder) -> Iterator[TestClient]:
    with TestClient(create_app(settings, embedder=embedder)) as client:
        upload(client, "p", topic_rows(60))
        yield client


def select(client: TestClient, query: str) -> None:
    response = client.post("/v1/pools/p/select", json={"query": query, "k": 3})
    assert response.status_code == 200, response.text


def test_a_lone_request_embeds_on_the_event_loop(
    recording_client: TestClient, embedder: LoopRecordingEmbedder
) -> None:
    select(recording_client, "the striker scored in the final")
    assert embedder.on_loop["the striker scored in the final"] is True
    assert embedder.alone["the striker scored in the final"] is True


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
    assert (embedder.alone[short], embedder.alone[long]) == (True, False)


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
    assert embedder.alone["the central bank raised rates"] is False
    # Alone again once the chat call has been answered.
    select(recording_client, "the chef roasted garlic")
    assert embedder.on_loop["the chef roasted garlic"] is True
    assert embedder.alone["the chef roasted garlic"] is True


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
    assert embedder.alone["the striker scored in the final"] is False


HOLD = "hold the event loop here"


class HoldingEmbedder(LoopRecordingEmbedder):
    """Embedding HOLD blocks its thread (the event loop's, for a lone request) until released."""

    def __init__(self) -> None:
        super().__init__()
        self.holding = threading.Event()
        self.release = threading.Event()

    def _embed(self, texts: Sequence[str], *, alone: bool) -> NDArray[np.float32]:
        if HOLD in texts:
            self.holding.set()
            self.release.wait(timeout=10)
        return super()._embed(texts, alone=alone)


@contextmanager
def served(app: object, loop: str) -> Iterator[tuple[str, int]]:
    """`app` served by uvicorn on 127.0.0.1 in a thread of this process."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,  # type: ignore[arg-type]
        loop=loop,
        lifespan="on",
        access_log=False,
        log_config=None,
        log_level=None,
        timeout_graceful_shutdown=1,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield "127.0.0.1", port
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def post_select(conn: http.client.HTTPConnection, query: str) -> None:
    body = json.dumps({"query": query, "k": 3})
    conn.request("POST", "/v1/pools/p/select", body, {"Content-Type": "application/json"})


def answered(conn: http.client.HTTPConnection) -> int:
    response = conn.getresponse()
    response.read()
    return response.status


def select_over(conn: http.client.HTTPConnection, query: str) -> None:
    post_select(conn, query)
    assert answered(conn) == 200


@pytest.fixture
def holding() -> HoldingEmbedder:
    return HoldingEmbedder()


@pytest.fixture
def seeded(settings: Settings, holding: HoldingEmbedder) -> Settings:
    with TestClient(create_app(settings, embedder=holding)) as client:
        upload(client, "p", topic_rows(60))
    return settings


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_requests_that_waited_together_in_the_kernel_all_go_to_worker_threads(
    seeded: Settings, holding: HoldingEmbedder, loop: str
) -> None:
    # Under load, requests arrive while the loop is busy and are read together. The first one
    # started looks alone until the others have started too; embedding it on the loop would
    # keep them waiting, and then each of them would look alone in turn.
    queries = [f"the waiting request number {i}" for i in range(6)]
    with served(create_app(seeded, embedder=holding), loop) as (host, port):
        conns = [http.client.HTTPConnection(host, port, timeout=30) for _ in queries]
        for i, conn in enumerate(conns):  # keep-alive connections, already accepted
            select_over(conn, f"warm-up {i}")
        holder = http.client.HTTPConnection(host, port, timeout=30)
        post_select(holder, HOLD)
        assert holding.holding.wait(timeout=10)
        assert holding.on_loop.get(HOLD) is None  # still inside the embedding
        for conn, query in zip(conns, queries, strict=True):
            post_select(conn, query)
        time.sleep(0.2)  # all six are in the server's socket buffers, unread
        holding.release.set()
        assert answered(holder) == 200
        assert [answered(conn) for conn in conns] == [200] * len(conns)
        for conn in [*conns, holder]:
            conn.close()
    assert holding.on_loop[HOLD] is True and holding.alone[HOLD] is True
    assert {q: holding.on_loop[q] for q in queries} == dict.fromkeys(queries, False)
    assert {q: holding.alone[q] for q in queries} == dict.fromkeys(queries, False)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_client_calling_back_to_back_embeds_on_the_event_loop(
    seeded: Settings, holding: HoldingEmbedder, loop: str
) -> None:
    queries = [f"one call right after the other {i}" for i in range(5)]
    with served(create_app(seeded, embedder=holding), loop) as (host, port):
        conn = http.client.HTTPConnection(host, port, timeout=30)
        for query in queries:
            select_over(conn, query)
        conn.close()
    assert [holding.on_loop[q] for q in queries] == [True] * len(queries)
    assert [holding.alone[q] for q in queries] == [True] * len(queries)
