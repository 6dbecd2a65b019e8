"""The circuit breaker: its state machine against a brute-force model, and in the client.

The model (`ReferenceBreaker`) keeps the whole outcome history of the current closed period
and recomputes the window, the failure share and the run of failures from it at every step;
the breaker keeps counters. Random outcome sequences (seeded) must leave both in the same
state after every step. The client-level tests run `UpstreamClient` against the loopback
fake upstream with a hand-moved clock, so no test waits out a cooldown.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from dataclasses import dataclass
from typing import Any

import pytest
from pydantic import SecretStr, ValidationError

from app.errors import RateLimited, ServiceUnavailable, UpstreamError, UpstreamTimeout
from app.llm.breaker import BreakerState, CircuitBreaker, CircuitOpen, Health, Permit
from app.llm.client import UpstreamClient, UpstreamRejected
from app.metrics import Metrics
from app.settings import Settings, Upstream
from tests.fakes.upstream import FakeUpstream
from tests.unit.llm.helpers import make_upstream

pytestmark = pytest.mark.anyio

S, F, N = Health.SUCCESS, Health.FAILURE, Health.NEUTRAL


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def breaker(clock: FakeClock, **overrides: Any) -> CircuitBreaker:
    settings: dict[str, Any] = {
        "window": 20,
        "min_calls": 20,
        "failure_ratio": 0.5,
        "consecutive_failures": 5,
        "cooldown": 30.0,
        "probe_timeout": 300.0,
    }
    settings.update(overrides)
    return CircuitBreaker("test", clock=clock, **settings)


def feed(subject: CircuitBreaker, outcomes: list[Health]) -> None:
    """Each outcome is one call, admitted and finished before the next."""
    for outcome in outcomes:
        subject.record(subject.admit(), outcome)


# -- the reference model ------------------------------------------------------------------


@dataclass
class Ticket:
    era: int
    probe: int | None


class ReferenceBreaker:
    """The breaker's rules, computed from full history rather than counters."""

    def __init__(
        self,
        *,
        window: int,
        min_calls: int,
        failure_ratio: float,
        consecutive_failures: int,
        cooldown: float,
        probe_timeout: float,
    ) -> None:
        self.window = window
        self.min_calls = min_calls
        self.failure_ratio = failure_ratio
        self.consecutive_failures = consecutive_failures
        self.cooldown = cooldown
        self.probe_timeout = probe_timeout
        self.state = BreakerState.CLOSED
        self.era = 0
        self.history: list[bool] = []  # failures (True) and successes of this closed period
        self.opened_at = 0.0
        self.probe: tuple[int, float] | None = None
        self.probes_issued = 0
        self.refused = 0
        self.opened = 0

    def _enter(self, state: BreakerState, now: float) -> None:
        self.state = state
        self.era += 1
        self.history = []
        self.probe = None
        if state is BreakerState.OPEN:
            self.opened_at = now
            self.opened += 1

    def tick(self, now: float) -> None:
        if self.state is BreakerState.OPEN and now >= self.opened_at + self.cooldown:
            self._enter(BreakerState.HALF_OPEN, now)

    def admit(self, now: float) -> Ticket | None:
        self.tick(now)
        if self.state is BreakerState.CLOSED:
            return Ticket(self.era, None)
        if self.state is BreakerState.HALF_OPEN:
            lost = self.probe is not None and now - self.probe[1] >= self.probe_timeout
            if self.probe is None or lost:
                self.probes_issued += 1
                self.probe = (self.probes_issued, now)
                return Ticket(self.era, self.probes_issued)
        self.refused += 1
        return None

    def record(self, now: float, ticket: Ticket, outcome: Health) -> None:
        self.tick(now)
        if ticket.era != self.era:
            return
        if self.state is BreakerState.HALF_OPEN:
            if self.probe is None or ticket.probe != self.probe[0]:
                return
            if outcome is S:
                self._enter(BreakerState.CLOSED, now)
            elif outcome is F:
                self._enter(BreakerState.OPEN, now)
            else:
                self.probe = None
            return
        if self.state is not BreakerState.CLOSED or outcome is N:
            return
        self.history.append(outcome is F)
        run = 0
        for failed in reversed(self.history):
            if not failed:
                break
            run += 1
        recent = self.history[-self.window :]
        share_reached = (
            len(recent) >= self.min_calls and sum(recent) / len(recent) >= self.failure_ratio
        )
        if run >= self.consecutive_failures or share_reached:
            self._enter(BreakerState.OPEN, now)

    def retry_after(self, now: float) -> int:
        self.tick(now)
        if self.state is BreakerState.OPEN:
            return max(1, math.ceil(self.opened_at + self.cooldown - now))
        return 1


