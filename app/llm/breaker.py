"""A circuit breaker per upstream alias: stop calling an upstream that keeps failing.

Without it, every request to a dead upstream waits out the full clocks and retries of
`UpstreamClient` before failing; with it, once the upstream has failed often enough, calls
fail at once with a 503 and a `Retry-After` until a single probe call shows it is back.

States (`BreakerState`, also the value of the `iclserve_upstream_breaker_state` gauge):

* closed (0): calls pass. Each finished call is one outcome. The breaker opens when the last
  `consecutive_failures` outcomes were all failures, or when the rolling window of the last
  `window` outcomes holds at least `min_calls` of them and failures make up at least
  `failure_ratio` of the window.
* open (2): calls are refused at once (`CircuitOpen`, 503, `Retry-After` = the seconds left of
  the cooldown, at least 1), without touching the upstream. After `cooldown` seconds the
  breaker is half-open.
* half-open (1): exactly one probe call at a time is let through; the others are refused.
  The probe's success closes the breaker (with an empty window), its failure opens it again
  for another cooldown, and a neutral outcome frees the slot for the next probe. A probe that
  reports nothing for `probe_timeout` seconds is presumed lost and its slot is given away.

Outcomes (`Health`): the caller decides what counts. `UpstreamClient` counts timeouts,
connect errors, dropped connections and 5xx (after the retries of one call) as failures; any
answer that shows the upstream is up (2xx, 4xx, 429) as a success; calls our own client
abandoned as neutral (they say nothing about the upstream). An outcome of a call admitted
before the last state change is ignored: it describes an upstream the breaker has already
judged.

The clock is injectable (`clock`, seconds, monotonic) so that tests need not sleep.
"""

from __future__ import annotations

import enum
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from app.errors import ServiceUnavailable

__all__ = ["BreakerState", "CircuitBreaker", "CircuitOpen", "Health", "Permit"]

logger = logging.getLogger("iclserve.upstream")

Clock = Callable[[], float]

_MIN_RETRY_AFTER: Final = 1


class BreakerState(enum.IntEnum):
    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class Health(enum.Enum):
    """What one finished call says about the upstream."""

    SUCCESS = "success"
    FAILURE = "failure"
    NEUTRAL = "neutral"


class CircuitOpen(ServiceUnavailable):
    """503: the upstream's breaker is open (or half-open with its probe in flight)."""


@dataclass(frozen=True)
class Permit:
    """The ticket of one admitted call; hand it back to `record` with the call's outcome."""

    generation: int
    probe: int | None  # the probe's number when this call is the half-open probe


