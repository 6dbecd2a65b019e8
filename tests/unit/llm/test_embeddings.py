"""OpenAIEmbedder against the fake upstream's /v1/embeddings."""

from __future__ import annotations

import socket

import numpy as np
import pytest

from app.llm.embeddings import EmbeddingServiceError, OpenAIEmbedder
from retrievers.base import Embedder
from tests.fakes.upstream import FakeUpstream, embed_text

KEY = "sk-embed-canary-42424242"
TEXTS = ["the cat sat", "a dog barked", "the cat sat on the mat", "rain again", "sun"]


def test_embeds_in_input_order_with_unit_rows(fake: FakeUpstream) -> None:
    embedder = OpenAIEmbedder(fake.base_url, "emb-model", batch_size=2).open()
    try:
        as_protocol: Embedder = embedder  # mypy checks the structural match
        assert callable(as_protocol.embed)
        assert embedder.name == "openai:emb-model"
        assert embedder.dim == fake.embedding_dim  # probed by open()
        vectors = embedder.embed(TEXTS)
    finally:
        embedder.close()
    assert vectors.dtype == np.float32 and vectors.shape == (len(TEXTS), fake.embedding_dim)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    # The fake returns items in reverse order; the embedder must sort them by index.
    expected = np.array([embed_text(t, fake.embedding_dim) for t in TEXTS], dtype=np.float32)
    np.testing.assert_allclose(vectors, expected, atol=1e-6)
    bodies = [r.body for r in fake.requests]
    assert len(bodies) == 1 + 3  # the probe, then batches of 2, 2, 1
    assert [b["input"] for b in bodies[1:]] == [TEXTS[0:2], TEXTS[2:4], TEXTS[4:5]]
    assert all(b["model"] == "emb-model" for b in bodies)
    assert "authorization" not in fake.requests[0].headers


def test_given_dim_skips_the_probe_and_empty_input(fake: FakeUpstream) -> None:
    embedder = OpenAIEmbedder(fake.base_url, "emb", dim=fake.embedding_dim)
    assert embedder.embed([]).shape == (0, fake.embedding_dim)
    assert embedder.embed(["one text"]).shape == (1, fake.embedding_dim)
    embedder.close()
    assert len(fake.requests) == 1


def test_cookies_the_service_sets_are_never_sent_back(fake: FakeUpstream) -> None:
    fake.response_headers = [("set-cookie", "session=first-upload; Path=/")]
    embedder = OpenAIEmbedder(fake.base_url, "emb", batch_size=1).open()
    try:
        embedder.embed(TEXTS[:3])
    finally:
        embedder.close()
    assert len(fake.requests) == 1 + 3
    assert all("cookie" not in request.headers for request in fake.requests)


def test_dimension_mismatch_is_an_error(fake: FakeUpstream) -> None:
    embedder = OpenAIEmbedder(fake.base_url, "emb", dim=16)
    with pytest.raises(EmbeddingServiceError, match="expected 16"):
        embedder.embed(["x"])
    embedder.close()


def test_5xx_is_retried(fake: FakeUpstream) -> None:
    fake.set_fault("status", code=503, times=1)
    embedder = OpenAIEmbedder(fake.base_url, "emb", dim=fake.embedding_dim)
    assert embedder.embed(["x"]).shape == (1, fake.embedding_dim)
    embedder.close()
    assert len(fake.requests) == 2


def test_retries_are_bounded(fake: FakeUpstream) -> None:
    fake.set_fault("status", code=429, retry_after=0)
    embedder = OpenAIEmbedder(fake.base_url, "emb", dim=8, max_retries=2)
    with pytest.raises(EmbeddingServiceError, match="HTTP 429"):
        embedder.embed(["x"])
    embedder.close()
    assert len(fake.requests) == 3


def test_key_is_sent_and_never_in_errors() -> None:
    with FakeUpstream(api_key=KEY) as fake:
        good = OpenAIEmbedder(fake.base_url, "emb", api_key=KEY).open()
        assert good.dim == fake.embedding_dim
        assert fake.requests[-1].headers["authorization"] == f"Bearer {KEY}"
        fake.set_fault("status", code=400, message=f"input too long for key {KEY}", times=1)
        with pytest.raises(EmbeddingServiceError) as rejected:
            good.embed(["x"])
        good.close()
        assert "input too long" in str(rejected.value)

        wrong = OpenAIEmbedder(fake.base_url, "emb", api_key="sk-wrong-wrong-wrong")
        with pytest.raises(EmbeddingServiceError) as denied:
            wrong.open()  # the probe call fails with 401, which echoes the key
        assert "authentication failed" in str(denied.value)
    for error in (rejected.value, denied.value):
        assert KEY not in str(error) and "sk-wrong" not in str(error)


def test_unreachable_service() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
        embedder = OpenAIEmbedder(url, "emb", max_retries=0)
        with pytest.raises(EmbeddingServiceError, match="unreachable"):
            embedder.open()
