"""A deterministic feature-hashing embedder: no weights, no model, for tests and tiny setups."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
from numpy.typing import NDArray

_WORD = re.compile(r"\w+")


def _slot(feature: str, dim: int) -> tuple[int, float]:
    # blake2b, not hash(): str hashes are salted per process (PYTHONHASHSEED), and stored pool
    # vectors must match query vectors embedded by a later process.
    h = int.from_bytes(hashlib.blake2b(feature.encode("utf-8"), digest_size=8).digest(), "little")
    return (h >> 1) % dim, 1.0 if h & 1 else -1.0


@lru_cache(maxsize=1 << 16)
def _word_features(word: str, dim: int) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Slots and signs of a word's unigram and its boundary-marked character 3-grams."""
    marked = f"<{word}>"
    features = [f"w:{word}"] + [f"c:{marked[i : i + 3]}" for i in range(len(marked) - 2)]
    slots = [_slot(f, dim) for f in features]
    return tuple(s for s, _ in slots), tuple(sign for _, sign in slots)


class HashingEmbedder:
    """Embeds text by signed feature hashing; deterministic across processes and machines.

    Features are the lower-cased words (`\\w+`) and the character 3-grams of each word with
    `<`/`>` boundary markers. Each feature is hashed with blake2b to a slot and a sign, the
    signed counts are summed and the vector is L2-normalised. A text with no word characters
    (e.g. "") maps to the unit vector e_0, so every row has unit norm. Texts that share words
    or word pieces score higher than unrelated texts. `name` is `hash-{dim}`. Stateless
    apart from a shared word cache, hence safe to call from many threads.
    """

    def __init__(self, dim: int = 256) -> None:
        if dim < 1:
            raise ValueError("dim must be positive")
        self.dim = dim
        self.name = f"hash-{dim}"

    def embed(self, texts: Sequence[str]) -> NDArray[np.float32]:
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            out[row] = self._embed_one(text)
        return out

    def _embed_one(self, text: str) -> NDArray[np.float64]:
        slots: list[int] = []
        signs: list[float] = []
        for word in _WORD.findall(text.lower()):
            word_slots, word_signs = _word_features(word, self.dim)
            slots.extend(word_slots)
            signs.extend(word_signs)
        counts = np.bincount(
            np.asarray(slots, dtype=np.intp), weights=np.asarray(signs), minlength=self.dim
        )
        vec = np.asarray(counts, dtype=np.float64)
        norm = float(np.linalg.norm(vec))
        if norm == 0.0:
            vec = np.zeros(self.dim)
            vec[0] = 1.0
            return vec
        return vec / norm
