"""Answer-to-label mapping, accuracy, macro-F1 and paired bootstrap intervals.

Mapping rules (first that applies; an answer no rule maps counts as wrong):

1. `answer_to_label` of the preset scorer (`app/llm/scoring.py`): the normalised answer equals
   a normalised label, or its first word is the first word of exactly one label;
2. its first word is a label with a trailing "s" added or removed ("sport" for "sports");
3. exactly one label occurs as a whole word (or phrase) in the normalised answer, that is
   its first line up to the first '.' ("The sentiment of this review is positive"). Two
   labels found decide nothing.

Macro-F1 averages the per-label F1 over the labels that occur among the gold labels or the
predictions of the sample (scikit-learn's `f1_score(average="macro", zero_division=0)` with
that label list); an unmapped answer is a miss for its gold label and no one's false positive.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

from app.llm.scoring import answer_to_label, normalize_answer

__all__ = [
    "UNMAPPED",
    "accuracy",
    "bootstrap_interval",
    "macro_f1",
    "map_answer",
]

UNMAPPED = -1


def map_answer(answer: str, labels: Sequence[str]) -> str | None:
    """The label an LLM answer stands for under the module's rules, or None."""
    found = answer_to_label(answer, labels)
    if found is not None:
        return found
    said = normalize_answer(answer)
    if not said:
        return None
    first = said.split()[0]
    variants = {first, first + "s", first.removesuffix("s")}
    by_variant = [label for label in labels if normalize_answer(label) in variants]
    if len(by_variant) == 1:
        return by_variant[0]
    mentioned = [
        label
        for label in labels
        if (norm := normalize_answer(label))
        and re.search(rf"(?<!\w){re.escape(norm)}(?!\w)", said) is not None
    ]
    return mentioned[0] if len(mentioned) == 1 else None


def accuracy(gold: NDArray[np.int64], predicted: NDArray[np.int64]) -> float:
    return float(np.mean(gold == predicted)) if gold.size else 0.0


def _macro_f1_rows(
    gold: NDArray[np.int64], predicted: NDArray[np.int64], n_labels: int
) -> NDArray[np.float64]:
    """Macro-F1 of every row of (rows, items) label-index matrices."""
    total = np.zeros(gold.shape[0])
    present = np.zeros(gold.shape[0])
    for label in range(n_labels):
        is_gold = gold == label
        is_pred = predicted == label
        tp = np.sum(is_gold & is_pred, axis=1)
        fp = np.sum(~is_gold & is_pred, axis=1)
        fn = np.sum(is_gold & ~is_pred, axis=1)
        denominator = 2 * tp + fp + fn
        occurs = denominator > 0
        total += np.where(occurs, 2 * tp / np.maximum(denominator, 1), 0.0)
        present += occurs
    return np.where(present > 0, total / np.maximum(present, 1), 0.0)


def macro_f1(gold: NDArray[np.int64], predicted: NDArray[np.int64], n_labels: int) -> float:
    return float(_macro_f1_rows(gold[None, :], predicted[None, :], n_labels)[0])


def bootstrap_interval(
    gold: NDArray[np.int64],
    predicted: NDArray[np.int64],
    n_labels: int,
    *,
    resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals of accuracy and macro-F1, averaged over seeds.

    `predicted` is (seeds, items): every seed answered the same test items. Each resample
    draws items with replacement and uses the same draw for every seed (a paired design), so
    the interval reflects which test items were drawn, and the seed average stays an average
    over the same items.
    """
    seeds, items = predicted.shape
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, items, size=(resamples, items))
    gold_draws = gold[draws]
    acc = np.zeros(resamples)
    f1 = np.zeros(resamples)
    for s in range(seeds):
        pred_draws = predicted[s][draws]
        acc += np.mean(gold_draws == pred_draws, axis=1)
        f1 += _macro_f1_rows(gold_draws, pred_draws, n_labels)
    acc /= seeds
    f1 /= seeds
    tail = (1.0 - level) / 2 * 100
    return {
        "accuracy": (float(np.percentile(acc, tail)), float(np.percentile(acc, 100 - tail))),
        "macro_f1": (float(np.percentile(f1, tail)), float(np.percentile(f1, 100 - tail))),
    }