class CircuitBreaker:
    """The breaker of one upstream alias; see the module docstring. Thread-safe."""

    def __init__(
        self,
        name: str,
        *,
        window: int = 20,
        min_calls: int = 20,
        failure_ratio: float = 0.5,
        consecutive_failures: int = 5,
        cooldown: float = 30.0,
        probe_timeout: float = 300.0,
        clock: Clock = time.monotonic,
    ) -> None:
        if not 1 <= min_calls <= window:
            raise ValueError("min_calls must be between 1 and window")
        if not 0.0 < failure_ratio <= 1.0:
            raise ValueError("failure_ratio must be in (0, 1]")
        if consecutive_failures < 1 or cooldown <= 0 or probe_timeout <= 0:
            raise ValueError("consecutive_failures, cooldown and probe_timeout must be positive")
        self.name = name
        self.window = window
        self.min_calls = min_calls
        self.failure_ratio = failure_ratio
        self.consecutive_failures = consecutive_failures
        self.cooldown = cooldown
        self.probe_timeout = probe_timeout
        self._clock = clock
        self._lock = threading.Lock()
        self._state = BreakerState.CLOSED
        # Bumped on every state change; permits of an older generation no longer count.
        self._generation = 0
        self._outcomes: deque[bool] = deque(maxlen=window)  # True: a failure
        self._failures_in_window = 0
        self._failures_in_row = 0
        self._open_until = 0.0
        self._probe: int | None = None  # the probe in flight, if any
        self._probe_started = 0.0
        self._probes = 0
        self.refused = 0
        """Calls refused at once because the breaker was open or its probe was in flight."""
        self.opened = 0
        """Times the breaker went to open (from closed or from a failed probe)."""

    @property
    def state(self) -> BreakerState:
        with self._lock:
            self._advance(self._clock())
            return self._state

    def admit(self) -> Permit:
        """A permit for one call, or `CircuitOpen` (503 with Retry-After) without delay."""
        with self._lock:
            now = self._clock()
            self._advance(now)
            if self._state is BreakerState.CLOSED:
                return Permit(self._generation, None)
            if self._state is BreakerState.HALF_OPEN and (
                self._probe is None or now - self._probe_started >= self.probe_timeout
            ):
                self._probes += 1
                self._probe, self._probe_started = self._probes, now
                return Permit(self._generation, self._probe)
            self.refused += 1
            retry_after = self._retry_after(now)
        raise CircuitOpen(
            "upstream temporarily unavailable: its recent calls failed, so calls are paused "
            f"(retry in {retry_after} s)",
            code="upstream_unavailable",
            headers={"Retry-After": str(retry_after)},
        )

    def record(self, permit: Permit, outcome: Health) -> None:
        """The outcome of the call `permit` admitted. Call it once per permit."""
        with self._lock:
            now = self._clock()
            self._advance(now)
            if permit.generation != self._generation:
                return
            if self._state is BreakerState.HALF_OPEN:
                if permit.probe is None or permit.probe != self._probe:
                    return
                if outcome is Health.SUCCESS:
                    self._change(BreakerState.CLOSED, now, "the probe call succeeded")
                elif outcome is Health.FAILURE:
                    self._change(BreakerState.OPEN, now, "the probe call failed")
                else:
                    self._probe = None
                return
            if self._state is not BreakerState.CLOSED or outcome is Health.NEUTRAL:
                return
            failed = outcome is Health.FAILURE
            if len(self._outcomes) == self.window and self._outcomes[0]:
                self._failures_in_window -= 1
            self._outcomes.append(failed)
            self._failures_in_window += failed
            self._failures_in_row = self._failures_in_row + 1 if failed else 0
            if self._failures_in_row >= self.consecutive_failures:
                self._change(BreakerState.OPEN, now, f"{self._failures_in_row} failures in a row")
                return
            calls = len(self._outcomes)
            # A division, not `failures >= ratio * calls`: 0.3 * 20 is 6.000000000000001.
            if calls >= self.min_calls and self._failures_in_window / calls >= self.failure_ratio:
                self._change(
                    BreakerState.OPEN,
                    now,
                    f"{self._failures_in_window} of the last {calls} calls failed",
                )

    def retry_after(self) -> int:
        """Whole seconds a refused caller should wait (at least 1)."""
        with self._lock:
            now = self._clock()
            self._advance(now)
            return self._retry_after(now)

    def _retry_after(self, now: float) -> int:
        if self._state is BreakerState.OPEN:
            return max(_MIN_RETRY_AFTER, math.ceil(self._open_until - now))
        return _MIN_RETRY_AFTER

    def _advance(self, now: float) -> None:
        if self._state is BreakerState.OPEN and now >= self._open_until:
            self._change(BreakerState.HALF_OPEN, now, f"{self.cooldown:g}s cooldown over")

    def _change(self, state: BreakerState, now: float, reason: str) -> None:
        self._state = state
        self._generation += 1
        self._outcomes.clear()
        self._failures_in_window = 0
        self._failures_in_row = 0
        self._probe = None
        if state is BreakerState.OPEN:
            self._open_until = now + self.cooldown
            self.opened += 1
            logger.warning(
                "upstream %s: circuit breaker open for %gs (%s)", self.name, self.cooldown, reason
            )
        elif state is BreakerState.HALF_OPEN:
            logger.info("upstream %s: circuit breaker half-open (%s)", self.name, reason)
        else:
            logger.info("upstream %s: circuit breaker closed (%s)", self.name, reason)
