"""Pinning a forward pass's threads after an idle spell: the decisions with a fake clock and a
recording kernel, then the real thing around a real ONNX Runtime pass."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import pytest

from retrievers.onnx_embedder import OnnxEmbedder
from retrievers.placement import IdlePassPinning, thread_ids

ALL = {0, 1, 2}


class FakeKernel:
    """Affinity masks by thread id (0: the caller), and every call made."""

    def __init__(self, fail_on: int | None = None) -> None:
        self.masks: dict[int, set[int]] = {0: set(ALL), 101: set(ALL), 102: set(ALL)}
        self.calls: list[tuple[int, set[int]]] = []
        self.fail_on = fail_on

    def set_affinity(self, tid: int, mask: set[int]) -> None:
        if tid == self.fail_on:
            raise OSError(22, "Invalid argument")
        self.calls.append((tid, set(mask)))
        self.masks[tid] = set(mask)

    def get_affinity(self, tid: int) -> set[int]:
        return set(self.masks[tid])


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def pinning(
    kernel: FakeKernel,
    clock: Clock,
    *,
    cpu: int = 1,
    pool: list[int] | None = None,
    cpus: list[int] | None = None,
    **kw: object,
) -> IdlePassPinning:
    return IdlePassPinning(
        [101, 102] if pool is None else pool,
        sorted(ALL) if cpus is None else cpus,
        idle_after_s=0.002,
        clock=clock,
        set_affinity=kernel.set_affinity,
        get_affinity=kernel.get_affinity,
        current_cpu=lambda: cpu,
        **kw,  # type: ignore[arg-type]
    )


def test_a_pass_after_an_idle_spell_is_pinned_then_everything_is_given_back() -> None:
    kernel, clock = FakeKernel(), Clock()
    pins = pinning(kernel, clock, cpu=1)
    with pins.during_pass():
        # The caller stays on its CPU; the pool threads take the others, one each.
        assert kernel.masks == {0: {1}, 101: {0}, 102: {2}}
    assert kernel.masks == {0: ALL, 101: ALL, 102: ALL}
    assert pins.pinned_passes == 1


def test_back_to_back_passes_are_not_pinned() -> None:
    kernel, clock = FakeKernel(), Clock()
    pins = pinning(kernel, clock)
    with pins.during_pass():
        pass
    calls = len(kernel.calls)
    clock.now += 0.001  # the next pass starts 1 ms after the last one ended
    with pins.during_pass():
        assert kernel.masks[101] == ALL
    assert len(kernel.calls) == calls
    clock.now += 0.0025
    with pins.during_pass():
        assert kernel.masks[101] != ALL
    assert pins.pinned_passes == 2


def test_a_pass_that_overlaps_another_is_not_pinned_and_does_not_unpin_it() -> None:
    kernel, clock = FakeKernel(), Clock()
    pins = pinning(kernel, clock, cpu=0)
    with pins.during_pass():
        pinned = dict(kernel.masks)
        clock.now += 1.0
        with pins.during_pass():
            assert kernel.masks == pinned
        assert kernel.masks == pinned  # the inner pass left the outer one's placement alone
    assert kernel.masks == {0: ALL, 101: ALL, 102: ALL}
    assert pins.pinned_passes == 1


def test_the_masks_come_back_when_the_pass_raises() -> None:
    kernel, clock = FakeKernel(), Clock()
    pins = pinning(kernel, clock)
    with pytest.raises(RuntimeError), pins.during_pass():
        raise RuntimeError("the pass failed")
    assert kernel.masks == {0: ALL, 101: ALL, 102: ALL}
    clock.now += 0.001
    with pins.during_pass():  # the failed pass counts as the last one
        assert kernel.masks[0] == ALL


def test_a_caller_on_a_cpu_outside_the_set_takes_the_first_one() -> None:
    kernel, clock = FakeKernel(), Clock()
    pins = pinning(kernel, clock, cpu=7)
    with pins.during_pass():
        assert kernel.masks == {0: {0}, 101: {1}, 102: {2}}


def test_a_kernel_refusal_turns_pinning_off_once_and_restores_what_was_pinned(
    caplog: pytest.LogCaptureFixture,
) -> None:
    kernel, clock = FakeKernel(fail_on=102), Clock()
    pins = pinning(kernel, clock, cpu=2)
    with caplog.at_level(logging.WARNING, logger="iclserve"), pins.during_pass():
        assert kernel.masks[0] == ALL  # the caller was pinned, then given its mask back
        assert kernel.masks[101] == ALL
    assert not pins.enabled
    assert pins.pinned_passes == 0
    clock.now += 1.0
    calls = len(kernel.calls)
    with caplog.at_level(logging.WARNING, logger="iclserve"), pins.during_pass():
        pass
    assert len(kernel.calls) == calls
    assert [r.message for r in caplog.records].count(
        "embedding: cannot pin threads to CPUs ([Errno 22] Invalid argument); running unpinned"
    ) == 1


def test_too_few_cpus_or_no_pool_pins_nothing() -> None:
    kernel, clock = FakeKernel(), Clock()
    for pool, cpus in (([101, 102], [0, 1]), ([], [0, 1])):
        pins = pinning(kernel, clock, cpu=0, pool=pool, cpus=cpus)
        assert not pins.enabled
        with pins.during_pass():
            pass
    assert kernel.calls == []


needs_two_cpus = pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity")
    or len(os.sched_getaffinity(0)) < 2
    or thread_ids() is None,
    reason="needs Linux with at least 2 usable CPUs",
)


@needs_two_cpus
def test_a_real_pass_after_idle_pins_the_pool_and_gives_it_back(tmp_path: Path) -> None:
    cpus = os.sched_getaffinity(0)
    embedder = OnnxEmbedder(threads=2, cache_dir=tmp_path)
    embedder.open()
    pins = embedder.pinning
    assert pins is not None and pins.enabled
    assert len(pins.pool_threads) == 1
    assert set(pins.pool_threads) <= (thread_ids() or set())
    seen: list[tuple[int, set[int]]] = []

    def recording(tid: int, mask: set[int]) -> None:
        seen.append((tid, set(mask)))
        os.sched_setaffinity(tid, mask)

    pins._set_affinity = recording
    time.sleep(0.01)
    caller_before = os.sched_getaffinity(0)
    vector = embedder.embed(["a query after a pause"])
    assert vector.shape == (1, embedder.dim)
    assert pins.pinned_passes >= 1
    (pool,) = pins.pool_threads
    pinned = dict(seen[:2])
    assert len(pinned[0]) == 1 and len(pinned[pool]) == 1 and pinned[0] != pinned[pool]
    assert os.sched_getaffinity(0) == caller_before
    assert os.sched_getaffinity(pool) == cpus
    # A pass right after it is left where the scheduler puts it.
    count = len(seen)
    embedder.embed(["a query right after"])
    assert len(seen) == count
    # The lone-query session has a pool of its own, pinned the same way.
    lone = embedder.lone_pinning
    assert lone is not None and lone.enabled and len(lone.pool_threads) == 1
    assert set(lone.pool_threads).isdisjoint(pins.pool_threads)
    time.sleep(0.01)
    embedder.embed_alone("a lone query after a pause")
    assert lone.pinned_passes == 1
    assert os.sched_getaffinity(lone.pool_threads[0]) == cpus
    assert os.sched_getaffinity(0) == caller_before


@needs_two_cpus
def test_pinning_is_off_when_not_wanted_or_single_threaded(tmp_path: Path) -> None:
    for embedder in (
        OnnxEmbedder(threads=2, cache_dir=tmp_path, pin_threads=False),
        OnnxEmbedder(threads=1, cache_dir=tmp_path),
    ):
        embedder.open()
        assert embedder.pinning is None and embedder.lone_pinning is None


@needs_two_cpus
def test_passes_from_many_threads_leave_every_mask_as_it_was(tmp_path: Path) -> None:
    cpus = os.sched_getaffinity(0)
    embedder = OnnxEmbedder(threads=2, cache_dir=tmp_path, lone_query_session=False)
    embedder.open()
    assert embedder.pinning is not None
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for i in range(6):
                time.sleep(0.003 * (i % 2))
                embedder.embed([f"thread {n} query {i}"])
            assert os.sched_getaffinity(0) == cpus
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    (pool,) = embedder.pinning.pool_threads
    assert os.sched_getaffinity(pool) == cpus
