"""The upstream client's own cost: httpx with its default transport against httpx with
iclserve's HTTP/1.1 transport (app/llm/transport.py), and raw asyncio streams as the floor.

Usage: .venv/bin/python benchmarks/upstream_client.py [--requests 2000] [--warmup 200]
           [--json OUT] [--quick]

One process, one event loop (uvloop), one keep-alive connection per client, one request at a
time, against the zero-latency fake upstream (benchmarks/zero_upstream.py, a separate
process). The clients take turns request by request, so they see the same background load.
Each request is the same non-streaming chat completion, sent as iclserve sends it (a JSON
body, `Content-Type` and `Authorization` headers), and read to the end; the streaming rows
send `"stream": true` and read the SSE body to the end. The CPU column is this process's CPU
time per request (client work only: the upstream runs in its own process).

`--quick`: 300 requests, 50 warm-up.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: app

import httpx
from _common import machine_header, percentiles, probe_speed_at_start, table
from loadgen import Timer, loop_name, post_bytes, run
from zero_upstream import ZeroUpstream

from app.llm.transport import FastHTTPTransport

BODY = {
    "model": "bench",
    "messages": [{"role": "user", "content": "the striker scored twice in the final"}],
    "max_tokens": 8,
}


def httpx_call(client: httpx.AsyncClient, content: bytes) -> Callable[[], Awaitable[int]]:
    async def call() -> int:
        request = client.build_request(
            "POST",
            "/chat/completions",
            content=content,
            headers={"Content-Type": "application/json"},
        )
        response = await client.send(request, stream=True)
        try:
            size = 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
        finally:
            await response.aclose()
        if response.status_code != 200 or size == 0:
            raise RuntimeError(f"bad answer: {response.status_code}, {size} bytes")
        return size

    return call


def raw_call(timer: Timer, raw: bytes) -> Callable[[], Awaitable[int]]:
    async def call() -> int:
        reply = await timer.send(raw, keep_body=True)
        if reply is None or reply.status != 200:
            raise RuntimeError(f"bad answer: {reply}")
        return len(reply.body)

    return call


async def measure(base_url: str, requests: int, warmup: int) -> list[dict[str, Any]]:
    headers = {"Authorization": "Bearer upstream-key", "User-Agent": "iclserve"}
    default = httpx.AsyncClient(base_url=base_url, headers=headers)
    fast = httpx.AsyncClient(base_url=base_url, headers=headers, transport=FastHTTPTransport())
    timers: list[Timer] = []
    calls: dict[tuple[str, bool], Callable[[], Awaitable[int]]] = {}
    for stream in (False, True):
        content = json.dumps({**BODY, "stream": stream}).encode()
        calls[("httpx, default transport", stream)] = httpx_call(default, content)
        calls[("httpx, iclserve transport", stream)] = httpx_call(fast, content)
        timer = Timer(base_url)
        timers.append(timer)
        raw = post_bytes(base_url, "/chat/completions", content, key="upstream-key")
        calls[("raw asyncio streams (floor)", stream)] = raw_call(timer, raw)
    samples: dict[tuple[str, bool], list[float]] = {key: [] for key in calls}
    cpu: dict[tuple[str, bool], float] = dict.fromkeys(calls, 0.0)
    keys = list(calls)
    try:
        for i in range(warmup + requests):
            for j in range(len(keys)):
                key = keys[(i + j) % len(keys)]  # rotate who goes first
                started_cpu, started = time.process_time(), time.perf_counter()
                await calls[key]()
                elapsed = time.perf_counter() - started
                if i >= warmup:
                    samples[key].append(elapsed * 1e3)
                    cpu[key] += time.process_time() - started_cpu
    finally:
        await default.aclose()
        await fast.aclose()
        for timer in timers:
            timer.close()
    return [
        {
            "client": name,
            "stream": stream,
            "n": len(samples[(name, stream)]),
            **percentiles(samples[(name, stream)]),
            "cpu_us_per_request": cpu[(name, stream)] / requests * 1e6,
        }
        for name, stream in keys
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--json", help="write the results here as JSON")
    parser.add_argument("--quick", action="store_true", help="300 requests, 50 warm-up")
    args = parser.parse_args()
    probe_speed_at_start()
    if args.quick:
        args.requests, args.warmup = 300, 50
    if args.requests < 1 or args.warmup < 0:
        parser.error("need --requests >= 1 and --warmup >= 0")
    with ZeroUpstream(0.0) as upstream:
        rows = run(measure(upstream.base_url, args.requests, args.warmup))
    rows.sort(key=lambda r: (r["stream"], r["p50"]))
    print(
        machine_header(
            "upstream_client: the cost of one upstream call, by client",
            {
                "workload": f"{args.requests} sequential chat completions per row after "
                f"{args.warmup} warm-up rounds, keep-alive, rows in turn",
                "upstream": "benchmarks/zero_upstream.py, 0 ms delay (separate process)",
                "loop": loop_name(),
                "httpx": httpx.__version__,
            },
        )
    )
    print(
        table(
            ["client", "stream", "n", "p50 ms", "p95 ms", "p99 ms", "CPU µs/request"],
            [
                [
                    r["client"],
                    "yes" if r["stream"] else "no",
                    r["n"],
                    r["p50"],
                    r["p95"],
                    r["p99"],
                    r["cpu_us_per_request"],
                ]
                for r in rows
            ],
        )
    )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