@pytest.mark.parametrize("seed", range(40))
def test_matches_the_reference_model_on_random_sequences(seed: int) -> None:
    rng = random.Random(seed)
    window = rng.randint(1, 8)
    params: dict[str, Any] = {
        "window": window,
        "min_calls": rng.randint(1, window),
        "failure_ratio": rng.choice([0.25, 0.3, 0.5, 0.6, 0.75, 1.0]),
        "consecutive_failures": rng.randint(1, 6),
        "cooldown": rng.choice([1.0, 2.5, 30.0]),
        "probe_timeout": rng.choice([0.5, 5.0, 100.0]),
    }
    clock = FakeClock()
    subject = breaker(clock, **params)
    model = ReferenceBreaker(**params)
    in_flight: list[tuple[Permit, Ticket]] = []
    transitions = set()
    for step in range(400):
        roll = rng.random()
        where = f"seed {seed}, step {step}, {params}"
        if roll < 0.4:
            ticket = model.admit(clock.now)
            try:
                permit = subject.admit()
            except CircuitOpen as refusal:
                assert ticket is None, where
                assert refusal.headers["Retry-After"] == str(model.retry_after(clock.now)), where
            else:
                assert ticket is not None, where
                assert (permit.probe is None) == (ticket.probe is None), where
                in_flight.append((permit, ticket))
        elif roll < 0.8 and in_flight:
            # Calls finish in any order, some long after later calls were admitted.
            permit, ticket = in_flight.pop(rng.randrange(len(in_flight)))
            outcome = rng.choices([S, F, N], weights=[35, 50, 15])[0]
            subject.record(permit, outcome)
            model.record(clock.now, ticket, outcome)
        else:
            cooldown = params["cooldown"]
            step_kind = rng.random()
            if step_kind < 0.1 and model.state is BreakerState.OPEN:
                clock.now = model.opened_at + cooldown  # exactly the end of the cooldown
            elif step_kind < 0.3:
                clock.advance(rng.uniform(cooldown, 2 * cooldown))
            else:
                clock.advance(rng.uniform(0.0, 0.3 * cooldown))
        model.tick(clock.now)
        assert subject.state is model.state, where
        assert subject.refused == model.refused, where
        assert subject.opened == model.opened, where
        assert subject.retry_after() == model.retry_after(clock.now), where
        transitions.add(model.state)
    # The sequences are meant to exercise every state, not idle in one.
    assert transitions == set(BreakerState), f"seed {seed} never left some state"


# -- thresholds at their boundaries ---------------------------------------------------------


def test_consecutive_failures_open_exactly_at_the_threshold() -> None:
    clock = FakeClock()
    subject = breaker(clock, consecutive_failures=5)
    feed(subject, [F, F, F, F])
    assert subject.state is BreakerState.CLOSED
    feed(subject, [S, F, F, F, F])  # a success starts the count again
    assert subject.state is BreakerState.CLOSED
    feed(subject, [N, N])  # neutral outcomes neither break nor extend the run
    assert subject.state is BreakerState.CLOSED
    feed(subject, [F])
    assert subject.state is BreakerState.OPEN
    assert subject.opened == 1


