"""Selective annotation as a new user does it: upload 5,000 unlabeled rows, compute a vote-k
subset of 100, export it, label it, and retrieve demonstrations only from it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from openai import OpenAI

from tests.datasets import topic_rows, write_jsonl
from tests.e2e.server import Server
from tests.fakes.upstream import FakeUpstream

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]


def test_votek_annotate_retrieve(served: tuple[Server, FakeUpstream, Path]) -> None:
    server, upstream, root = served
    gold = topic_rows(5000)
    answer = {r["input"]: r["output"] for r in gold}
    unlabeled = write_jsonl(root / "unlabeled.jsonl", [{**r, "output": None} for r in gold])

    # 1. upload the unlabeled pool
    done = server.cli("pools", "upload", "news", str(unlabeled), "--no-progress")
    assert done.returncode == 0, done.stderr + done.stdout
    assert server.get("/v1/pools/news")["labeled"] == 0

    # 2. a vote-k subset of 100, exported for annotation
    made = server.cli(
        "subsets",
        "create",
        "news",
        "to-label",
        "--method",
        "votek",
        "--budget",
        "100",
        "--no-progress",
    )
    assert made.returncode == 0, made.stderr + made.stdout
    subset = server.get("/v1/pools/news/subsets/to-label")
    assert subset["status"] == "ready" and subset["size"] == 100 and not subset["stale"]
    export = root / "to-label.jsonl"
    out = server.cli(
        "subsets", "export", "news", "to-label", "--unlabeled", "--output", str(export)
    )
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in export.read_text().splitlines()]
    assert [r["id"] for r in rows] == subset["ids"]

    # 3. label them (the annotator fills in "output") and send them back
    labeled = root / "labeled.jsonl"
    labeled.write_text(
        "".join(json.dumps({"id": r["id"], "output": answer[r["input"]]}) + "\n" for r in rows)
    )
    annotated = server.cli("pools", "annotate", "news", str(labeled))
    assert annotated.returncode == 0, annotated.stderr + annotated.stdout
    pool = server.get("/v1/pools/news")
    assert pool["labeled"] == 100 and pool["version"] == 2
    assert server.get("/v1/pools/news/subsets/to-label")["stale"] is False

    # 4. chat completions with icl.subset: demonstrations only from those 100
    sdk = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    chosen = set(subset["ids"])
    for query in (
        "the striker scored in the derby",
        "heavy rain flooded the coast",
        "the central bank cut interest rates",
    ):
        upstream.reset()
        reply = sdk.chat.completions.create(
            model="fake-model",
            messages=[{"role": "user", "content": query}],
            extra_body={"icl": {"pool": "news", "k": 4, "subset": "to-label"}},
        )
        assert reply.model_extra is not None
        ids = reply.model_extra["icl"]["demonstrations"]
        assert len(ids) == 4 and set(ids) <= chosen
        sent = upstream.requests[-1].body["messages"]
        assert len(sent) == 9 and sent[-1] == {"role": "user", "content": query}
