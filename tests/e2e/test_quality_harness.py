"""The quality harness measured against upstreams whose accuracy is known in advance.

An answer key must score 100% in every configuration, a constant answer must score exactly
the class prior of the test split, and a resumed run must not ask the model again. Then the
documented stand-in command runs end to end on a slice of Rotten Tomatoes through a real
iclserve, and every output says "stand-in".
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app.evaluation.datasets import load_jsonl
from app.evaluation.harness import EvalSettings, configurations, run_protocol, split
from app.evaluation.report import STAND_IN_BANNER, summarize
from tests.datasets import topic_rows, write_jsonl
from tests.fakes.scripted import ScriptedUpstream

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
TEST_SIZE = 30
BUDGETS = (6, 15)
SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("quality")
    return load_jsonl(write_jsonl(root / "topics.jsonl", topic_rows(200, seed=5)), name="topics")


@pytest.fixture(scope="module")
def upstream(dataset: Any) -> Iterator[ScriptedUpstream]:
    gold = {item.text: item.label for item in dataset.items}
    constant = dataset.labels[0]

    def answer(model: str, messages: list[dict[str, Any]]) -> str:
        query = str(messages[-1]["content"])
        if model == "answer-key":
            return f"{gold[query].capitalize()}."
        return constant

    with ScriptedUpstream(answer, models=("answer-key", "constant")) as served:
        yield served


def _settings(model: str, upstream: ScriptedUpstream) -> EvalSettings:
    return EvalSettings(
        model=model,
        upstream_base_url=upstream.base_url,
        test_size=TEST_SIZE,
        pool_size=120,
        unlabeled_size=120,
        k=3,
        budgets=BUDGETS,
        seeds=SEEDS,
        ease_validation=5,
        ease_budget=20,
        ease_params={"n_init": 2, "batches": 2, "samples_per_batch": 200, "keep_per_batch": 10},
        concurrency=4,
    )


def _meta(settings: EvalSettings) -> dict[str, Any]:
    return {
        "model": settings.model,
        "date": "-",
        "command": "-",
        "machine": {},
        "settings": settings.public(),
    }


def test_answer_key_scores_everything_right_and_resumes_without_calls(
    dataset: Any, upstream: ScriptedUpstream, tmp_path: Path
) -> None:
    settings = _settings("answer-key", upstream)
    answers = run_protocol(settings, [dataset], tmp_path, log=lambda _: None)
    report = summarize(answers, _meta(settings))
    results = {r["config"]: r for r in report["datasets"]["topics"]["results"]}
    assert list(results) == [c.name for c in configurations(BUDGETS)]
    for name, r in results.items():
        assert r["items"] == TEST_SIZE and not r["partial"], name
        assert r["accuracy"] == 1.0 and r["macro_f1"] == 1.0, name
        assert r["accuracy_ci95"] == [1.0, 1.0], name
        assert r["unmapped_rate"] == 0.0, name
        seeded = configurations(BUDGETS, {name})[0].seeded
        assert r["seeds"] == (list(SEEDS) if seeded else [0]), name
    # the two-step protocol: each subset's demonstrations come from its own members only
    records = [json.loads(line) for line in answers.read_text().splitlines()]
    members = {
        (r["config"], r["seed"]): r["members"]
        for r in records
        if r["type"] == "setup" and "members" in r
    }
    assert {c for c, _ in members} == {c.name for c in configurations(BUDGETS, {"subsets"})}
    by_key = {item.key: item for item in dataset.items}
    for r in records:
        if r["type"] == "answer" and r["config"].startswith("subset_"):
            budget = int(r["config"].rsplit("_", 1)[1])
            chosen = members[(r["config"], r["seed"])]
            assert len(chosen) == budget
            assert len(r["demonstrations"]) == settings.k
            assert all(k in by_key for k in chosen)
    assert results["ease"]["search"]["calls"] > 0

    calls = upstream.chat_calls()
    run_protocol(settings, [dataset], tmp_path, resume=True, log=lambda _: None)
    assert upstream.chat_calls() == calls


def test_constant_answer_scores_the_class_prior(
    dataset: Any, upstream: ScriptedUpstream, tmp_path: Path
) -> None:
    settings = _settings("constant", upstream)
    settings.configs = {"zero_shot", "knn_last", "subset_votek"}
    answers = run_protocol(settings, [dataset], tmp_path, log=lambda _: None)
    report = summarize(answers, _meta(settings))
    test = split(dataset, TEST_SIZE, settings.split_seed).test
    n_constant = sum(item.label == dataset.labels[0] for item in test)
    prior = n_constant / TEST_SIZE
    labels_in_test = len({item.label for item in test})
    f1 = 2 * n_constant / (TEST_SIZE + n_constant) / labels_in_test
    results = report["datasets"]["topics"]["results"]
    assert {r["config"] for r in results} == {
        "zero_shot",
        "knn_last",
        *(f"subset_votek_{b}" for b in BUDGETS),
    }
    for r in results:
        assert r["accuracy"] == pytest.approx(prior, abs=1e-12), r["config"]
        assert r["macro_f1"] == pytest.approx(f1, abs=1e-12), r["config"]
        assert r["accuracy_ci95"][0] <= prior <= r["accuracy_ci95"][1]


def test_stand_in_command_writes_table_json_and_chart(tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = subprocess.run(
        [
            sys.executable,
            "benchmarks/quality.py",
            "--stand-in",
            "--dataset",
            "rotten_tomatoes",
            "--out",
            str(out),
            "--test-size",
            "40",
            "--pool-size",
            "300",
            "--unlabeled-size",
            "300",
            "--ease-validation",
            "6",
            "--ease-budget",
            "24",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=800,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rotten_tomatoes knn_last" in done.stderr  # the progress bars
    markdown = (out / "report.md").read_text()
    assert STAND_IN_BANNER in markdown and "(stand-in)" in markdown
    report = json.loads((out / "report.json").read_text())
    assert report["stand_in"] is True and report["settings"]["stand_in"] is True
    results = report["datasets"]["rotten_tomatoes"]["results"]
    assert [r["config"] for r in results] == [c.name for c in configurations((18, 100))]
    for r in results:
        assert r["items"] == 40
        assert len(r["seeds"]) == (3 if configurations((18, 100), {r["config"]})[0].seeded else 1)
        assert r["title"] in markdown
    # The stand-in reads demonstrations by word overlap: with no demonstrations it cannot
    # answer, and kNN beats random demonstrations on this slice.
    by_name = {r["config"]: r for r in results}
    assert by_name["zero_shot"]["accuracy"] == 0.0
    assert by_name["knn_last"]["accuracy"] > by_name["random"]["accuracy"]
    png = (out / "report.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000


def _shared_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def test_prefix_order_groups_shared_demonstrations_without_changing_answers(
    dataset: Any, upstream: ScriptedUpstream, tmp_path: Path
) -> None:
    records = {}
    for ordered in (True, False):
        settings = _settings("answer-key", upstream)
        settings.configs = {"knn_last", "random", "subset_votek_6"}
        settings.seeds = (0,)
        settings.concurrency = 1
        settings.prefix_order = ordered
        answers = run_protocol(settings, [dataset], tmp_path / str(ordered), log=lambda _: None)
        records[ordered] = [
            r for r in map(json.loads, answers.read_text().splitlines()) if r["type"] == "answer"
        ]
    for config in settings.configs:
        asked = [r for r in records[True] if r["config"] == config]
        plain = [r for r in records[False] if r["config"] == config]
        # the same prompts and answers for every item, asked in another order
        assert sorted((r["key"], r["demonstrations"], r["answer"]) for r in asked) == sorted(
            (r["key"], r["demonstrations"], r["answer"]) for r in plain
        ), config
        assert [r["index"] for r in plain] == sorted(r["index"] for r in plain)
        sequence = [r["demonstrations"] for r in asked]
        assert sequence == sorted(sequence), config
        shared = sum(_shared_prefix(a, b) for a, b in itertools.pairwise(sequence))
        unsorted = [r["demonstrations"] for r in plain]
        assert shared >= sum(_shared_prefix(a, b) for a, b in itertools.pairwise(unsorted))
    # six demonstrations to draw from: sorting must make consecutive prompts share a prefix
    subset = [r["demonstrations"] for r in records[True] if r["config"] == "subset_votek_6"]
    assert sum(_shared_prefix(a, b) for a, b in itertools.pairwise(subset)) >= len(subset) - 6
