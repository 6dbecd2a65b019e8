"""Two-stage vote-k through the API: LLM confidence from the fake upstream's logprobs."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient

from tests.conftest import upload, wait_job
from tests.datasets import topic_rows
from tests.fakes.upstream import FakeUpstream

N = 200
STAGE1 = 5
BUDGET = 15
PARAMS = {"k": 10, "stage1": STAGE1, "model": "fake-model"}


def submit(client: TestClient, body: dict[str, Any]) -> dict[str, Any]:
    r = client.post("/v1/pools/pool/subsets", json=body)
    assert r.status_code == 202, r.text
    return wait_job(client, r.json()["job"]["id"])


def chat_calls(upstream: FakeUpstream) -> int:
    return sum(r.path == "/v1/chat/completions" for r in upstream.requests)


def test_two_stage_votek_needs_labeled_stage1_then_scores_every_target(
    client: TestClient, upstream: FakeUpstream
) -> None:
    rows = topic_rows(N, unlabeled_every=4)  # 150 of 200 labeled
    topic_of = {r["input"]: r["output"] for r in topic_rows(N)}  # every row's true topic
    upload(client, "pool", rows)
    # the stage-1 picks are fast vote-k's first picks over the same graph and seed
    job = submit(client, {"name": "s1", "method": "votek", "budget": STAGE1, "params": {"k": 10}})
    assert job["status"] == "succeeded", job
    stage1 = client.get("/v1/pools/pool/subsets/s1").json()["ids"]
    unlabel = [{"id": i, "output": None, "label": None} for i in stage1]
    assert client.patch("/v1/pools/pool/examples", json={"examples": unlabel}).status_code == 200

    body = {"name": "vk2", "method": "votek_two_stage", "budget": BUDGET, "params": PARAMS}
    job = submit(client, body)
    assert job["status"] == "failed"
    assert f"ids {sorted(stage1)}" in job["error"] and "PATCH" in job["error"]
    subset = client.get("/v1/pools/pool/subsets/vk2").json()
    assert subset["status"] == "failed" and subset["error"] == job["error"]
    assert chat_calls(upstream) == 0  # nothing was scored with an unusable bank

    examples = client.get("/v1/pools/pool/subsets/s1?unlabeled=true").json()["examples"]
    assert sorted(e["id"] for e in examples) == sorted(stage1)
    label = [{"id": e["id"], "output": topic_of[e["input"]]} for e in examples]
    assert client.patch("/v1/pools/pool/examples", json={"examples": label}).status_code == 200

    job = submit(client, body)
    assert job["status"] == "succeeded", job
    assert job["done"] == job["total"]
    subset = client.get("/v1/pools/pool/subsets/vk2").json()
    assert subset["status"] == "ready" and subset["method"] == "votek_two_stage"
    assert subset["size"] == BUDGET and len(set(subset["ids"])) == BUDGET
    info = subset["info"]
    assert info["stage1_ids"] == stage1 == subset["ids"][:STAGE1]
    assert info["rung"] == "chat_logprobs" and info["confidence"]["probe_calls"] == 1
    assert info["calls"] == (N - STAGE1) + 1 == chat_calls(upstream)
    assert info["prompt_tokens"] > 0 and info["completion_tokens"] > 0
    assert info["sample_size"] == N and info["bucket_width"] == int(N * 0.9 / (BUDGET - STAGE1))
    assert info["confidence"]["targets"] == N - STAGE1
    assert info["confidence"]["label_classes"] == 5
    # every scoring prompt carries the labeled stage-1 demos
    scoring = [r.body for r in upstream.requests if len(r.body["messages"]) > 1]
    assert all(b["logprobs"] is True and b["model"] == "fake-model" for b in scoring)
    assert all(len(b["messages"]) == 2 * STAGE1 + 1 for b in scoring)


def test_two_stage_votek_rejects_a_bad_model(client: TestClient) -> None:
    upload(client, "pool", topic_rows(30))
    for params, message in (
        ({**PARAMS, "model": "no-such-model"}, "no-such-model"),
        ({"k": 10}, "model"),
        ({**PARAMS, "concurrency": 0}, "concurrency"),
    ):
        body = {"name": "s", "method": "votek_two_stage", "budget": 5, "params": params}
        r = client.post("/v1/pools/pool/subsets", json=body)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"].startswith("params.") and message in error["message"] + error["param"]
    assert client.get("/v1/pools/pool/subsets/s").status_code == 404