def test_failure_ratio_needs_min_calls_and_opens_at_exactly_the_ratio() -> None:
    clock = FakeClock()
    subject = breaker(clock, window=20, min_calls=20, failure_ratio=0.5)
    alternating = [F, S] * 9 + [F]  # 10 failures of 19, never 5 in a row
    feed(subject, alternating)
    assert subject.state is BreakerState.CLOSED  # 19 < min_calls
    feed(subject, [S])  # 10 of 20 = 0.5
    assert subject.state is BreakerState.OPEN


def test_failure_ratio_just_below_stays_closed() -> None:
    clock = FakeClock()
    subject = breaker(clock, window=20, min_calls=20, failure_ratio=0.5)
    feed(subject, [F, S, S] * 6 + [F, S])  # 7 of 20
    assert subject.state is BreakerState.CLOSED
    feed(subject, [S] * 100)
    assert subject.state is BreakerState.CLOSED


def test_ratio_is_compared_without_rounding_error() -> None:
    # 6 / 20 is 0.3 exactly as a float; 0.3 * 20 is not 6.
    clock = FakeClock()
    subject = breaker(clock, window=20, min_calls=20, failure_ratio=0.3)
    feed(subject, ([F] + [S] * 3) * 4 + [F, S, F, S])  # 6 failures in 20
    assert subject.state is BreakerState.OPEN


def test_the_window_rolls() -> None:
    clock = FakeClock()
    subject = breaker(clock, window=10, min_calls=10, failure_ratio=0.5)
    feed(subject, [F, S] * 2 + [S] * 6)  # 2 of 10
    feed(subject, [F, F, S, F, F])  # the oldest five (2 F) slide out: 2 - 2 + 4 = 4 of 10
    assert subject.state is BreakerState.CLOSED
    feed(subject, [S])  # out goes an S: still 4 of 10
    assert subject.state is BreakerState.CLOSED
    feed(subject, [F])  # out goes an S: 5 of 10
    assert subject.state is BreakerState.OPEN


def test_min_calls_below_window() -> None:
    clock = FakeClock()
    subject = breaker(clock, window=20, min_calls=10, failure_ratio=0.5)
    feed(subject, [F, S] * 4 + [S])
    assert subject.state is BreakerState.CLOSED  # 9 calls
    feed(subject, [F])  # 5 of 10
    assert subject.state is BreakerState.OPEN


# -- open, half-open, probes ----------------------------------------------------------------


def test_open_refuses_with_retry_after_counting_down() -> None:
    clock = FakeClock()
    subject = breaker(clock, consecutive_failures=1, cooldown=30.0)
    feed(subject, [F])
    expected = {0.0: "30", 0.5: "30", 1.0: "29", 28.9: "2", 29.2: "1", 29.999: "1"}
    opened_at = clock.now
    for elapsed, retry_after in expected.items():
        clock.now = opened_at + elapsed
        with pytest.raises(CircuitOpen) as info:
            subject.admit()
        assert info.value.headers == {"Retry-After": retry_after}, elapsed
    assert subject.refused == len(expected)
    clock.now = opened_at + 30.0
    assert subject.state is BreakerState.HALF_OPEN


def test_fractional_cooldown_rounds_retry_after_up() -> None:
    clock = FakeClock()
    subject = breaker(clock, consecutive_failures=1, cooldown=2.5)
    feed(subject, [F])
    assert subject.retry_after() == 3
    clock.advance(2.0)
    assert subject.retry_after() == 1


def test_refusal_is_a_503_in_the_openai_shape() -> None:
    clock = FakeClock()
    subject = breaker(clock, consecutive_failures=1)
    feed(subject, [F])
    with pytest.raises(ServiceUnavailable) as info:
        subject.admit()
    error = info.value
    assert error.status_code == 503
    body = error.body()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "service_unavailable"
    assert body["error"]["code"] == "upstream_unavailable"
    assert "test" not in body["error"]["message"]  # the alias is configuration, not for clients


