"""ChatConfidence (two-stage vote-k's LLM confidence) against the fake upstream on loopback."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import anyio
import numpy as np
import pytest
from numpy.typing import NDArray

from app.llm import confidence as confidence_module
from app.llm.client import UpstreamClient
from app.llm.confidence import ChatConfidence, ConfidenceFailed, UnlabeledBank, approx_tokens
from app.store import ExampleRow
from app.templates import Template
from tests.datasets import TOPICS, topic_rows
from tests.fakes.upstream import (
    FakeUpstream,
    RecordedRequest,
    answer_distribution,
    embed_text,
    sample_answer,
)
from tests.unit.llm.helpers import make_upstream

LABELS = sorted(TOPICS)
BANK = [0, 1, 2, 3, 4]  # topic_rows cycles through the topics: one bank item per label
TARGETS = list(range(5, 25))
SEED = 11


@pytest.fixture(scope="module")
def server() -> Iterator[FakeUpstream]:
    with FakeUpstream(models=["fake-model"]) as fake:
        yield fake


@pytest.fixture
def fake(server: FakeUpstream) -> Iterator[FakeUpstream]:
    server.reset()
    server.logprobs_enabled = server.n_enabled = True
    yield server
    server.reset()
    server.logprobs_enabled = server.n_enabled = True


class Pool:
    def __init__(self, n: int = 40, *, unlabeled: Sequence[int] = ()) -> None:
        self.rows = [
            ExampleRow(
                id=100 + i,
                external_id=r["id"],
                input=r["input"],
                output=None if i in unlabeled else r["output"],
                label=None if i in unlabeled else r["output"],
                metadata=None,
            )
            for i, r in enumerate(topic_rows(n))
        ]
        self.vectors = np.asarray([embed_text(r.input, 64) for r in self.rows], dtype=np.float32)
        self.by_input = {r.input: i for i, r in enumerate(self.rows)}

    def examples(self, positions: Sequence[int]) -> list[ExampleRow]:
        return [self.rows[p] for p in positions]

    def nearest_first(self, target: int) -> list[int]:
        """BANK by plain cosine to `target`, descending, ties by position (float64)."""
        x = self.vectors.astype(np.float64)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        sims = np.round(x[BANK] @ x[target], confidence_module.SIM_DECIMALS)
        return [BANK[j] for j in np.lexsort((BANK, -sims))]


def scorer(client: UpstreamClient, pool: Pool, **kwargs: Any) -> ChatConfidence:
    kwargs.setdefault("labels", LABELS)
    kwargs.setdefault("seed", SEED)
    return ChatConfidence(
        client,
        model="fake-model",
        template=Template(),
        vectors=pool.vectors,
        examples=pool.examples,
        **kwargs,
    )


def scoring_requests(fake: FakeUpstream) -> list[RecordedRequest]:
    """The chat calls that carry demonstrations (not the probes)."""
    return [r for r in fake.requests if len(r.body["messages"]) > 1]


def by_target(pool: Pool, requests: list[RecordedRequest]) -> dict[int, list[RecordedRequest]]:
    out: dict[int, list[RecordedRequest]] = {}
    for r in requests:
        out.setdefault(pool.by_input[r.body["messages"][-1]["content"]], []).append(r)
    return out


def label_reading(messages: list[dict[str, Any]]) -> float:
    """The spec's label probability (ALGORITHMS.md 1.4 rung 2) over the fake's distribution."""
    mass: dict[str, float] = {}
    for answer, p in answer_distribution(messages):
        mass[answer] = mass.get(answer, 0.0) + p
    present = {label: mass[label] for label in LABELS if label in mass}
    floor = min(mass.values()) / 2
    values = [present.get(label, floor) for label in LABELS]
    return max(values) / sum(values)


async def run(s: ChatConfidence, bank: list[int], targets: list[int]) -> NDArray[np.float64]:
    return await anyio.to_thread.run_sync(s, bank, targets)


def test_approx_tokens_counts_words_and_punctuation() -> None:
    assert approx_tokens("") == 0
    assert approx_tokens("The storm, again!") == 5
    assert approx_tokens("don't") == 3


def test_label_classes_match_whole_words_and_unique_prefixes() -> None:
    classes = confidence_module._Classes(["entailment", "neutral", "Contradiction here"])
    assert classes.words == ("contradiction", "entailment", "neutral")
    assert classes.match(" Entailment") == "entailment"
    assert classes.match("ent") == "entailment"  # a sub-word token of one label only
    assert classes.match("contra") == "contradiction"
    assert classes.match("n") is None and classes.match("e") is None  # too short
    assert classes.match("maybe") is None and classes.match("  ") is None


@pytest.mark.anyio
async def test_logprobs_rung_reads_label_probabilities(fake: FakeUpstream) -> None:
    pool = Pool()
    async with UpstreamClient([make_upstream(fake)]) as client:
        s = scorer(client, pool)
        conf = await run(s, BANK, TARGETS)
    info = s.info()
    assert info["rung"] == "chat_logprobs" and info["seed_accepted"] is True
    assert info["probe_calls"] == 1 and info["calls"] == len(TARGETS) + 1
    assert info["targets"] == info["distinct_prompts"] == len(TARGETS)
    assert info["prompt_tokens"] > 0 and info["completion_tokens"] >= len(TARGETS)
    assert info["unmatched"] == 0 and info["label_classes"] == len(LABELS)

    sent = by_target(pool, scoring_requests(fake))
    assert sorted(sent) == TARGETS
    expected = []
    for t in TARGETS:
        (request,) = sent[t]
        body = request.body
        assert body["temperature"] == 0 and body["max_tokens"] == 5 and body["seed"] == SEED
        assert body["logprobs"] is True and body["top_logprobs"] == 5
        expected.append(label_reading(body["messages"]))
        # every bank item fits the default budget: demos nearest-last by plain cosine
        order = pool.nearest_first(t)[::-1]
        demo_inputs = [m["content"] for m in body["messages"][:-1] if m["role"] == "user"]
        assert demo_inputs == [pool.rows[p].input for p in order]
    assert conf.shape == (len(TARGETS),)
    np.testing.assert_allclose(conf, expected, rtol=1e-9)
    assert np.all((conf >= 1 / len(LABELS)) & (conf <= 1))
    assert len(set(np.round(conf, 9))) > 3  # the fake's certainty varies with the overlap


@pytest.mark.anyio
async def test_without_labels_the_first_token_probability(fake: FakeUpstream) -> None:
    pool = Pool()
    async with UpstreamClient([make_upstream(fake)]) as client:
        s = scorer(client, pool, labels=())
        conf = await run(s, BANK, TARGETS)
    sent = by_target(pool, scoring_requests(fake))
    expected = [answer_distribution(sent[t][0].body["messages"])[0][1] for t in TARGETS]
    np.testing.assert_allclose(conf, expected, rtol=1e-9)
    assert s.info()["label_classes"] == 0


@pytest.mark.anyio
async def test_token_budget_keeps_the_nearest_demos(fake: FakeUpstream) -> None:
    pool = Pool()
    target = 7
    lengths = {p: approx_tokens(pool.rows[p].input) + approx_tokens(pool.rows[p].output or "")
               for p in BANK}  # fmt: skip
    nearest = pool.nearest_first(target)
    budget = approx_tokens(pool.rows[target].input) + lengths[nearest[0]] + lengths[nearest[1]]
    async with UpstreamClient([make_upstream(fake)]) as client:
        await run(scorer(client, pool, max_total_tokens=budget), BANK, [target])
        (request,) = scoring_requests(fake)
        demos = [m["content"] for m in request.body["messages"][:-1] if m["role"] == "user"]
        assert demos == [pool.rows[nearest[1]].input, pool.rows[nearest[0]].input]
        fake.reset()
        # a per-example limit below every demo's length leaves the prompt without demos
        await run(scorer(client, pool, max_example_tokens=1), BANK, [target])
        bodies = [r.body for r in fake.requests if r.body.get("max_tokens") == 5]
        assert [m["role"] for m in bodies[0]["messages"]] == ["user"]


@pytest.mark.anyio
async def test_sampling_rung_with_n(fake: FakeUpstream) -> None:
    fake.logprobs_enabled = False
    pool = Pool()
    async with UpstreamClient([make_upstream(fake)]) as client:
        s = scorer(client, pool)
        conf = await run(s, BANK, TARGETS)
    info = s.info()
    assert info["rung"] == "sampling" and info["n_parameter"] is True
    assert info["probe_calls"] == 2 and info["calls"] == len(TARGETS) + 2
    sent = by_target(pool, scoring_requests(fake))
    expected = []
    for t in TARGETS:
        (request,) = sent[t]
        body = request.body
        assert body["n"] == 5 and body["temperature"] == 1 and "logprobs" not in body
        answers = [sample_answer(body["messages"], SEED, i) for i in range(5)]
        expected.append(Counter(answers).most_common(1)[0][1] / 5)
    np.testing.assert_allclose(conf, expected)
    assert len(set(expected)) > 1


@pytest.mark.anyio
async def test_sampling_rung_without_n_makes_separate_seeded_calls(fake: FakeUpstream) -> None:
    fake.logprobs_enabled = False
    fake.n_enabled = False
    pool = Pool()
    targets = TARGETS[:6]
    async with UpstreamClient([make_upstream(fake)]) as client:
        s = scorer(client, pool, labels=())
        conf = await run(s, BANK, targets)
    info = s.info()
    assert info["rung"] == "sampling" and info["n_parameter"] is False
    assert info["calls"] == 5 * len(targets) + 2
    sent = by_target(pool, scoring_requests(fake))
    for t, value in zip(targets, conf, strict=True):
        bodies = [r.body for r in sent[t]]
        assert sorted(b["seed"] for b in bodies) == [SEED + i for i in range(5)]
        assert all("n" not in b for b in bodies)
        answers = [sample_answer(b["messages"], b["seed"], 0) for b in bodies]
        assert math.isclose(value, Counter(answers).most_common(1)[0][1] / 5)


@pytest.mark.anyio
async def test_unlabeled_bank_fails_before_any_call(fake: FakeUpstream) -> None:
    pool = Pool(unlabeled=[1, 3])
    async with UpstreamClient([make_upstream(fake)]) as client:
        s = scorer(client, pool)
        with pytest.raises(UnlabeledBank) as caught:
            await run(s, BANK, TARGETS)
    assert caught.value.ids == [101, 103]
    assert "ids [101, 103]" in caught.value.message and "PATCH" in caught.value.message
    assert fake.requests == []


@pytest.mark.anyio
async def test_a_failing_call_fails_the_scoring(fake: FakeUpstream) -> None:
    pool = Pool()
    async with UpstreamClient([make_upstream(fake, max_retries=0)]) as client:
        s = scorer(client, pool)
        assert await anyio.to_thread.run_sync(s.probe) == "chat_logprobs"
        fake.set_fault("status", code=400, message="context too long", times=None)
        with pytest.raises(ConfidenceFailed, match=r"confidence call failed.*context too long"):
            await run(s, BANK, TARGETS)


@pytest.mark.anyio
async def test_progress_is_reported_and_raising_stops_the_calls(
    fake: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(confidence_module, "PROGRESS_INTERVAL", 0.05)
    pool = Pool()
    reports: list[tuple[int, int]] = []

    def record(done: int, total: int) -> None:
        reports.append((done, total))

    async with UpstreamClient([make_upstream(fake)]) as client:
        await run(scorer(client, pool, progress=record, concurrency=3), BANK, TARGETS)
        assert reports[-1] == (len(TARGETS), len(TARGETS))
        assert [d for d, _ in reports] == sorted(d for d, _ in reports)

        class Stop(Exception):
            pass

        def stop(done: int, total: int) -> None:
            raise Stop

        fake.reset()
        fake.set_fault("latency", seconds=0.05, times=None)
        s = scorer(client, pool, progress=stop, concurrency=2)
        with pytest.raises(Stop):
            await run(s, BANK, TARGETS)
        assert len(scoring_requests(fake)) < len(TARGETS)
