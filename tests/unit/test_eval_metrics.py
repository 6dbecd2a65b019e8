"""Quality-harness metrics (`app/evaluation/metrics.py`) against scikit-learn and brute-force
oracles: answer mapping, accuracy, macro-F1 and the paired percentile bootstrap."""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
import pytest
from sklearn.metrics import f1_score

from app.evaluation.metrics import UNMAPPED, accuracy, bootstrap_interval, macro_f1, map_answer
from app.llm.scoring import normalize_answer

SENTIMENT = ["positive", "negative"]
TOPICS = ["business", "entertainment", "politics", "sports", "tech"]


def _ints(values: Sequence[int]) -> np.ndarray:
    return np.asarray(values, dtype=np.int64)


def _random_case(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int]:
    """Gold drawn from a random subset of the labels (so some labels occur only among the
    predictions, or nowhere), predictions from all labels plus UNMAPPED."""
    n_labels = int(rng.integers(2, 7))
    items = int(rng.integers(1, 41))
    gold_labels = rng.choice(n_labels, size=int(rng.integers(1, n_labels + 1)), replace=False)
    gold = rng.choice(gold_labels, size=items).astype(np.int64)
    predicted = rng.integers(UNMAPPED, n_labels, size=items).astype(np.int64)
    # Some cases are mostly right, so high scores are covered as well as chance-level ones.
    right = rng.random(items) < rng.random()
    predicted[right] = gold[right]
    return gold, predicted, n_labels


def _brute_macro_f1(gold: Sequence[int], predicted: Sequence[int]) -> float:
    """Per-label counts over the labels occurring in gold or predictions (UNMAPPED excluded)."""
    labels = sorted((set(gold) | set(predicted)) - {UNMAPPED})
    if not labels:
        return 0.0
    total = 0.0
    for label in labels:
        tp = sum(1 for g, p in zip(gold, predicted, strict=True) if g == label and p == label)
        fp = sum(1 for g, p in zip(gold, predicted, strict=True) if g != label and p == label)
        fn = sum(1 for g, p in zip(gold, predicted, strict=True) if g == label and p != label)
        total += 2 * tp / (2 * tp + fp + fn)
    return total / len(labels)


def _brute_accuracy(gold: Sequence[int], predicted: Sequence[int]) -> float:
    return sum(1 for g, p in zip(gold, predicted, strict=True) if g == p) / len(gold)


# --- macro-F1 ---------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(8))
def test_macro_f1_matches_sklearn_on_random_cases(seed: int) -> None:
    rng = np.random.default_rng(seed)
    with_unmapped = with_absent_gold = 0
    for _ in range(60):
        gold, predicted, n_labels = _random_case(rng)
        labels = sorted((set(gold.tolist()) | set(predicted.tolist())) - {UNMAPPED})
        want = f1_score(gold, predicted, labels=labels, average="macro", zero_division=0)
        got = macro_f1(gold, predicted, n_labels)
        assert got == pytest.approx(float(want), abs=1e-12), (gold, predicted)
        assert got == pytest.approx(_brute_macro_f1(gold.tolist(), predicted.tolist()), abs=1e-12)
        with_unmapped += bool(np.any(predicted == UNMAPPED))
        with_absent_gold += bool(set(predicted.tolist()) - set(gold.tolist()) - {UNMAPPED})
    # The random cases really exercise the two special cases.
    assert with_unmapped > 10
    assert with_absent_gold > 10


def test_macro_f1_unmapped_is_a_miss_but_no_false_positive() -> None:
    gold = _ints([0, 0, 1, 1])
    predicted = _ints([0, UNMAPPED, 1, 1])
    # label 0: tp 1, fn 1 -> 2/3; label 1: tp 2 -> 1.0
    assert macro_f1(gold, predicted, 2) == pytest.approx((2 / 3 + 1.0) / 2, abs=1e-12)
    assert macro_f1(gold, _ints([UNMAPPED] * 4), 2) == 0.0


def test_macro_f1_counts_a_label_seen_only_among_predictions() -> None:
    gold = _ints([0, 0, 0, 0])
    predicted = _ints([0, 0, 0, 2])
    # label 0: 2*3/(6+0+1) = 6/7; label 2: 0 (one false positive); label 1 never occurs.
    assert macro_f1(gold, predicted, 3) == pytest.approx((6 / 7 + 0.0) / 2, abs=1e-12)
    assert macro_f1(gold, gold.copy(), 3) == 1.0


# --- accuracy ---------------------------------------------------------------------------------


def test_accuracy_of_nothing_is_zero() -> None:
    assert accuracy(_ints([]), _ints([])) == 0.0


