"""`POST /v1/pools/{pool}/select`: the dry run, checked against brute force."""

from __future__ import annotations

import numpy as np
from fastapi.testclient import TestClient

from retrievers.hashing import HashingEmbedder
from tests.conftest import upload
from tests.datasets import topic_rows


def brute_force_knn(rows: list[dict], query: str, k: int) -> list[int]:
    """Positions of the k labeled rows most similar to the query, best first (ties: lower)."""
    embedder = HashingEmbedder(dim=64)
    vectors = embedder.embed([r["input"] for r in rows]).astype(np.float64)
    q = embedder.embed([query])[0].astype(np.float64)
    scores = vectors @ q
    labeled = [i for i, r in enumerate(rows) if r["output"] is not None]
    return sorted(labeled, key=lambda i: (-scores[i], i))[:k]


def test_knn_nearest_last_matches_brute_force(client: TestClient) -> None:
    rows = topic_rows(200, unlabeled_every=3)
    upload(client, "p", rows)
    ids = {
        e["external_id"]: e["id"]
        for e in client.get("/v1/pools/p/examples?limit=1000").json()["examples"]
    }
    for query in ["the striker scored in the final", "the central bank raised rates", "soup"]:
        r = client.post("/v1/pools/p/select", json={"query": query, "k": 5})
        assert r.status_code == 200, r.text
        body = r.json()
        expected = [ids[rows[i]["id"]] for i in reversed(brute_force_knn(rows, query, 5))]
        got = [d["id"] for d in body["demonstrations"]]
        assert got == expected
        scores = [d["score"] for d in body["demonstrations"]]
        assert scores == sorted(scores)
        assert all(d["output"] is not None for d in body["demonstrations"])
        assert body["pool"] == "p" and body["version"] == 1
        assert set(body["timing_ms"]) >= {"embed", "search", "select", "total"}
        messages = body["messages"]
        assert [m["role"] for m in messages] == ["user", "assistant"] * 5 + ["user"]
        assert messages[-1]["content"] == query
        assert messages[-3]["content"] == body["demonstrations"][-1]["input"]
        assert body["prompt"].endswith(f"Input: {query}\nOutput:")


def test_orders_and_selectors(client: TestClient) -> None:
    upload(client, "p", topic_rows(100))
    base = {"query": "the chef roasted garlic", "k": 4}
    first = client.post("/v1/pools/p/select", json={**base, "order": "nearest_first"}).json()
    last = client.post("/v1/pools/p/select", json=base).json()
    assert [d["id"] for d in first["demonstrations"]] == [
        d["id"] for d in reversed(last["demonstrations"])
    ]

    for selector in (
        {"method": "mmr", "lambda": 0.5, "fetch_k": 20},
        {"method": "balanced"},
        {"method": "random"},
        {"method": "knn"},
    ):
        r = client.post("/v1/pools/p/select", json={**base, "selector": selector})
        assert r.status_code == 200, (selector, r.text)
        assert len(r.json()["demonstrations"]) == 4
    balanced = client.post(
        "/v1/pools/p/select", json={**base, "selector": {"method": "balanced"}, "k": 5}
    ).json()
    assert len({d["label"] for d in balanced["demonstrations"]}) == 5

    seeded = [
        client.post(
            "/v1/pools/p/select", json={**base, "selector": {"method": "random"}, "seed": s}
        ).json()
        for s in (1, 1, 2)
    ]
    ids = [[d["id"] for d in s["demonstrations"]] for s in seeded]
    assert ids[0] == ids[1] and ids[0] != ids[2]


def test_unknown_method_lists_valid_ones(client: TestClient) -> None:
    upload(client, "p", topic_rows(10))
    r = client.post("/v1/pools/p/select", json={"query": "x", "selector": {"method": "votek2"}})
    assert r.status_code == 400
    message = r.json()["error"]["message"]
    for name in ("knn", "mmr", "balanced", "random"):
        assert name in message
    r = client.post(
        "/v1/pools/p/select", json={"query": "x", "selector": {"method": "mmr", "beta": 1}}
    )
    assert r.status_code == 400 and "beta" in r.json()["error"]["message"]
    r = client.post("/v1/pools/p/select", json={"query": "x", "order": "upside_down"})
    assert r.status_code == 400


def test_missing_pool_subset_and_template(client: TestClient) -> None:
    assert client.post("/v1/pools/none/select", json={"query": "x"}).status_code == 404
    upload(client, "p", topic_rows(10))
    r = client.post("/v1/pools/p/select", json={"query": "x", "subset": "s"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "subset"
    r = client.post(
        "/v1/pools/p/select", json={"query": "x", "template": {"example": "{input.__class__}"}}
    )
    assert r.status_code == 400
    r = client.post(
        "/v1/pools/p/select",
        json={
            "query": "{output}",
            "k": 1,
            "mode": "text",
            "template": {"instruction": "Classify {{topic}}", "example": "Q: {input} -> {label}"},
        },
    )
    assert r.status_code == 200, r.text
    prompt = r.json()["prompt"]
    assert prompt.startswith("Classify {topic}\n\nQ: ") and prompt.endswith(
        "Input: {output}\nOutput:"
    )


def test_pool_defaults_apply(client: TestClient) -> None:
    upload(client, "p", topic_rows(50))
    client.put(
        "/v1/pools/p",
        json={"k": 2, "order": "nearest_first", "template": {"instruction": "Topic?"}},
    )
    body = client.post("/v1/pools/p/select", json={"query": "storm over the coast"}).json()
    assert len(body["demonstrations"]) == 2
    scores = [d["score"] for d in body["demonstrations"]]
    assert scores == sorted(scores, reverse=True)
    assert body["messages"][0] == {"role": "system", "content": "Topic?"}


def test_select_before_publish_is_a_conflict(client: TestClient) -> None:
    client.put("/v1/pools/empty", json={})
    r = client.post("/v1/pools/empty/select", json={"query": "x"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "pool_not_ready"