def test_half_open_admits_one_probe_at_a_time() -> None:
    clock = FakeClock()
    subject = breaker(clock, consecutive_failures=1, cooldown=10.0)
    feed(subject, [F])
    clock.advance(10.0)
    probe = subject.admit()
    assert probe.probe is not None
    for _ in range(5):
        with pytest.raises(CircuitOpen) as info:
            subject.admit()
        assert info.value.headers == {"Retry-After": "1"}
    # A neutral probe (our caller went away) frees the slot without judging the upstream.
    subject.record(probe, N)
    assert subject.state is BreakerState.HALF_OPEN
    second = subject.admit()
    assert second.probe is not None and second.probe != probe.probe
    subject.record(second, S)
    assert subject.state is BreakerState.CLOSED
    # Closed again with a clean slate: the next four failures do not reopen it.
    feed(subject, [S])
    assert subject.state is BreakerState.CLOSED


def test_failed_probe_reopens_for_a_full_cooldown() -> None:
    clock = FakeClock()
    subject = breaker(clock, consecutive_failures=1, cooldown=10.0)
    feed(subject, [F])
    clock.advance(12.0)
    probe = subject.admit()
    clock.advance(3.0)
    subject.record(probe, F)
    assert subject.state is BreakerState.OPEN
    assert subject.retry_after() == 10
    assert subject.opened == 2
    clock.advance(9.9)
    assert subject.state is BreakerState.OPEN
    clock.advance(0.1)
    assert subject.state is BreakerState.HALF_OPEN


def test_late_outcomes_of_earlier_calls_are_ignored() -> None:
    clock = FakeClock()
    subject = breaker(clock, consecutive_failures=2, cooldown=5.0)
    slow = [subject.admit() for _ in range(3)]  # admitted while closed, still running
    feed(subject, [F, F])
    assert subject.state is BreakerState.OPEN
    subject.record(slow[0], F)  # the breaker has already judged this upstream
    assert subject.opened == 1
    clock.advance(5.0)
    probe = subject.admit()
    subject.record(slow[1], S)  # not the probe: does not close it
    assert subject.state is BreakerState.HALF_OPEN
    subject.record(probe, S)
    subject.record(slow[2], F)  # from before the last close: does not count
    feed(subject, [F])
    assert subject.state is BreakerState.CLOSED


def test_a_lost_probe_is_replaced_after_probe_timeout() -> None:
    clock = FakeClock()
    subject = breaker(clock, consecutive_failures=1, cooldown=5.0, probe_timeout=60.0)
    feed(subject, [F])
    clock.advance(5.0)
    lost = subject.admit()
    clock.advance(59.0)
    with pytest.raises(CircuitOpen):
        subject.admit()
    clock.advance(1.0)
    replacement = subject.admit()
    subject.record(lost, F)  # its late verdict no longer counts
    assert subject.state is BreakerState.HALF_OPEN
    subject.record(replacement, S)
    assert subject.state is BreakerState.CLOSED


def test_state_changes_are_logged_with_the_name_only(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="iclserve.upstream")
    clock = FakeClock()
    subject = CircuitBreaker("alias-a", consecutive_failures=2, cooldown=5.0, clock=clock)
    feed(subject, [F, F])
    clock.advance(5.0)
    feed(subject, [S])
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "upstream alias-a: circuit breaker open for 5s (2 failures in a row)",
        "upstream alias-a: circuit breaker half-open (5s cooldown over)",
        "upstream alias-a: circuit breaker closed (the probe call succeeded)",
    ]


def test_invalid_parameters_are_refused() -> None:
    clock = FakeClock()
    with pytest.raises(ValueError):
        breaker(clock, window=5, min_calls=6)
    with pytest.raises(ValueError):
        breaker(clock, failure_ratio=0.0)
    with pytest.raises(ValueError):
        breaker(clock, cooldown=0.0)


# -- settings -------------------------------------------------------------------------------


