from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
import pytest
from numpy.typing import NDArray

from retrievers.cache import CachedEmbedder
from retrievers.hashing import HashingEmbedder


class CountingEmbedder:
    """Wraps HashingEmbedder and records every batch it is asked to embed."""

    def __init__(self, dim: int = 16) -> None:
        self._inner = HashingEmbedder(dim)
        self.name = "counting"
        self.dim = dim
        self.calls: list[list[str]] = []
        self._lock = threading.Lock()

    def embed(self, texts: Sequence[str]) -> NDArray[np.float32]:
        with self._lock:
            self.calls.append(list(texts))
        return self._inner.embed(texts)

    @property
    def embedded(self) -> int:
        return sum(len(c) for c in self.calls)


def reference(texts: Sequence[str]) -> NDArray[np.float32]:
    return HashingEmbedder(16).embed(texts)


def test_name_and_dim_come_from_inner() -> None:
    cache = CachedEmbedder(CountingEmbedder(16), capacity=4)
    assert cache.name == "counting"
    assert cache.dim == 16
    with pytest.raises(AttributeError):
        cache.dim = 3


def test_hits_misses_and_order() -> None:
    inner = CountingEmbedder()
    cache = CachedEmbedder(inner, capacity=10)
    first = cache.embed(["a", "b", "c"])
    np.testing.assert_array_equal(first, reference(["a", "b", "c"]))
    assert (cache.hits, cache.misses) == (0, 3)
    assert inner.calls == [["a", "b", "c"]]

    second = cache.embed(["c", "d", "a", "e"])
    np.testing.assert_array_equal(second, reference(["c", "d", "a", "e"]))
    assert (cache.hits, cache.misses) == (2, 5)
    assert inner.calls[-1] == ["d", "e"]  # only the misses, in one call, in order

    cache.embed(["e", "d"])
    assert (cache.hits, cache.misses) == (4, 5)
    assert len(inner.calls) == 2
    assert len(cache) == 5


def test_all_hits_do_not_call_inner() -> None:
    inner = CountingEmbedder()
    cache = CachedEmbedder(inner, capacity=10)
    cache.embed(["x", "y"])
    out = cache.embed(["y", "x", "y"])
    np.testing.assert_array_equal(out, reference(["y", "x", "y"]))
    assert len(inner.calls) == 1
    assert out.dtype == np.float32 and out.shape == (3, 16)


def test_repeated_miss_in_one_call_is_embedded_once() -> None:
    inner = CountingEmbedder()
    cache = CachedEmbedder(inner, capacity=10)
    out = cache.embed(["q", "r", "q"])
    np.testing.assert_array_equal(out, reference(["q", "r", "q"]))
    assert inner.calls == [["q", "r"]]
    assert (cache.hits, cache.misses) == (0, 3)


def test_lru_eviction() -> None:
    inner = CountingEmbedder()
    cache = CachedEmbedder(inner, capacity=2)
    cache.embed(["a", "b"])
    cache.embed(["a"])  # a is now most recently used
    cache.embed(["c"])  # evicts b
    assert len(cache) == 2
    inner.calls.clear()
    cache.embed(["a", "c"])
    assert inner.calls == []
    cache.embed(["b"])
    assert inner.calls == [["b"]]


def test_batch_larger_than_capacity_still_returns_everything() -> None:
    inner = CountingEmbedder()
    cache = CachedEmbedder(inner, capacity=2)
    texts = [f"t{i}" for i in range(5)]
    np.testing.assert_array_equal(cache.embed(texts), reference(texts))
    assert len(cache) == 2


def test_capacity_zero_disables_caching() -> None:
    inner = CountingEmbedder()
    cache = CachedEmbedder(inner, capacity=0)
    cache.embed(["a", "b"])
    cache.embed(["a", "b"])
    assert inner.embedded == 4
    assert (cache.hits, cache.misses) == (0, 4)
    assert len(cache) == 0


def test_empty_input() -> None:
    inner = CountingEmbedder()
    cache = CachedEmbedder(inner, capacity=3)
    out = cache.embed([])
    assert out.shape == (0, 16) and out.dtype == np.float32
    assert inner.calls == []


def test_callers_cannot_corrupt_the_cache() -> None:
    cache = CachedEmbedder(CountingEmbedder(), capacity=3)
    first = cache.embed(["a"])
    first[:] = 0.0
    hit = cache.embed(["a"])
    np.testing.assert_array_equal(hit, reference(["a"]))
    hit[:] = 0.0
    np.testing.assert_array_equal(cache.embed(["a"]), reference(["a"]))


def test_clear_keeps_counters() -> None:
    inner = CountingEmbedder()
    cache = CachedEmbedder(inner, capacity=3)
    cache.embed(["a", "a"])
    cache.clear()
    cache.embed(["a"])
    assert len(inner.calls) == 2
    assert (cache.hits, cache.misses) == (0, 3)


def test_wrong_shape_from_inner_is_an_error() -> None:
    class Broken(CountingEmbedder):
        def embed(self, texts: Sequence[str]) -> NDArray[np.float32]:
            return np.zeros((len(texts) + 1, self.dim), dtype=np.float32)

    with pytest.raises(RuntimeError):
        CachedEmbedder(Broken(), capacity=3).embed(["a"])


def test_rejects_negative_capacity() -> None:
    with pytest.raises(ValueError):
        CachedEmbedder(CountingEmbedder(), capacity=-1)


def test_concurrent_use_is_consistent() -> None:
    inner = CountingEmbedder()
    cache = CachedEmbedder(inner, capacity=50)
    texts = [f"text {i}" for i in range(80)]
    want = reference(texts)
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            for _ in range(50):
                pick = rng.integers(0, len(texts), size=5)
                got = cache.embed([texts[i] for i in pick])
                np.testing.assert_array_equal(got, want[pick])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert cache.hits + cache.misses == 8 * 50 * 5
    assert len(cache) <= 50


class LoneCountingEmbedder(CountingEmbedder):
    """A CountingEmbedder with a lone path, whose calls are recorded apart."""

    def __init__(self) -> None:
        super().__init__()
        self.lone_calls: list[str] = []

    def embed_alone(self, text: str) -> NDArray[np.float32]:
        self.lone_calls.append(text)
        return self._inner.embed([text])[0]


@pytest.mark.parametrize("capacity", [0, 4])
def test_embed_alone_sends_a_miss_down_the_lone_path_and_serves_a_hit(capacity: int) -> None:
    inner = LoneCountingEmbedder()
    cache = CachedEmbedder(inner, capacity=capacity)
    first = cache.embed_alone("solo")
    assert first.shape == (16,)
    np.testing.assert_array_equal(first, reference(["solo"])[0])
    assert (inner.lone_calls, inner.calls) == (["solo"], [])
    again = cache.embed_alone("solo")
    np.testing.assert_array_equal(again, first)
    if capacity:
        assert inner.lone_calls == ["solo"] and (cache.hits, cache.misses) == (1, 1)
        # The row a lone call stored serves `embed` too.
        np.testing.assert_array_equal(cache.embed(["solo"])[0], first)
        assert inner.calls == []
    else:
        assert inner.lone_calls == ["solo", "solo"] and (cache.hits, cache.misses) == (0, 2)


def test_embed_alone_over_an_embedder_without_a_lone_path_uses_embed() -> None:
    inner = CountingEmbedder()
    cache = CachedEmbedder(inner, capacity=4)
    np.testing.assert_array_equal(cache.embed_alone("plain"), reference(["plain"])[0])
    assert inner.calls == [["plain"]]
