"""Upload jobs: batch progress, cancellation, listing."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from numpy.typing import NDArray

from app.main import create_app
from app.settings import EmbeddingSettings
from retrievers.hashing import HashingEmbedder
from tests.conftest import make_settings, upload, wait_job
from tests.datasets import topic_rows
from tests.fakes.upstream import FakeUpstream


class GatedEmbedder:
    """The hashing embedder, but each batch waits until the test lets it through."""

    def __init__(self) -> None:
        self.inner = HashingEmbedder(dim=64)
        self.name = self.inner.name
        self.dim = self.inner.dim
        self.gate = threading.Semaphore(0)
        self.batches = 0

    def embed(self, texts: Sequence[str]) -> NDArray[np.float32]:
        if len(texts) > 1:  # queries (one text) pass; upload batches wait
            if not self.gate.acquire(timeout=30):
                raise TimeoutError("test never released the batch")
            self.batches += 1
        return self.inner.embed(texts)


@pytest.fixture
def gated(tmp_path: Path, upstream: FakeUpstream) -> Iterator[tuple[TestClient, GatedEmbedder]]:
    settings = make_settings(
        tmp_path, upstream, embedding=EmbeddingSettings(kind="hash", dim=64, batch_size=10)
    )
    embedder = GatedEmbedder()
    with TestClient(create_app(settings, embedder=embedder)) as client:
        yield client, embedder
        for _ in range(100):  # let any batch still waiting finish
            embedder.gate.release()


def _wait_done(client: TestClient, job_id: str, done: int) -> dict:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["done"] >= done:
            return job
        time.sleep(0.01)
    raise AssertionError(f"job {job_id} never reached {done}")


def test_progress_is_reported_per_batch(gated: tuple[TestClient, GatedEmbedder]) -> None:
    client, embedder = gated
    job = upload(client, "p", topic_rows(35), wait=False)
    assert job["status"] == "queued" and job["total"] == 35 and job["done"] == 0
    for expected in (10, 20, 30):
        embedder.gate.release()
        seen = _wait_done(client, job["id"], expected)
        assert seen["status"] == "running" and seen["done"] == expected
        assert seen["progress"] == pytest.approx(expected / 35, abs=1e-3)
        assert client.get("/v1/pools/p").json()["status"] == "updating"
    embedder.gate.release()
    final = wait_job(client, job["id"])
    assert final["status"] == "succeeded" and final["done"] == 35 and final["progress"] == 1.0
    assert embedder.batches == 4
    assert client.get("/v1/pools/p").json()["status"] == "ready"


def test_cancel_a_running_upload(gated: tuple[TestClient, GatedEmbedder]) -> None:
    client, embedder = gated
    for _ in range(3):
        embedder.gate.release()
    upload(client, "p", topic_rows(25))
    before = client.get("/v1/pools/p").json()
    job = upload(client, "p", topic_rows(60)[25:], wait=False)
    embedder.gate.release()
    _wait_done(client, job["id"], 10)
    cancelled = client.delete(f"/v1/jobs/{job['id']}").json()
    assert cancelled["status"] == "cancelled"
    for _ in range(5):
        embedder.gate.release()
    time.sleep(0.3)
    assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == "cancelled"
    after = client.get("/v1/pools/p").json()
    assert (after["version"], after["size"]) == (before["version"], before["size"])
    assert client.get("/v1/pools/p/examples?limit=1000").json()["total"] == 25
    listed = client.get("/v1/jobs?pool=p").json()["data"]
    assert [j["status"] for j in listed] == ["cancelled", "succeeded"]
    assert client.get("/v1/jobs/job_missing").status_code == 404
