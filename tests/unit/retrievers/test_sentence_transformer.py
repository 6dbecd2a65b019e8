"""The default embedder with the real packaged all-MiniLM-L6-v2 (loads offline in seconds)."""

from __future__ import annotations

import numpy as np
import pytest

from retrievers.sentence_transformer import DEFAULT_MODEL_NAME, SentenceTransformerEmbedder


@pytest.fixture(scope="module")
def embedder() -> SentenceTransformerEmbedder:
    emb = SentenceTransformerEmbedder()
    emb.open()
    return emb


def test_constructor_does_not_load() -> None:
    emb = SentenceTransformerEmbedder("some/local-or-hub-model", batch_size=8)
    assert not emb.loaded
    assert emb.name == "some/local-or-hub-model"
    assert emb.batch_size == 8
    with pytest.raises(ValueError):
        SentenceTransformerEmbedder(batch_size=0)


def test_name_and_dim(embedder: SentenceTransformerEmbedder) -> None:
    assert embedder.loaded
    assert embedder.name == DEFAULT_MODEL_NAME == "sentence-transformers/all-MiniLM-L6-v2"
    assert embedder.dim == 384
    with pytest.raises(AttributeError):
        embedder.dim = 10


def test_shape_dtype_unit_norm(embedder: SentenceTransformerEmbedder) -> None:
    out = embedder.embed(["Hello world.", "A second, slightly longer sentence about cats.", ""])
    assert out.shape == (3, 384)
    assert out.dtype == np.float32
    assert out.flags.c_contiguous
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


def test_empty_input(embedder: SentenceTransformerEmbedder) -> None:
    out = embedder.embed([])
    assert out.shape == (0, 384)
    assert out.dtype == np.float32


def test_similar_sentences_are_closer(embedder: SentenceTransformerEmbedder) -> None:
    q, para, other = embedder.embed(
        [
            "How do I reset my password?",
            "I forgot my login password and need to change it.",
            "The stock market fell sharply on Tuesday.",
        ]
    )
    assert float(q @ para) > float(q @ other) + 0.2


def test_batch_and_single_agree(embedder: SentenceTransformerEmbedder) -> None:
    texts = ["short", "a considerably longer sentence that pads the batch a lot more"]
    batch = embedder.embed(texts)
    single = np.concatenate([embedder.embed([t]) for t in texts])
    np.testing.assert_allclose(batch, single, atol=1e-5)


def test_lazy_load_on_first_embed() -> None:
    emb = SentenceTransformerEmbedder()
    assert not emb.loaded
    assert emb.embed(["x"]).shape == (1, 384)
    assert emb.loaded
