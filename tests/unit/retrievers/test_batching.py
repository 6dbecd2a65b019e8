"""BatchingEmbedder: the same rows as its inner embedder, fewer calls under concurrency."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import numpy as np
import pytest
from numpy.typing import NDArray

from retrievers.batching import BatchingEmbedder
from retrievers.hashing import HashingEmbedder


class SlowRecorder:
    """HashingEmbedder rows, a fixed delay per call, and a record of every call's size."""

    def __init__(self, delay: float = 0.02, fail_on: str | None = None) -> None:
        self.inner = HashingEmbedder(dim=32)
        self.name = self.inner.name
        self.dim = self.inner.dim
        self.delay = delay
        self.fail_on = fail_on
        self.calls: list[int] = []
        self.active = 0
        self.most_active = 0
        self._lock = threading.Lock()

    def embed(self, texts: Sequence[str]) -> NDArray[np.float32]:
        with self._lock:
            self.calls.append(len(texts))
            self.active += 1
            self.most_active = max(self.most_active, self.active)
        try:
            time.sleep(self.delay)
            if self.fail_on is not None and self.fail_on in texts:
                raise RuntimeError("model failed")
            return self.inner.embed(texts)
        finally:
            with self._lock:
                self.active -= 1


def run_threads(target, count: int) -> None:  # type: ignore[no-untyped-def]
    threads = [threading.Thread(target=target, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
        assert not t.is_alive()


def test_concurrent_calls_get_their_own_rows_in_fewer_batches() -> None:
    inner = SlowRecorder()
    batcher = BatchingEmbedder(inner, max_batch=64)
    reference = HashingEmbedder(dim=32)
    results: dict[int, NDArray[np.float32]] = {}
    texts = {i: [f"query {i} part {j}" for j in range(1 + i % 3)] for i in range(24)}

    def work(i: int) -> None:
        results[i] = batcher.embed(texts[i])

    run_threads(work, 24)
    for i, rows in results.items():
        np.testing.assert_array_equal(rows, reference.embed(texts[i]))
    assert sum(inner.calls) == sum(len(t) for t in texts.values())
    assert len(inner.calls) < 24  # calls were joined
    assert inner.most_active == 1  # and never run concurrently
    assert batcher.batches == len(inner.calls)


def test_batches_respect_the_size_cap() -> None:
    inner = SlowRecorder()
    batcher = BatchingEmbedder(inner, max_batch=5)
    run_threads(lambda i: batcher.embed([f"t{i}a", f"t{i}b"]), 12)
    assert max(inner.calls) <= 5
    # A single call larger than the cap still runs, alone.
    assert batcher.embed([f"big {i}" for i in range(9)]).shape == (9, 32)
    assert inner.calls[-1] == 9


def test_lone_call_runs_at_once_on_the_caller_thread() -> None:
    inner = SlowRecorder(delay=0.0)
    batcher = BatchingEmbedder(inner)
    started = time.perf_counter()
    rows = batcher.embed(["alone"])
    assert time.perf_counter() - started < 0.5
    np.testing.assert_array_equal(rows, HashingEmbedder(dim=32).embed(["alone"]))
    assert batcher.embed([]).shape == (0, 32)
    assert inner.calls == [1]


def test_an_error_reaches_every_call_of_its_batch_and_no_other() -> None:
    inner = SlowRecorder(delay=0.05, fail_on="poison")
    batcher = BatchingEmbedder(inner, max_batch=64)
    outcome: dict[int, str] = {}

    def work(i: int) -> None:
        text = "poison" if i == 5 else f"fine {i}"
        try:
            batcher.embed([text])
            outcome[i] = "ok"
        except RuntimeError:
            outcome[i] = "failed"

    run_threads(work, 12)
    assert outcome[5] == "failed"
    assert len(outcome) == 12
    # Later calls are unaffected.
    assert batcher.embed(["after"]).shape == (1, 32)


def test_rejects_a_bad_cap_and_a_bad_inner_shape() -> None:
    with pytest.raises(ValueError):
        BatchingEmbedder(HashingEmbedder(dim=8), max_batch=0)

    class Wrong:
        name, dim = "wrong", 8

        def embed(self, texts: Sequence[str]) -> NDArray[np.float32]:
            return np.zeros((len(texts) + 1, 8), dtype=np.float32)

    with pytest.raises(RuntimeError, match="shape"):
        BatchingEmbedder(Wrong()).embed(["x"])


class LoneRecorder(SlowRecorder):
    """A SlowRecorder with a lone path, whose texts are recorded apart."""

    def __init__(self) -> None:
        super().__init__(delay=0.0)
        self.lone: list[str] = []

    def embed_alone(self, text: str) -> NDArray[np.float32]:
        self.lone.append(text)
        return self.inner.embed([text])[0]


def test_embed_alone_goes_straight_to_the_inner_lone_path() -> None:
    inner = LoneRecorder()
    batcher = BatchingEmbedder(inner)
    row = batcher.embed_alone("only me")
    np.testing.assert_array_equal(row, HashingEmbedder(dim=32).embed(["only me"])[0])
    assert (inner.lone, inner.calls) == (["only me"], [])
    assert (batcher.batches, batcher.texts) == (1, 1)


def test_embed_alone_without_an_inner_lone_path_embeds_one_text() -> None:
    inner = SlowRecorder(delay=0.0)
    batcher = BatchingEmbedder(inner)
    np.testing.assert_array_equal(batcher.embed_alone("x"), HashingEmbedder(dim=32).embed(["x"])[0])
    assert inner.calls == [1]


def test_embed_alone_rejects_a_bad_inner_shape() -> None:
    class Wrong:
        name, dim = "wrong", 8

        def embed(self, texts: Sequence[str]) -> NDArray[np.float32]:
            return np.zeros((len(texts), 8), dtype=np.float32)

        def embed_alone(self, text: str) -> NDArray[np.float32]:
            return np.zeros(9, dtype=np.float32)

    with pytest.raises(RuntimeError, match="shape"):
        BatchingEmbedder(Wrong()).embed_alone("x")
