"""OpenAI-compatible forwarding through the in-process app to the loopback fake upstream."""

from __future__ import annotations

import json

from fastapi.testclient import TestClient

from tests.conftest import upload
from tests.datasets import topic_rows
from tests.fakes.upstream import FakeUpstream


def _pool(client: TestClient) -> None:
    upload(client, "topics", topic_rows(150))


def test_chat_injects_selected_demonstrations(client: TestClient, upstream: FakeUpstream) -> None:
    _pool(client)
    query = "the goalkeeper was injured during the derby"
    icl = {"pool": "topics", "k": 4}
    selected = client.post("/v1/pools/topics/select", json={"query": query, "k": 4}).json()
    body = {
        "model": "fake-model",
        "messages": [
            {"role": "system", "content": "Answer with a topic."},
            {"role": "user", "content": query},
        ],
        "temperature": 0,
        "icl": icl,
    }
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    reply = r.json()
    ids = [d["id"] for d in selected["demonstrations"]]
    assert reply["icl"] == {"pool": "topics", "version": 1, "demonstrations": ids}
    assert r.headers["x-icl-demonstrations"] == ",".join(map(str, ids))
    assert reply["choices"][0]["message"]["content"] == "sports"

    sent = upstream.requests[-1].body
    assert "icl" not in sent and sent["temperature"] == 0
    expected = [{"role": "system", "content": "Answer with a topic."}]
    for demo in selected["demonstrations"]:
        expected += [
            {"role": "user", "content": demo["input"]},
            {"role": "assistant", "content": demo["output"]},
        ]
    expected.append({"role": "user", "content": query})
    assert sent["messages"] == expected


def test_passthrough_without_icl_is_unchanged(client: TestClient, upstream: FakeUpstream) -> None:
    body = {
        "model": "fake-model",
        "messages": [{"role": "user", "content": "hi"}],
        "n": 1,
        "custom_field": {"x": [1, 2]},
    }
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200 and "icl" not in r.json()
    assert upstream.requests[-1].body == body
    assert "x-icl-demonstrations" not in r.headers


def test_streaming_passes_sse_through(client: TestClient, upstream: FakeUpstream) -> None:
    _pool(client)
    body = {
        "model": "fake-model",
        "stream": True,
        "messages": [{"role": "user", "content": "the central bank raised interest rates"}],
        "icl": {"pool": "topics", "k": 3},
    }
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert len(r.headers["x-icl-demonstrations"].split(",")) == 3
        text = "".join(r.iter_text())
    events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    content = "".join(
        (json.loads(e)["choices"][0]["delta"].get("content") or "")
        for e in events[:-1]
        if json.loads(e).get("choices")
    )
    assert content.strip() == "finance"


def test_completions_text_mode(client: TestClient, upstream: FakeUpstream) -> None:
    _pool(client)
    query = "heavy rain flooded the harbour"
    body = {
        "model": "fake-model",
        "prompt": query,
        "max_tokens": 5,
        "icl": {"pool": "topics", "k": 3},
    }
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"].strip() == "weather"
    prompt = upstream.requests[-1].body["prompt"]
    assert prompt.endswith(f"Input: {query}\nOutput:") and prompt.count("Input: ") == 4

    formatted = "Input: heavy rain flooded the harbour\nOutput:"
    body = {
        "model": "fake-model",
        "prompt": formatted,
        "icl": {"pool": "topics", "k": 2, "query": query},
    }
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200
    assert upstream.requests[-1].body["prompt"].endswith("\n\n" + formatted)


def test_models_and_routing_errors(client: TestClient, upstream: FakeUpstream) -> None:
    models = client.get("/v1/models").json()
    assert {m["id"] for m in models["data"]} >= {"fake-model", "fake-other"}
    r = client.post("/v1/chat/completions", json={"model": "gpt-unknown", "messages": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    r = client.post("/v1/chat/completions", json={"messages": []})
    assert r.status_code == 400
    r = client.post(
        "/v1/chat/completions", content=b"{oops", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400
    r = client.post(
        "/v1/chat/completions",
        json={
            "model": "fake-model",
            "icl": {"pool": "nope"},
            "messages": [{"role": "user", "content": "x"}],
        },
    )
    assert r.status_code == 404
    r = client.post(
        "/v1/chat/completions",
        json={
            "model": "fake-model",
            "icl": {"pool": "x", "k": "many"},
            "messages": [{"role": "user", "content": "x"}],
        },
    )
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("icl")


def test_upstream_failures_are_mapped(client: TestClient, upstream: FakeUpstream) -> None:
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "x"}]}
    upstream.set_fault("status", code=503, message="secret internal detail", times=None)
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 502
    assert "secret internal detail" not in r.text and r.json()["error"]["type"]
    upstream.clear_faults()
    upstream.set_fault("stall_before_headers", seconds=8, times=None)
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 504
    upstream.clear_faults()