def test_accuracy_matches_the_share_of_equal_items() -> None:
    rng = np.random.default_rng(3)
    for _ in range(50):
        gold, predicted, _ = _random_case(rng)
        got = accuracy(gold, predicted)
        assert isinstance(got, float)
        assert got == pytest.approx(_brute_accuracy(gold.tolist(), predicted.tolist()), abs=1e-12)
        assert got == pytest.approx(float(np.mean(gold == predicted)), abs=1e-12)


# --- bootstrap --------------------------------------------------------------------------------


def _bootstrap_oracle(
    gold: np.ndarray, predicted: np.ndarray, *, resamples: int, seed: int, level: float
) -> dict[str, tuple[float, float]]:
    """Literal paired bootstrap: one draw of items per resample (the same RNG draws as the
    module), shared by every seed; per-seed scores by brute force, averaged over seeds."""
    seeds, items = predicted.shape
    draws = np.random.default_rng(seed).integers(0, items, size=(resamples, items))
    accs: list[float] = []
    f1s: list[float] = []
    for r in range(resamples):
        drawn = [int(i) for i in draws[r]]
        g = [int(gold[i]) for i in drawn]
        acc_sum = f1_sum = 0.0
        for s in range(seeds):
            p = [int(predicted[s][i]) for i in drawn]
            acc_sum += _brute_accuracy(g, p)
            f1_sum += _brute_macro_f1(g, p)
        accs.append(acc_sum / seeds)
        f1s.append(f1_sum / seeds)
    tail = (1.0 - level) / 2 * 100
    return {
        "accuracy": (float(np.percentile(accs, tail)), float(np.percentile(accs, 100 - tail))),
        "macro_f1": (float(np.percentile(f1s, tail)), float(np.percentile(f1s, 100 - tail))),
    }


@pytest.mark.parametrize(("case", "level"), [(0, 0.95), (1, 0.95), (2, 0.9), (3, 0.5)])
def test_bootstrap_interval_matches_a_literal_resampling_loop(case: int, level: float) -> None:
    rng = np.random.default_rng(100 + case)
    n_labels = 3 + case % 2
    items = 25 + 5 * case
    seeds = 1 + case
    # The last label never occurs among the gold labels, only among the predictions.
    gold = rng.integers(0, n_labels - 1, size=items).astype(np.int64)
    predicted = np.stack(
        [
            np.where(rng.random(items) < 0.6, gold, rng.integers(UNMAPPED, n_labels, size=items))
            for _ in range(seeds)
        ]
    ).astype(np.int64)
    predicted[0, :3] = [UNMAPPED, n_labels - 1, UNMAPPED]
    got = bootstrap_interval(gold, predicted, n_labels, resamples=200, seed=case, level=level)
    want = _bootstrap_oracle(gold, predicted, resamples=200, seed=case, level=level)
    assert set(got) == {"accuracy", "macro_f1"}
    for metric in ("accuracy", "macro_f1"):
        assert got[metric] == pytest.approx(want[metric], abs=1e-12), metric
        assert all(isinstance(bound, float) for bound in got[metric])


def test_bootstrap_all_correct_is_certain() -> None:
    gold = np.random.default_rng(5).integers(0, 4, size=40).astype(np.int64)
    predicted = np.stack([gold, gold, gold])
    got = bootstrap_interval(gold, predicted, 4, resamples=300)
    assert got == {"accuracy": (1.0, 1.0), "macro_f1": (1.0, 1.0)}


def test_bootstrap_interval_contains_the_point_estimate() -> None:
    rng = np.random.default_rng(11)
    n_labels, items = 3, 200
    gold = rng.integers(0, n_labels, size=items).astype(np.int64)
    predicted = np.stack(
        [
            np.where(rng.random(items) < 0.7, gold, rng.integers(UNMAPPED, n_labels, size=items))
            for _ in range(3)
        ]
    ).astype(np.int64)
    point_acc = float(np.mean([accuracy(gold, row) for row in predicted]))
    point_f1 = float(np.mean([macro_f1(gold, row, n_labels) for row in predicted]))
    got = bootstrap_interval(gold, predicted, n_labels)
    lo, hi = got["accuracy"]
    assert lo < point_acc < hi
    assert hi - lo < 0.2
    lo, hi = got["macro_f1"]
    assert lo < point_f1 < hi
    assert hi - lo < 0.2


def test_bootstrap_is_seeded_and_paired() -> None:
    rng = np.random.default_rng(21)
    gold = rng.integers(0, 2, size=60).astype(np.int64)
    row = np.where(rng.random(60) < 0.65, gold, 1 - gold).astype(np.int64)
    one = bootstrap_interval(gold, row[None, :], 2, resamples=300, seed=4)
    # Identical seeds see identical draws, so repeating a seed's answers changes nothing.
    assert bootstrap_interval(gold, np.stack([row, row]), 2, resamples=300, seed=4) == one
    assert bootstrap_interval(gold, row[None, :], 2, resamples=300, seed=4) == one
    assert bootstrap_interval(gold, row[None, :], 2, resamples=300, seed=5) != one


