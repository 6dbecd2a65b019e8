"""Pools, uploads, jobs and annotation through the in-process app."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from fastapi.testclient import TestClient

from app.settings import Limits, Settings
from tests.conftest import make_settings, upload, wait_job
from tests.datasets import topic_rows


def test_upload_publishes_a_version_with_progress(client: TestClient) -> None:
    rows = topic_rows(120, unlabeled_every=10)
    job = upload(client, "topics", rows)
    assert job["kind"] == "upload" and job["done"] == job["total"] == 120
    assert job["progress"] == 1.0 and job["result"] == {"version": 1}

    pool = client.get("/v1/pools/topics").json()
    assert pool["name"] == "topics" and pool["version"] == 1 and pool["status"] == "ready"
    assert pool["size"] == 120 and pool["labeled"] == 108
    assert sum(pool["labels"].values()) == 108 and set(pool["labels"]) == {
        "sports",
        "finance",
        "weather",
        "cooking",
        "technology",
    }
    assert pool["embedder"] == {"name": "hash-64", "dim": 64}
    assert pool["active_job"] is None and pool["index"]
    listed = client.get("/v1/pools").json()["data"]
    assert [p["name"] for p in listed] == ["topics"]


def test_formats_csv_json_and_multipart(client: TestClient) -> None:
    csv_body = "id,input,output,source\na1,the striker scored,sports,feed\na2,rates rose,finance,\n"
    r = client.post(
        "/v1/pools/csvpool/examples", content=csv_body, headers={"content-type": "text/csv"}
    )
    assert r.status_code == 202, r.text
    assert wait_job(client, r.json()["job"]["id"])["status"] == "succeeded"
    page = client.get("/v1/pools/csvpool/examples").json()
    assert page["total"] == 2
    first = page["examples"][0]
    assert first["external_id"] == "a1" and first["label"] == "sports"
    assert first["metadata"] == {"source": "feed"}

    r = client.post(
        "/v1/pools/jsonpool/examples",
        json={"examples": [{"input": "a", "output": "x"}, {"input": "b", "output": None}]},
    )
    assert r.status_code == 202, r.text
    wait_job(client, r.json()["job"]["id"])
    assert client.get("/v1/pools/jsonpool").json()["labeled"] == 1

    files = {"file": ("pool.jsonl", b'{"input": "q", "output": "y"}\n', "application/x-ndjson")}
    r = client.post("/v1/pools/multi/examples", files=files)
    assert r.status_code == 202, r.text
    wait_job(client, r.json()["job"]["id"])
    assert client.get("/v1/pools/multi").json()["size"] == 1


def test_bad_upload_is_rejected_whole_and_version_unchanged(client: TestClient) -> None:
    upload(client, "p", topic_rows(10))
    before = client.get("/v1/pools/p").json()
    body = b'{"input": "fine", "output": "x"}\n{not json}\n{"output": "no input"}\n{"input": 5}\n'
    r = client.post(
        "/v1/pools/p/examples", content=body, headers={"content-type": "application/x-ndjson"}
    )
    assert r.status_code == 422
    error = r.json()["error"]
    lines = {row["line"]: row["reason"] for row in error["rows"]}
    assert set(lines) == {2, 3, 4}
    assert "JSON" in lines[2] and "input" in lines[3] and "input" in lines[4]
    after = client.get("/v1/pools/p").json()
    assert (after["version"], after["size"]) == (before["version"], before["size"])
    assert client.get("/v1/jobs?pool=p").json()["data"][0]["status"] == "succeeded"


def test_unknown_content_type_and_duplicate_ids(client: TestClient) -> None:
    r = client.post("/v1/pools/p/examples", content=b"x", headers={"content-type": "image/png"})
    assert r.status_code == 400 and "csv" in r.json()["error"]["message"].lower()
    upload(client, "p", [{"id": "a", "input": "one", "output": "x"}])
    r = client.post(
        "/v1/pools/p/examples",
        content=b'{"id": "b", "input": "two", "output": "x"}\n{"id": "a", "input": "three"}\n',
        headers={"content-type": "application/x-ndjson"},
    )
    assert r.status_code == 422
    assert r.json()["error"]["rows"] == [{"line": 2, "reason": "id 'a' already exists in the pool"}]
    assert client.get("/v1/pools/p").json()["size"] == 1


def test_append_and_replace(client: TestClient) -> None:
    rows = topic_rows(30)
    upload(client, "p", rows[:20])
    upload(client, "p", rows[20:])
    pool = client.get("/v1/pools/p").json()
    assert (pool["version"], pool["size"]) == (2, 30)
    ids = [e["id"] for e in client.get("/v1/pools/p/examples?limit=1000").json()["examples"]]
    assert ids == sorted(ids) and len(set(ids)) == 30

    upload(client, "p", rows[:5], mode="replace")
    pool = client.get("/v1/pools/p").json()
    assert (pool["version"], pool["size"]) == (3, 5)
    inputs = [e["input"] for e in client.get("/v1/pools/p/examples").json()["examples"]]
    assert inputs == [r["input"] for r in rows[:5]]


def test_paging_and_labeled_filter(client: TestClient) -> None:
    upload(client, "p", topic_rows(25, unlabeled_every=5))
    page = client.get("/v1/pools/p/examples?offset=10&limit=5").json()
    assert page["total"] == 25 and len(page["examples"]) == 5 and page["offset"] == 10
    unlabeled = client.get("/v1/pools/p/examples?labeled=false&limit=100").json()
    assert unlabeled["total"] == 5 and all(e["output"] is None for e in unlabeled["examples"])
    assert client.get("/v1/pools/p/examples?limit=0").status_code == 400


def test_annotation_publishes_without_reembedding(client: TestClient, settings: Settings) -> None:
    upload(client, "p", topic_rows(20, unlabeled_every=4))
    before = client.get("/v1/pools/p").json()
    files_before = sorted((settings.data_dir / "vectors").rglob("*.npy"))
    todo = client.get("/v1/pools/p/examples?labeled=false").json()["examples"]
    patch = {
        "examples": [
            {"id": todo[0]["id"], "output": "weather"},
            {"id": todo[1]["external_id"], "output": "sports", "label": "custom"},
        ]
    }
    r = client.patch("/v1/pools/p/examples", json=patch)
    assert r.status_code == 200, r.text
    assert r.json()["version"] == before["version"] + 1
    after = client.get("/v1/pools/p").json()
    assert after["labeled"] == before["labeled"] + 2 and after["labels"]["custom"] == 1
    assert sorted((settings.data_dir / "vectors").rglob("*.npy")) == files_before
    rows = {e["id"]: e for e in client.get("/v1/pools/p/examples?limit=100").json()["examples"]}
    assert rows[todo[0]["id"]]["label"] == "weather"

    bad = client.patch("/v1/pools/p/examples", json={"examples": [{"id": 999999, "output": "x"}]})
    assert bad.status_code == 422 and bad.json()["error"]["rows"][0]["line"] == 1
    assert client.get("/v1/pools/p").json()["version"] == after["version"]


def test_delete_pool_removes_files(client: TestClient, settings: Settings) -> None:
    upload(client, "gone", topic_rows(10))
    assert list((settings.data_dir / "vectors").rglob("*.npy"))
    assert client.delete("/v1/pools/gone").status_code == 200
    assert client.get("/v1/pools/gone").status_code == 404
    assert not list((settings.data_dir / "vectors").rglob("*.npy"))
    assert client.delete("/v1/pools/gone").status_code == 404


def test_put_pool_settings(client: TestClient) -> None:
    r = client.put(
        "/v1/pools/cfg",
        json={
            "description": "d",
            "k": 3,
            "order": "nearest_first",
            "selector": {"method": "mmr", "lambda": 0.3},
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["k"] == 3 and body["selector"] == {"method": "mmr", "lambda": 0.3, "fetch_k": None}
    assert body["status"] == "empty" and body["version"] == 0
    r = client.put("/v1/pools/cfg", json={"k": 5})
    assert r.json()["k"] == 5 and r.json()["order"] == "nearest_first"
    assert client.put("/v1/pools/cfg", json={"order": "sideways"}).status_code == 400
    assert client.put("/v1/pools/cfg", json={"selector": {"method": "nope"}}).status_code == 400
    assert client.put("/v1/pools/-bad", json={}).status_code in (400, 404, 422)


def test_limits(tmp_path: Path, upstream: object) -> None:
    settings = make_settings(
        tmp_path,
        upstream,  # type: ignore[arg-type]
        limits=Limits(max_body_bytes=2048, max_rows_per_upload=5, max_field_chars=50, max_k=3),
    )
    with TestClient(create_app_for(settings)) as client:
        big = b'{"input": "' + b"x" * 4000 + b'"}\n'
        r = client.post(
            "/v1/pools/p/examples", content=big, headers={"content-type": "application/x-ndjson"}
        )
        assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"
        rows = "".join(json.dumps({"input": f"r{i}", "output": "x"}) + "\n" for i in range(6))
        r = client.post(
            "/v1/pools/p/examples", content=rows, headers={"content-type": "application/x-ndjson"}
        )
        assert r.status_code == 422
        long = json.dumps({"input": "y" * 60}) + "\n"
        r = client.post(
            "/v1/pools/p/examples", content=long, headers={"content-type": "application/x-ndjson"}
        )
        assert r.status_code == 422 and "50" in r.json()["error"]["rows"][0]["reason"]
        assert client.get("/v1/pools/p").status_code == 404
        upload(client, "p", [{"input": f"row {i}", "output": "x"} for i in range(5)])
        r = client.post("/v1/pools/p/select", json={"query": "row", "k": 4})
        assert r.status_code == 400 and r.json()["error"]["param"] == "k"


def create_app_for(settings: Settings):  # type: ignore[no-untyped-def]
    from app.main import create_app

    return create_app(settings)


def test_vector_file_matches_embeddings(client: TestClient, settings: Settings) -> None:
    from retrievers.hashing import HashingEmbedder

    rows = topic_rows(15)
    upload(client, "p", rows)
    (path,) = (settings.data_dir / "vectors").rglob("*.npy")
    stored = np.load(path, allow_pickle=False)
    expected = HashingEmbedder(dim=64).embed([r["input"] for r in rows])
    np.testing.assert_allclose(stored, expected, atol=1e-6)