def test_breaker_settings_come_from_iclserve_upstreams(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "ICLSERVE_UPSTREAMS",
        '[{"name": "a", "base_url": "http://127.0.0.1:9/v1", "breaker_window": 10, '
        '"breaker_min_calls": 4, "breaker_failure_ratio": 0.25, '
        '"breaker_consecutive_failures": 3, "breaker_cooldown": 2.5}, '
        '{"name": "b", "base_url": "http://127.0.0.1:9/v1", "breaker_enabled": false}]',
    )
    first, second = Settings(_env_file=None).upstreams
    assert (first.breaker_window, first.breaker_min_calls) == (10, 4)
    assert (first.breaker_failure_ratio, first.breaker_consecutive_failures) == (0.25, 3)
    assert first.breaker_cooldown == 2.5 and first.breaker_enabled
    assert not second.breaker_enabled
    assert (second.breaker_window, second.breaker_min_calls, second.breaker_cooldown) == (
        20,
        20,
        30.0,
    )
    client = UpstreamClient([first, second])
    assert list(client.breakers) == ["a"]


@pytest.mark.parametrize(
    "bad",
    [
        {"breaker_window": 0},
        {"breaker_window": 10, "breaker_min_calls": 11},
        {"breaker_failure_ratio": 0},
        {"breaker_failure_ratio": 1.5},
        {"breaker_consecutive_failures": 0},
        {"breaker_cooldown": 0},
        {"breaker_cooldown": 7200},
    ],
)
def test_breaker_settings_are_validated(bad: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        Upstream(name="a", base_url="http://127.0.0.1:9/v1", **bad)


# -- in the client, against the fake upstream ------------------------------------------------


def chat(model: str = "fake-model", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "a dog barks"}], **extra}


def fast_failing(fake: FakeUpstream, **overrides: Any) -> Upstream:
    """No retries, so that one failing call is one upstream request."""
    fields: dict[str, Any] = {
        "max_retries": 0,
        "breaker_consecutive_failures": 3,
        "breaker_cooldown": 10.0,
    }
    fields.update(overrides)
    return make_upstream(fake, **fields)


async def fail_calls(client: UpstreamClient, count: int, error: type[Exception]) -> None:
    for _ in range(count):
        with pytest.raises(error):
            await client.complete("/chat/completions", chat())


async def assert_refused_at_once(client: UpstreamClient, fake: FakeUpstream) -> None:
    seen = len(fake.requests)
    started = time.perf_counter()
    with pytest.raises(CircuitOpen) as info:
        await client.complete("/chat/completions", chat())
    assert time.perf_counter() - started < 0.05
    with pytest.raises(CircuitOpen):
        await client.open_stream("/chat/completions", chat())
    assert len(fake.requests) == seen  # the upstream was not contacted
    assert info.value.status_code == 503
    assert int(info.value.headers["Retry-After"]) >= 1


async def test_client_breaker_opens_on_5xx_after_retries(fake: FakeUpstream) -> None:
    clock = FakeClock()
    fake.set_fault("status", code=503, retry_after=0)
    upstream = fast_failing(fake, max_retries=2)
    async with UpstreamClient([upstream], clock=clock) as client:
        await fail_calls(client, 2, UpstreamError)
        assert client.breakers["fake"].state is BreakerState.CLOSED
        assert len(fake.requests) == 6  # one call, retries included, is one outcome
        await fail_calls(client, 1, UpstreamError)
        assert client.breakers["fake"].state is BreakerState.OPEN
        await assert_refused_at_once(client, fake)


async def test_client_breaker_opens_on_resets(fake: FakeUpstream) -> None:
    fake.set_fault("reset")
    async with UpstreamClient([fast_failing(fake)], clock=FakeClock()) as client:
        await fail_calls(client, 2, UpstreamError)
        # A stream reset mid-body counts too.
        fake.set_fault("reset", chunks=2)
        stream = await client.open_stream("/chat/completions", chat())
        async with stream:
            chunks = [chunk async for chunk in stream]
        assert b"upstream connection broke mid-stream" in chunks[-1]
        assert client.breakers["fake"].state is BreakerState.OPEN
        await assert_refused_at_once(client, fake)


