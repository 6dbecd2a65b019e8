"""Subsets through the API: compute, read, annotate, retrieve from, serve as a fixed set."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.conftest import upload, wait_job
from tests.datasets import topic_rows
from tests.fakes.upstream import FakeUpstream


def compute(client: TestClient, pool: str, body: dict[str, Any]) -> dict[str, Any]:
    r = client.post(f"/v1/pools/{pool}/subsets", json=body)
    assert r.status_code == 202, r.text
    job = wait_job(client, r.json()["job"]["id"])
    assert job["status"] == "succeeded", job
    assert job["kind"] == "subset" and job["done"] == job["total"]
    subset: dict[str, Any] = client.get(f"/v1/pools/{pool}/subsets/{body['name']}").json()
    return subset


def unlabeled_pool(client: TestClient, n: int = 300) -> list[dict[str, Any]]:
    rows = [{**r, "output": None} for r in topic_rows(n)]
    upload(client, "pool", rows)
    return rows


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("votek", {"k": 10}),
        ("ideal", {"k": 5, "rounds": 5}),
        ("mfl", {}),
        ("diversity", {}),
        ("random", {}),
    ],
)
def test_every_method_computes_a_subset(client: TestClient, method: str, params: dict) -> None:
    unlabeled_pool(client, 200)
    subset = compute(
        client, "pool", {"name": "s", "method": method, "budget": 12, "params": params, "seed": 3}
    )
    assert subset["status"] == "ready" and subset["method"] == method
    assert subset["size"] == 12 and len(set(subset["ids"])) == 12
    assert subset["stale"] is False and subset["pool_version"] == 1
    assert subset["timing"]["seconds"] >= 0
    all_ids = {e["id"] for e in client.get("/v1/pools/pool/examples?limit=1000").json()["examples"]}
    assert set(subset["ids"]) <= all_ids
    again = compute(
        client, "pool", {"name": "s", "method": method, "budget": 12, "params": params, "seed": 3}
    )
    assert again["ids"] == subset["ids"]  # deterministic under the seed


def test_annotate_then_retrieve_only_from_the_subset(
    client: TestClient, upstream: FakeUpstream
) -> None:
    rows = unlabeled_pool(client)
    subset = compute(
        client, "pool", {"name": "vk", "method": "votek", "budget": 20, "params": {"k": 15}}
    )
    todo = client.get("/v1/pools/pool/subsets/vk?unlabeled=true").json()["examples"]
    assert [e["id"] for e in todo] == subset["ids"]
    by_text = {r["input"]: r for r in topic_rows(len(rows))}
    patch = {"examples": [{"id": e["id"], "output": by_text[e["input"]]["output"]} for e in todo]}
    assert client.patch("/v1/pools/pool/examples", json=patch).status_code == 200
    after = client.get("/v1/pools/pool/subsets/vk?unlabeled=true").json()
    assert after["examples"] == [] and after["stale"] is False  # labeling is not a change

    r = client.post(
        "/v1/pools/pool/select", json={"query": "rain over the harbour", "k": 6, "subset": "vk"}
    )
    assert r.status_code == 200, r.text
    demos = r.json()["demonstrations"]
    assert len(demos) == 6 and {d["id"] for d in demos} <= set(subset["ids"])

    body = {
        "model": "fake-model",
        "messages": [{"role": "user", "content": "the chef baked"}],
        "icl": {"pool": "pool", "k": 4, "subset": "vk"},
    }
    reply = client.post("/v1/chat/completions", json=body).json()
    assert set(reply["icl"]["demonstrations"]) <= set(subset["ids"])
    assert len(reply["icl"]["demonstrations"]) == 4


def test_fixed_subset_selector_serves_the_first_k_labeled(client: TestClient) -> None:
    upload(client, "pool", topic_rows(100, unlabeled_every=4))
    subset = compute(client, "pool", {"name": "div", "method": "diversity", "budget": 10})
    labeled = {
        e["id"]
        for e in client.get("/v1/pools/pool/examples?labeled=true&limit=1000").json()["examples"]
    }
    expected = [i for i in subset["ids"] if i in labeled][:3]
    for query in ("storm", "bank rates"):
        r = client.post(
            "/v1/pools/pool/select",
            json={"query": query, "k": 3, "selector": {"method": "subset", "name": "div"}},
        )
        assert r.status_code == 200, r.text
        assert [d["id"] for d in r.json()["demonstrations"]] == expected


def test_stale_after_upload_and_allow_stale(client: TestClient) -> None:
    upload(client, "pool", topic_rows(60))
    compute(client, "pool", {"name": "r", "method": "random", "budget": 10})
    upload(client, "pool", topic_rows(80)[60:])
    subset = client.get("/v1/pools/pool/subsets/r").json()
    assert subset["stale"] is True
    listed = client.get("/v1/pools/pool/subsets").json()["data"]
    assert [(s["name"], s["stale"]) for s in listed] == [("r", True)] and "ids" not in listed[0]
    r = client.post("/v1/pools/pool/select", json={"query": "x", "subset": "r"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "subset_stale"
    r = client.post(
        "/v1/pools/pool/select", json={"query": "x", "subset": "r", "allow_stale": True}
    )
    assert r.status_code == 200
    recomputed = compute(client, "pool", {"name": "r", "method": "random", "budget": 10})
    assert recomputed["stale"] is False and recomputed["pool_version"] == 2


def test_errors(client: TestClient) -> None:
    r = client.post("/v1/pools/none/subsets", json={"name": "s", "method": "votek", "budget": 5})
    assert r.status_code == 404
    upload(client, "pool", topic_rows(30))
    bad = [
        ({"name": "s", "method": "nope", "budget": 5}, "method"),
        ({"name": "s", "method": "votek", "budget": 0}, "budget"),
        ({"name": "s", "method": "votek", "budget": 5, "params": {"kk": 3}}, "params"),
        ({"name": "bad name", "method": "random", "budget": 5}, "name"),
        ({"name": "s", "method": "random", "budget": 10**9}, "budget"),
    ]
    for body, param in bad:
        r = client.post("/v1/pools/pool/subsets", json=body)
        assert r.status_code == 400, (body, r.text)
        assert param in (r.json()["error"]["param"] or "") + r.json()["error"]["message"]
    assert client.get("/v1/pools/pool/subsets/missing").status_code == 404
    r = client.post("/v1/pools/pool/select", json={"query": "x", "subset": "missing"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "subset"
    compute(client, "pool", {"name": "s", "method": "random", "budget": 5})
    assert client.delete("/v1/pools/pool/subsets/s").status_code == 200
    assert client.get("/v1/pools/pool/subsets/s").status_code == 404


def test_budget_above_pool_size_takes_the_whole_pool(client: TestClient) -> None:
    upload(client, "pool", topic_rows(8))
    subset = compute(
        client, "pool", {"name": "all", "method": "votek", "budget": 50, "params": {"k": 3}}
    )
    assert subset["size"] == 8 and len(set(subset["ids"])) == 8