# --- map_answer -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "labels", "want"),
    [
        # rule 1: the normalised answer is a label, or its first word is one label's
        ("positive", SENTIMENT, "positive"),
        ("Positive.", SENTIMENT, "positive"),
        ("  NEGATIVE!  ", SENTIMENT, "negative"),
        ("negative sentiment", SENTIMENT, "negative"),
        ("tech", TOPICS, "tech"),
        ("Not entailment.", ["entailment", "not entailment"], "not entailment"),
        ("entailment", ["entailment", "not entailment"], "entailment"),
        ("not really", ["not entailment", "not sure"], None),
        # Rule 1 applies first: a first word that is a label decides, whatever follows.
        ("positive or negative", SENTIMENT, "positive"),
        # rule 2: a trailing "s" added or removed
        ("sport", TOPICS, "sports"),
        ("Sport news", TOPICS, "sports"),
        ("sports", ["sport", "weather"], "sport"),
        # rule 3: exactly one label as a whole word in the (normalised) first line
        ("The sentiment of this review is positive", SENTIMENT, "positive"),
        ("The review is clearly NEGATIVE", SENTIMENT, "negative"),
        ("I would say: tech", TOPICS, "tech"),
        ("This is about politics\nor maybe business", TOPICS, "politics"),
        ("The label is positive", ["Positive", "Negative"], "Positive"),
        ("The review is positive or negative", SENTIMENT, None),
        ("It mixes business and politics", TOPICS, None),
        # nothing to go on
        ("", SENTIMENT, None),
        ("   \n  ", SENTIMENT, None),
        ("I cannot tell", SENTIMENT, None),
        ("neutral", SENTIMENT, None),
        # whole words only: a label inside a longer word is no mention
        ("technical stuff", ["tech", "business"], None),
        ("It is about technology", ["tech", "business"], None),
        ("A businesslike tone", ["tech", "business"], None),
        ("The text is positively glowing", SENTIMENT, None),
        ("This is about tech", ["tech", "business"], "tech"),
        # only the first line counts for rule 3
        ("I am not sure\nnegative", SENTIMENT, None),
    ],
)
def test_map_answer_rules(answer: str, labels: list[str], want: str | None) -> None:
    assert map_answer(answer, labels) == want


_WORDS = [
    "the",
    "review",
    "is",
    "about",
    "a",
    "not",
    "very",
    "maybe",
    "story",
    "positive",
    "positives",
    "negative",
    "sport",
    "sports",
    "tech",
    "technical",
    "business",
    "news",
    "new",
    "world",
    "entailment",
]
_LABEL_SETS = [
    SENTIMENT,
    TOPICS,
    ["Sports", "World", "Business", "Sci Tech"],
    ["entailment", "not entailment"],
    ["new", "old"],
    ["news", "weather", "sport"],
]


def _map_answer_oracle(answer: str, labels: Sequence[str]) -> str | None:
    """The module docstring's three rules, written from the text with word lists instead of
    regular expressions (the normalisation is the scorer's, by definition)."""
    said = normalize_answer(answer)
    if not said:
        return None
    words = said.split()
    norms = [(label, normalize_answer(label)) for label in labels]
    # rule 1
    for label, norm in norms:
        if norm == said:
            return label
    owners = {norm for _, norm in norms if norm.split()[:1] == words[:1]}
    if len(owners) == 1:
        (owner,) = owners
        return next(label for label, norm in norms if norm == owner)
    # rule 2 (the first word itself also counts: a label it equals but shares its first word
    # with another label, so that rule 1 could not decide)
    first = words[0]
    plural = [label for label, norm in norms if first in (norm, norm + "s") or norm == first + "s"]
    if len(plural) == 1:
        return plural[0]
    # rule 3
    found = []
    for label, norm in norms:
        target = norm.split()
        n = len(target)
        if target and any(words[i : i + n] == target for i in range(len(words) - n + 1)):
            found.append(label)
    return found[0] if len(found) == 1 else None


def test_map_answer_matches_a_word_list_oracle() -> None:
    rng = random.Random(7)
    decided = 0
    for _ in range(3000):
        labels = rng.choice(_LABEL_SETS)
        words = [rng.choice(_WORDS + [lab.lower() for lab in labels]) for _ in range(5)]
        words = words[: rng.randint(1, 5)]
        answer = " ".join(words)
        if rng.random() < 0.3:
            answer = answer.capitalize() + rng.choice([".", "!", "\nsecond line", ""])
        got = map_answer(answer, labels)
        assert got == _map_answer_oracle(answer, labels), (answer, labels)
        decided += got is not None
    assert 500 < decided < 2900
