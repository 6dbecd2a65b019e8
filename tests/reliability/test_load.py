"""Load on loopback (RELIABILITY.md R1-R3): 16 closed-loop clients against a real server.

The server is `iclserve serve` with the packaged MiniLM and a 10,000-example pool uploaded
over HTTP (every query embedded: the pool's topic sentences with varied suffixes, 5,000
distinct ones, cycled). The upstream is benchmarks/zero_upstream.py in its own process,
answering after a fixed delay. The client is benchmarks/loadgen.py (raw asyncio streams),
checking every reply: a select returns k demonstrations, a chat answer carries its `icl`
ids, and a stream ends with `data: [DONE]` and no error event.

CI: `load_seconds` (120) of select, then as long of chat with 20% streaming. Nightly
(`scripts/reliability --nightly`): 600 seconds each, and a soak of `soak_seconds` (3,600) at half
of the measured throughput, sampling the server's RSS and open descriptors every 5 s.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from _common import CLIENT_KEY, iclserve  # noqa: E402
from load import make_queries  # noqa: E402
from loadgen import LoadResult, Reply, load, post_bytes, run  # noqa: E402
from proxy import MODEL, POOL, seeded_workspace, upstreams_env  # noqa: E402
from zero_upstream import ZeroUpstream  # noqa: E402

from tests.reliability.figures import Figures, scale  # noqa: E402

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(7200)]

CLIENTS = 16
K = 8
POOL_SIZE = 10_000
UPSTREAM_DELAY_MS = 100.0
STREAM_EVERY = 5  # one chat request in five streams
SAMPLE_EVERY_S = 5.0
# RELIABILITY.md R1 for select; chat waits UPSTREAM_DELAY_MS on top.
SELECT_P95_MS = 500.0
SELECT_P99_MS = 1_500.0
CHAT_P95_MS = 1_000.0
# Descriptors after the load may exceed those before it by the kept-alive upstream
# connections (httpx keeps up to 20); a per-request leak would add thousands.
FD_SLACK = 48
SOAK_RSS_GROWTH_MIB = 50.0


class Sampler:
    """RSS (MiB) and open file descriptors of a process, every few seconds, in a thread."""

    def __init__(self, pid: int, every_s: float = SAMPLE_EVERY_S) -> None:
        self.pid = pid
        self.every_s = every_s
        self.samples: list[tuple[float, float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> tuple[float, float, int]:
        rss_kib = 0
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss_kib = int(line.split()[1])
        fds = len(os.listdir(f"/proc/{self.pid}/fd"))
        found = (time.monotonic(), rss_kib / 1024.0, fds)
        self.samples.append(found)
        return found

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.sample()

    def __enter__(self) -> Sampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.sample()


def check_select(reply: Reply) -> str | None:
    answer = json.loads(reply.body)
    if len(answer.get("demonstrations") or []) != K:
        return f"select returned {len(answer.get('demonstrations') or [])} demonstrations"
    return None


def check_chat(reply: Reply) -> str | None:
    if reply.body.startswith(b"data:"):
        if b'"error"' in reply.body:
            return "stream carried an error event"
        if not reply.body.rstrip().endswith(b"data: [DONE]"):
            return "stream did not end with [DONE]"
        return None
    answer = json.loads(reply.body)
    if len((answer.get("icl") or {}).get("demonstrations") or []) != K:
        return "chat answer without its demonstrations"
    return None


@contextmanager
def loaded_server(tmp: Path) -> Iterator[tuple[str, int]]:
    with (
        seeded_workspace(None, POOL, POOL_SIZE) as (seed_dir, _scratch),
        ZeroUpstream(UPSTREAM_DELAY_MS) as upstream,
        iclserve(seed_dir, env={"ICLSERVE_UPSTREAMS": upstreams_env(upstream.base_url)}) as (
            url,
            pid,
        ),
    ):
        yield url, pid


def _requests(url: str, queries: list[str]) -> tuple[list[bytes], list[bytes]]:
    select = [
        post_bytes(url, f"/v1/pools/{POOL}/select", {"query": q, "k": K}, key=CLIENT_KEY)
        for q in queries
    ]
    chat = []
    for n, q in enumerate(queries):
        body: dict[str, Any] = {
            "model": MODEL,
            "messages": [{"role": "user", "content": q}],
            "max_tokens": 8,
            "icl": {"pool": POOL, "k": K},
        }
        if n % STREAM_EVERY == 0:
            body["stream"] = True
        chat.append(post_bytes(url, "/v1/chat/completions", body, key=CLIENT_KEY))
    return select, chat


def _phase(url: str, raws: list[bytes], seconds: float, check: Any) -> LoadResult:
    return run(
        load(
            url,
            raws,
            concurrency=CLIENTS,
            duration_s=seconds,
            max_requests=2_000 * int(seconds),
            warmup_s=5.0,
            timeout_s=30.0,
            check=check,
        )
    )


def _describe(result: LoadResult) -> str:
    s = result.summary()
    return (
        f"{s['ok']:,} ok, {s['errors']} errors, {s['rps']:.0f} req/s, "
        f"p50 {s['latency_ms']['p50']:.0f} ms, p95 {s['latency_ms']['p95']:.0f} ms, "
        f"p99 {s['latency_ms']['p99']:.0f} ms"
    )


def test_sixteen_clients_on_select_and_chat(figures: Figures, tmp_path: Path) -> None:
    seconds = scale("load_seconds", 120, 600)
    name = "test_sixteen_clients_on_select_and_chat"
    queries = make_queries(5_000)
    with loaded_server(tmp_path) as (url, pid):
        select_raws, chat_raws = _requests(url, queries)
        with Sampler(pid) as sampler:
            selects = _phase(url, select_raws, seconds, check_select)
            chats = _phase(url, chat_raws, seconds, check_chat)
    fds = [fd for _, _, fd in sampler.samples]
    rss = [mib for _, mib, _ in sampler.samples]
    for label, result, bound in (
        ("select", selects, SELECT_P95_MS),
        ("chat (20% streaming)", chats, CHAT_P95_MS),
    ):
        s = result.summary()
        ok = s["errors"] == 0 and s["latency_ms"]["p95"] <= bound
        if label == "select":
            ok = ok and s["latency_ms"]["p99"] <= SELECT_P99_MS
        figures.record(
            "R1" if label == "select" else "R2",
            f"{CLIENTS} clients, {seconds:.0f} s of {label} on a {POOL_SIZE:,} pool",
            _describe(result),
            f"0 errors, p95 <= {bound:.0f} ms"
            + (f", p99 <= {SELECT_P99_MS:.0f} ms" if label == "select" else ""),
            ok,
            test=name,
        )
    figures.record(
        "R3",
        "server open descriptors and RSS during the load",
        f"fds {min(fds)}-{max(fds)}, RSS {min(rss):.0f}-{max(rss):.0f} MiB",
        f"fds after the load within {FD_SLACK} of those before it",
        fds[-1] - fds[0] <= FD_SLACK,
        test=name,
    )
    for result, bound in ((selects, SELECT_P95_MS), (chats, CHAT_P95_MS)):
        summary = result.summary()
        assert summary["errors"] == 0, summary
        assert summary["ok"] > CLIENTS * 10, summary
        assert summary["latency_ms"]["p95"] <= bound, summary
    assert selects.summary()["latency_ms"]["p99"] <= SELECT_P99_MS, selects.summary()
    assert fds[-1] - fds[0] <= FD_SLACK, sampler.samples


def test_soak_at_half_of_the_measured_throughput(figures: Figures, tmp_path: Path) -> None:
    seconds = scale("soak_seconds", 0, 3600)
    if seconds <= 0:
        pytest.skip("the soak runs nightly: scripts/reliability --nightly")
    queries = make_queries(5_000)
    with loaded_server(tmp_path) as (url, pid):
        select_raws, chat_raws = _requests(url, queries)
        mixed = [raw for pair in zip(select_raws, chat_raws, strict=True) for raw in pair]
        probe = _phase(url, mixed, 30.0, None)
        rate = max(1.0, probe.summary()["rps"] / 2)
        with Sampler(pid) as sampler:
            soak = run(
                load(
                    url,
                    mixed,
                    concurrency=CLIENTS,
                    duration_s=seconds,
                    max_requests=int(rate * seconds) + 1,
                    warmup_s=5.0,
                    timeout_s=30.0,
                    rate=rate,
                )
            )
    warm = [s for s in sampler.samples if s[0] - sampler.samples[0][0] >= min(300.0, seconds / 4)]
    growth = max(mib for _, mib, _ in warm) - warm[0][1]
    fds = [fd for _, _, fd in warm]
    passed = soak.summary()["errors"] == 0 and growth <= SOAK_RSS_GROWTH_MIB
    figures.record(
        "R3",
        f"soak: {seconds} s at {rate:.0f} req/s (half of {2 * rate:.0f}), select + chat",
        f"{_describe(soak)}; RSS growth after warm-up {growth:.1f} MiB; fds {min(fds)}-{max(fds)}",
        f"0 errors, RSS growth <= {SOAK_RSS_GROWTH_MIB:.0f} MiB, fds stable within 10",
        passed and max(fds) - min(fds) <= 10,
        test="test_soak_at_half_of_the_measured_throughput",
    )
    assert soak.summary()["errors"] == 0, soak.summary()
    assert growth <= SOAK_RSS_GROWTH_MIB, sampler.samples
    assert max(fds) - min(fds) <= 10, sampler.samples
