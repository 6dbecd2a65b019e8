"""CPU placement of a forward pass that starts after the embedder has been idle.

ONNX Runtime splits each parallel operator between the calling thread and its pool threads,
which meet at a barrier a hundred-odd times per MiniLM pass. Once the pool has slept for a few
milliseconds, the kernel tends to wake its thread on the caller's own CPU (small virtual
machines pack sleeping work onto few vCPUs), and the two halves of every operator then run
one after the other. On the 2-vCPU reference machine a short query took 6-7 ms after a pause
of 10-50 ms, against 3.4 ms back to back; with the pool thread and the caller on distinct
CPUs for that pass, 3.8-5 ms.

Only such a pass is pinned: when passes follow each other, or overlap, the threads are awake
and placed already, and other busy threads (the event loop's) compete for the same CPUs. A
pinned pair would then wait at every barrier for whichever of the two shares its CPU.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

log = logging.getLogger("iclserve")

IDLE_BEFORE_PINNING_S = 0.005
"""A pass pins its threads when no pass has run for this long (back-to-back passes do not)."""


def thread_ids() -> set[int] | None:
    """The ids of this process's threads, or None where /proc cannot tell."""
    try:
        return {int(name) for name in os.listdir("/proc/self/task")}
    except (OSError, ValueError):
        return None


def _current_cpu_reader() -> Callable[[], int] | None:
    try:
        getcpu = ctypes.CDLL(None, use_errno=True).sched_getcpu
    except (OSError, AttributeError):
        return None
    getcpu.restype = ctypes.c_int
    getcpu.argtypes = []
    return getcpu


class IdlePassPinning:
    """Pins a forward pass's threads to distinct CPUs when the pass follows an idle spell.

    `pool_threads` are the thread ids of the runtime's intra-op pool, `cpus` the CPUs the
    process may use (at least one more than there are pool threads, else nothing is pinned).
    `during_pass()` wraps one pass: when no other pass is running and none has ended in the
    last `idle_after_s`, the calling thread stays on its current CPU and the pool threads are
    pinned one per other CPU until the pass ends; then all are given back their masks. An
    `OSError` from the kernel (a changed cpuset, a sandbox that forbids it) turns pinning off
    for good, logged once; the pass itself runs either way.
    """

    def __init__(
        self,
        pool_threads: Sequence[int],
        cpus: Sequence[int],
        *,
        idle_after_s: float = IDLE_BEFORE_PINNING_S,
        clock: Callable[[], float] = time.monotonic,
        set_affinity: Callable[[int, set[int]], None] | None = None,
        get_affinity: Callable[[int], set[int]] | None = None,
        current_cpu: Callable[[], int] | None = None,
    ) -> None:
        self.pool_threads = list(pool_threads)
        self.cpus = sorted(cpus)
        self.enabled = bool(self.pool_threads) and len(self.cpus) > len(self.pool_threads)
        self.pinned_passes = 0
        self._idle_after_s = idle_after_s
        self._clock = clock
        # Looked up here, not in the signature: the module imports on systems without them.
        self._set_affinity = set_affinity or os.sched_setaffinity
        self._get_affinity = get_affinity or os.sched_getaffinity
        self._current_cpu = current_cpu or _current_cpu_reader()
        self._lock = threading.Lock()
        self._running = 0
        self._last_end = float("-inf")

    @contextmanager
    def during_pass(self) -> Iterator[None]:
        with self._lock:
            pin = (
                self.enabled
                and self._running == 0
                and self._clock() - self._last_end >= self._idle_after_s
            )
            self._running += 1
        caller_mask = self._pin() if pin else None
        try:
            yield
        finally:
            if caller_mask is not None:
                self._unpin(caller_mask)
            with self._lock:
                self._running -= 1
                self._last_end = self._clock()

    def _pin(self) -> set[int] | None:
        """Pin the caller where it runs and the pool elsewhere; the caller's old mask."""
        try:
            caller_mask = self._get_affinity(0)
        except OSError as exc:
            self._give_up(exc)
            return None
        here = self._current_cpu() if self._current_cpu is not None else -1
        if here not in self.cpus:
            here = self.cpus[0]
        others = [cpu for cpu in self.cpus if cpu != here]
        try:
            self._set_affinity(0, {here})
            for tid, cpu in zip(self.pool_threads, others, strict=False):
                self._set_affinity(tid, {cpu})
        except OSError as exc:
            self._give_up(exc)
            self._unpin(caller_mask)
            return None
        self.pinned_passes += 1
        return caller_mask

    def _unpin(self, caller_mask: set[int]) -> None:
        """Give every thread its mask back; best effort, one failure does not stop the rest."""
        for tid, mask in [*((tid, set(self.cpus)) for tid in self.pool_threads), (0, caller_mask)]:
            try:
                self._set_affinity(tid, mask)
            except OSError as exc:
                self._give_up(exc)

    def _give_up(self, exc: OSError) -> None:
        if self.enabled:
            self.enabled = False
            log.warning("embedding: cannot pin threads to CPUs (%s); running unpinned", exc)
