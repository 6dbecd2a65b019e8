from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from retrievers.hashing import HashingEmbedder

REPO = Path(__file__).resolve().parents[3]

# HashingEmbedder(32).embed(["Hello, World!"]): slot -> sign, every entry +-1/sqrt(8).
# Hard-coded so that any change of hash, features or normalisation is caught: stored pool
# vectors would silently stop matching query vectors.
EXPECTED_HELLO_32 = {1: -1, 3: -1, 4: 1, 14: -1, 18: 1, 19: 1, 21: -1, 22: 1}


def expected_hello() -> np.ndarray:
    vec = np.zeros(32)
    for slot, sign in EXPECTED_HELLO_32.items():
        vec[slot] = sign / np.sqrt(8)
    return vec


def test_shape_dtype_name() -> None:
    emb = HashingEmbedder(64)
    out = emb.embed(["a b c", "d", ""])
    assert out.shape == (3, 64)
    assert out.dtype == np.float32
    assert out.flags.c_contiguous
    assert emb.name == "hash-64"
    assert emb.dim == 64
    assert HashingEmbedder().dim == 256
    assert HashingEmbedder().name == "hash-256"


def test_empty_batch() -> None:
    out = HashingEmbedder(16).embed([])
    assert out.shape == (0, 16)
    assert out.dtype == np.float32


def test_rows_have_unit_norm() -> None:
    texts = [
        "",
        "   ",
        "!!!",
        "x",
        "The quick brown fox",
        "naïve café ÜBER",
        "数学 と 言語",
        "a" * 500,
    ]
    out = HashingEmbedder(128).embed(texts)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)


def test_text_without_words_is_e0() -> None:
    out = HashingEmbedder(8).embed(["", "?!", " \n"])
    for row in out:
        np.testing.assert_array_equal(row, np.eye(8, dtype=np.float32)[0])


def test_matches_hard_coded_value() -> None:
    out = HashingEmbedder(32).embed(["Hello, World!"])[0]
    np.testing.assert_allclose(out, expected_hello(), atol=1e-6)


def test_lower_cases_and_ignores_punctuation() -> None:
    emb = HashingEmbedder(64)
    a, b = emb.embed(["Hello, World!", "hello world"])
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("seed", ["0", "1", "12345"])
def test_independent_of_python_hash_seed(seed: str) -> None:
    code = (
        "import json; from retrievers.hashing import HashingEmbedder;"
        "print(json.dumps(HashingEmbedder(32).embed(['Hello, World!'])[0].tolist()))"
    )
    env = {**os.environ, "PYTHONHASHSEED": seed}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True
    )
    got = np.array(json.loads(done.stdout))
    np.testing.assert_allclose(got, expected_hello(), atol=1e-6)


def test_deterministic_within_process() -> None:
    texts = ["same text twice", "other words"]
    np.testing.assert_array_equal(
        HashingEmbedder(64).embed(texts), HashingEmbedder(64).embed(texts)
    )


def test_texts_sharing_words_are_closer() -> None:
    emb = HashingEmbedder(256)
    query, related, unrelated = emb.embed(
        [
            "how do I reset my account password",
            "steps to reset a forgotten password",
            "the weather in paris is sunny today",
        ]
    )
    assert float(query @ related) > float(query @ unrelated) + 0.1


def test_word_pieces_make_inflections_close() -> None:
    emb = HashingEmbedder(256)
    a, b, c = emb.embed(["running", "runner", "banana"])
    assert float(a @ b) > float(a @ c)


def test_rejects_bad_dim() -> None:
    with pytest.raises(ValueError):
        HashingEmbedder(0)