@pytest.mark.timeout(30)
async def test_client_breaker_opens_on_timeouts(fake: FakeUpstream) -> None:
    fake.set_fault("stall_before_headers", seconds=10)
    upstream = fast_failing(fake, first_byte_timeout=0.2)
    async with UpstreamClient([upstream], clock=FakeClock()) as client:
        await fail_calls(client, 3, UpstreamTimeout)
        assert client.breakers["fake"].state is BreakerState.OPEN
        await assert_refused_at_once(client, fake)


@pytest.mark.parametrize(
    ("fault", "error"),
    [
        ({"code": 400, "message": "bad request"}, UpstreamRejected),
        ({"code": 404, "message": "no such model"}, UpstreamRejected),
        ({"code": 429, "retry_after": 0}, RateLimited),
    ],
)
async def test_client_breaker_ignores_4xx_and_429(
    fake: FakeUpstream, fault: dict[str, Any], error: type[Exception]
) -> None:
    fake.set_fault("status", **fault)
    async with UpstreamClient([fast_failing(fake)], clock=FakeClock()) as client:
        await fail_calls(client, 25, error)
        assert client.breakers["fake"].state is BreakerState.CLOSED
        fake.clear_faults()
        await client.complete("/chat/completions", chat())
    assert len(fake.requests) == 26


async def test_client_breaker_counts_401_as_the_upstream_answering() -> None:
    with FakeUpstream(api_key="sk-right-key-000000") as fake:
        upstream = fast_failing(fake, api_key=SecretStr("sk-wrong-key-111111"))
        async with UpstreamClient([upstream], clock=FakeClock()) as client:
            await fail_calls(client, 10, UpstreamError)
            assert client.breakers["fake"].state is BreakerState.CLOSED


async def test_client_4xx_breaks_a_run_of_failures(fake: FakeUpstream) -> None:
    async with UpstreamClient([fast_failing(fake)], clock=FakeClock()) as client:
        for _ in range(3):
            fake.set_fault("status", code=500, times=2)
            await fail_calls(client, 2, UpstreamError)
            fake.set_fault("status", code=400, times=1)
            await fail_calls(client, 1, UpstreamRejected)
        assert client.breakers["fake"].state is BreakerState.CLOSED


async def test_client_half_open_probe_then_recovery(fake: FakeUpstream) -> None:
    clock = FakeClock()
    fake.set_fault("status", code=500)
    async with UpstreamClient([fast_failing(fake)], clock=clock) as client:
        await fail_calls(client, 3, UpstreamError)
        clock.advance(10.0)
        # Still failing: the probe goes through, fails, and the breaker opens again.
        await fail_calls(client, 1, UpstreamError)
        assert client.breakers["fake"].state is BreakerState.OPEN
        await assert_refused_at_once(client, fake)
        clock.advance(10.0)
        fake.clear_faults()
        answer = await client.complete("/chat/completions", chat())
        assert answer["object"] == "chat.completion"
        assert client.breakers["fake"].state is BreakerState.CLOSED
        await client.complete("/chat/completions", chat())
        assert client.breakers["fake"].opened == 2


@pytest.mark.timeout(30)
async def test_client_probe_in_flight_refuses_others(fake: FakeUpstream) -> None:
    clock = FakeClock()
    fake.set_fault("status", code=500, times=3)
    async with UpstreamClient([fast_failing(fake)], clock=clock) as client:
        await fail_calls(client, 3, UpstreamError)
        clock.advance(10.0)
        fake.set_fault("latency", seconds=0.5, times=1)
        probe = asyncio.ensure_future(client.complete("/chat/completions", chat()))
        await asyncio.sleep(0.2)
        assert len(fake.requests) == 4
        await assert_refused_at_once(client, fake)
        assert (await probe)["object"] == "chat.completion"
        assert client.breakers["fake"].state is BreakerState.CLOSED


