from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import EmbeddingSettings, Settings, Upstream
from tests.fakes.upstream import FakeUpstream

ADMIN_KEY = "sk-admin-canary-7f3a9c"
CLIENT_KEY = "sk-client-canary-41d2e8"


@pytest.fixture(scope="session")
def fake_upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream(models=["fake-model", "fake-other"]) as fake:
        yield fake


@pytest.fixture
def upstream(fake_upstream: FakeUpstream) -> Iterator[FakeUpstream]:
    fake_upstream.reset()
    yield fake_upstream
    fake_upstream.reset()


def make_settings(data_dir: Path, fake: FakeUpstream, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "data_dir": data_dir,
        "embedding": EmbeddingSettings(kind="hash", dim=64),
        "upstreams": [
            Upstream(
                name="fake",
                base_url=fake.base_url,
                models=["fake-*"],
                first_byte_timeout=5,
                idle_timeout=5,
                total_timeout=20,
                max_retries=1,
                max_retry_wait=1,
            )
        ],
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)


@pytest.fixture
def settings(tmp_path: Path, upstream: FakeUpstream) -> Settings:
    return make_settings(tmp_path / "data", upstream)


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def wait_job(
    client: TestClient, job_id: str, timeout: float = 60.0, **kwargs: Any
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job: dict[str, Any] = client.get(f"/v1/jobs/{job_id}", **kwargs).json()
        if job["status"] not in ("queued", "running"):
            return job
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} did not finish in {timeout}s")


def upload(
    client: TestClient,
    pool: str,
    rows: list[dict[str, Any]],
    *,
    mode: str = "append",
    wait: bool = True,
    **kwargs: Any,
) -> dict[str, Any]:
    body = "".join(json.dumps(r) + "\n" for r in rows)
    response = client.post(
        f"/v1/pools/{pool}/examples?mode={mode}",
        content=body.encode(),
        headers={"content-type": "application/x-ndjson", **kwargs.pop("headers", {})},
        **kwargs,
    )
    assert response.status_code == 202, response.text
    job: dict[str, Any] = response.json()["job"]
    if wait:
        job = wait_job(client, job["id"])
        assert job["status"] == "succeeded", job
    return job
