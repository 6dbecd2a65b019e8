"""Restarts, interrupted jobs and crash points of the publish protocol."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.faults import PUBLISH_POINTS
from app.ingest import parse_upload
from app.main import create_app
from app.settings import Limits
from app.store import PoolStore
from tests.conftest import make_settings, upload, wait_job
from tests.datasets import topic_rows, write_jsonl
from tests.fakes.upstream import FakeUpstream


def test_restart_keeps_pool_version_and_selection(tmp_path: Path, upstream: FakeUpstream) -> None:
    settings = make_settings(tmp_path, upstream)
    query = {"query": "the stock market rallied on inflation data", "k": 5}
    with TestClient(create_app(settings)) as client:
        upload(client, "p", topic_rows(80))
        upload(client, "p", topic_rows(100)[80:])
        before = client.get("/v1/pools/p").json()
        selected = client.post("/v1/pools/p/select", json=query).json()
    with TestClient(create_app(settings)) as client:
        after = client.get("/v1/pools/p").json()
        again = client.post("/v1/pools/p/select", json=query).json()
    assert (after["version"], after["size"], after["labels"]) == (
        before["version"],
        before["size"],
        before["labels"],
    )
    assert again["demonstrations"] == selected["demonstrations"]


def test_acknowledged_upload_resumes_after_restart(tmp_path: Path, upstream: FakeUpstream) -> None:
    settings = make_settings(tmp_path, upstream)
    # Stage an upload exactly as the route does, then "crash" before any worker ran it.
    store = PoolStore(settings.data_dir)
    rows = write_jsonl(tmp_path / "rows.jsonl", topic_rows(40))
    records = parse_upload(rows.read_bytes(), fmt="jsonl", limits=Limits(), label_from_output=True)
    job = store.stage_upload("p", records, mode="append", max_pool_rows=1000)
    store.close()
    with TestClient(create_app(settings)) as client:
        done = wait_job(client, job["id"])
        assert done["status"] == "succeeded"
        assert client.get("/v1/pools/p").json()["size"] == 40


def test_other_interrupted_jobs_are_reported_failed(tmp_path: Path) -> None:
    store = PoolStore(tmp_path)
    with store.db.write() as conn:
        conn.execute(
            "INSERT INTO jobs (id, kind, pool, status, created_at) "
            "VALUES ('job_s', 'subset', 'p', 'running', 0)"
        )
    assert store.recover() == []
    job = store.job("job_s")
    assert job["status"] == "failed" and "restart" in job["error"]
    store.close()


CRASHER = textwrap.dedent(
    """
    import sys
    from fastapi.testclient import TestClient
    from app.main import create_app
    from app.settings import EmbeddingSettings, Settings
    settings = Settings(_env_file=None, data_dir=sys.argv[1],
                        embedding=EmbeddingSettings(kind="hash", dim=64))
    with TestClient(create_app(settings)) as client:
        body = open(sys.argv[2], "rb").read()
        r = client.post("/v1/pools/p/examples?mode=" + sys.argv[3], content=body,
                        headers={"content-type": "application/x-ndjson"})
        assert r.status_code == 202, r.text
        import time
        deadline = time.time() + 60
        while time.time() < deadline:
            if client.get("/v1/jobs/" + r.json()["job"]["id"]).json()["status"] == "succeeded":
                break
            time.sleep(0.02)
    """
)


@pytest.mark.parametrize("point", PUBLISH_POINTS)
@pytest.mark.parametrize("mode", ["append", "replace"])
def test_crash_at_each_publish_step(
    tmp_path: Path, upstream: FakeUpstream, point: str, mode: str
) -> None:
    settings = make_settings(tmp_path / "data", upstream)
    old_rows, new_rows = topic_rows(60)[:30], topic_rows(60)[30:]
    with TestClient(create_app(settings)) as client:
        upload(client, "p", old_rows)
    new_file = write_jsonl(tmp_path / "new.jsonl", new_rows)
    env = {**os.environ, "ICLSERVE_FAULT_AT": point}
    proc = subprocess.run(
        [sys.executable, "-c", CRASHER, str(settings.data_dir), str(new_file), mode],
        env=env,
        capture_output=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert proc.returncode == 137, proc.stderr.decode()[-2000:]

    with TestClient(create_app(settings)) as client:
        # An acknowledged upload (every point after staging) must end up published.
        jobs = client.get("/v1/jobs?pool=p").json()["data"]
        for job in jobs:
            if job["status"] in ("queued", "running"):
                wait_job(client, job["id"])
        pool = client.get("/v1/pools/p").json()
        inputs = [
            e["input"] for e in client.get("/v1/pools/p/examples?limit=1000").json()["examples"]
        ]
        if point == "upload_staged":  # died before the 202: the upload never happened
            expected_rows = old_rows
        else:
            expected_rows = old_rows + new_rows if mode == "append" else new_rows
        expected_new = [r["input"] for r in expected_rows]
        assert inputs == expected_new, point
        assert pool["size"] == len(expected_new)
        select = client.post("/v1/pools/p/select", json={"query": "rain", "k": 3})
        assert select.status_code == 200
    leftovers = [
        p.name for p in (settings.data_dir / "vectors").rglob("*") if p.name.endswith(".tmp")
    ]
    assert leftovers == []
    npys = list((settings.data_dir / "vectors").rglob("*.npy"))
    assert 1 <= len(npys) <= 2