@pytest.mark.timeout(30)
async def test_client_cancelled_probe_is_neutral(fake: FakeUpstream) -> None:
    clock = FakeClock()
    fake.set_fault("status", code=500, times=3)
    async with UpstreamClient([fast_failing(fake)], clock=clock) as client:
        await fail_calls(client, 3, UpstreamError)
        clock.advance(10.0)
        fake.set_fault("stall_before_headers", seconds=10, times=1)
        probe = asyncio.ensure_future(client.complete("/chat/completions", chat()))
        await asyncio.sleep(0.2)
        probe.cancel()  # what the route does when its client disconnects
        with pytest.raises(asyncio.CancelledError):
            await probe
        assert fake.wait_for_disconnect(1.0)
        assert client.breakers["fake"].state is BreakerState.HALF_OPEN
        await client.complete("/chat/completions", chat())  # the next call is the probe
        assert client.breakers["fake"].state is BreakerState.CLOSED


async def broken_streams(client: UpstreamClient, fake: FakeUpstream, count: int) -> None:
    fake.set_fault("close_mid_stream", chunks=1, times=count)
    for _ in range(count):
        async with await client.open_stream("/chat/completions", chat()) as stream:
            assert b"[DONE]" not in b"".join([chunk async for chunk in stream])


@pytest.mark.timeout(30)
async def test_client_stream_outcomes(fake: FakeUpstream) -> None:
    async with UpstreamClient([fast_failing(fake)], clock=FakeClock()) as client:
        breaker_ = client.breakers["fake"]
        await broken_streams(client, fake, 2)
        # A stream that ends with [DONE] is a success and ends the run of failures.
        async with await client.open_stream("/chat/completions", chat()) as stream:
            assert [chunk async for chunk in stream][-1] == b"data: [DONE]\n\n"
        await broken_streams(client, fake, 2)
        # Streams closed early (our client left) say nothing about the upstream: they
        # neither count as failures nor break the run.
        fake.set_fault("stall_after_chunks", chunks=1, seconds=10, times=3)
        for _ in range(3):
            stream = await client.open_stream("/chat/completions", chat())
            await stream.__anext__()
            await stream.aclose()
        assert breaker_.state is BreakerState.CLOSED
        await broken_streams(client, fake, 1)
        assert breaker_.state is BreakerState.OPEN


async def test_client_breakers_are_per_upstream(fake: FakeUpstream) -> None:
    failing = fast_failing(fake, name="failing", models=["fake-model"])
    healthy = fast_failing(fake, name="healthy", models=["fake-other"])
    async with UpstreamClient([failing, healthy], clock=FakeClock()) as client:
        fake.set_fault("status", code=500, times=3)
        await fail_calls(client, 3, UpstreamError)
        assert client.breakers["failing"].state is BreakerState.OPEN
        answer = await client.complete("/chat/completions", chat(model="fake-other"))
        assert answer["model"] == "fake-other"
        assert client.breakers["healthy"].state is BreakerState.CLOSED
        with pytest.raises(CircuitOpen):
            await client.complete("/chat/completions", chat())


async def test_client_breaker_can_be_disabled(fake: FakeUpstream) -> None:
    fake.set_fault("status", code=500)
    upstream = fast_failing(fake, breaker_enabled=False)
    async with UpstreamClient([upstream]) as client:
        assert client.breakers == {}
        await fail_calls(client, 10, UpstreamError)
    assert len(fake.requests) == 10


async def test_breaker_metrics(fake: FakeUpstream) -> None:
    metrics = Metrics()
    fake.set_fault("status", code=500)
    failing = fast_failing(fake, name="failing", models=["fake-model"])
    healthy = fast_failing(fake, name="healthy", models=["fake-other"])
    async with UpstreamClient([failing, healthy], clock=FakeClock()) as client:
        metrics.bind_upstream(client)
        await fail_calls(client, 3, UpstreamError)
        for _ in range(4):
            with pytest.raises(CircuitOpen):
                await client.complete("/chat/completions", chat())
        text = metrics.render().decode()
    assert 'iclserve_upstream_breaker_state{upstream="failing"} 2.0' in text
    assert 'iclserve_upstream_breaker_state{upstream="healthy"} 0.0' in text
    assert 'iclserve_upstream_breaker_refused_total{upstream="failing"} 4.0' in text
    assert 'iclserve_upstream_breaker_opened_total{upstream="failing"} 1.0' in text
    assert fake.base_url not in text
