"""Throughput of iclserve under C concurrent clients: /select and chat completions with icl.

Usage: .venv/bin/python benchmarks/load.py [--concurrency 16] [--duration 30] [--warmup 5]
           [--max-requests 100000] [--pool-size 10000] [--k 8] [--delay-ms 50]
           [--endpoints select,chat] [--mixes distinct,repeat] [--data-dir DIR]
           [--json OUT] [--quick]

`--quick` is 5 s measured after 2 s of warm-up, on a 2k pool. `--data-dir DIR` keeps the
seeded pool in DIR and reuses it (see benchmarks/proxy.py; servers run on copies).

Endpoints (k = 8, CLIENT_KEY):
  select  POST /v1/pools/{pool}/select  {"query": q, "k": 8}
  chat    POST /v1/chat/completions     {"model": "bench", "messages": [{"role": "user",
          "content": q}], "max_tokens": 8, "icl": {"pool": POOL, "k": 8}}, against the fake
          upstream (benchmarks/zero_upstream.py) answering after `--delay-ms` (50 ms)
Query mixes (each on its own iclserve process, on a copy of the seeded data directory):
  distinct  every request a different query, ICLSERVE_EMBEDDING__CACHE_SIZE=0: every
            request embeds its query
  repeat    500 distinct queries cycled, the default query-embedding cache on; each query
            is sent once before the warm-up (untimed), so the run sees the steady state
            of repeated traffic: every embedding is a cache hit
Queries are `topic_rows(n, seed=99)` inputs, lower-cased, with varied suffixes to make as many
distinct ones as needed. The pool is `topic_rows(pool_size)` (outputs = topic labels).

Each row is a closed loop of C keep-alive connections (benchmarks/loadgen.py) for `--duration`
seconds or `--max-requests` requests, whichever comes first, after an unrecorded warm-up.
Reported: requests, errors (connection errors, timeouts, non-2xx), req/s (2xx per second),
latency p50/p95/p99, the server's CPU per request and in % of one core (utime+stime of the
process over the measured phase), the load generator's own CPU per request, and the server's
peak RSS so far (VmHWM: it covers the earlier rows on the same server too). The load
generator is one process sharing the cores with the server and the fake upstream.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: tests.datasets

from _common import CLIENT_KEY, iclserve, machine_header, peak_rss_mib, probe_speed_at_start, table
from loadgen import load, loop_name, post_bytes, run
from proxy import MODEL, POOL, copy_data_dir, seeded_workspace, upstreams_env
from zero_upstream import ZeroUpstream, process_cpu_seconds

from tests.datasets import topic_rows

SUFFIXES = (
    "",
    " today",
    " again",
    " this week",
    " according to reports",
    " said the report",
    " in the news",
    " late at night",
    " before noon",
    " after the break",
)
BASE_QUERIES = 5000
REPEAT_QUERIES = 500
PREFILL_LIMIT_S = 300.0  # bound on sending each repeat query once before the warm-up
MAX_RATE = 3000  # req/s: distinct queries to prepare per second of a run


def make_queries(n: int) -> list[str]:
    """`n` distinct lower-cased query texts: topic sentences times suffixes (then numbered)."""
    base = [r["input"].lower().rstrip(".") for r in topic_rows(min(n, BASE_QUERIES), seed=99)]
    seen: set[str] = set()
    out: list[str] = []
    for i in range(n):
        round_, pos = divmod(i, len(base))
        suffix = SUFFIXES[round_ % len(SUFFIXES)]
        if round_ >= len(SUFFIXES):
            suffix += f" (take {round_ // len(SUFFIXES) + 1})"
        text = base[pos] + suffix
        if text in seen:
            text += f" [{i}]"
        seen.add(text)
        out.append(text)
    return out


def request_bytes(url: str, endpoint: str, queries: list[str], k: int) -> list[bytes]:
    """Pre-encoded requests, one per query (the JSON around the query is encoded once)."""
    v1 = f"{url}/v1"
    if endpoint == "select":
        path = f"/pools/{POOL}/select"
        head, tail = '{"query":', f',"k":{k}}}'
    else:
        path = "/chat/completions"
        head = f'{{"model":{json.dumps(MODEL)},"messages":[{{"role":"user","content":'
        tail = f'}}],"max_tokens":8,"icl":{{"pool":{json.dumps(POOL)},"k":{k}}}}}'
    return [
        post_bytes(v1, path, (head + json.dumps(q) + tail).encode(), key=CLIENT_KEY)
        for q in queries
    ]


def run_row(
    url: str,
    pid: int,
    upstream: ZeroUpstream,
    endpoint: str,
    mix: str,
    queries: list[str],
    args: argparse.Namespace,
) -> dict[str, Any]:
    raws = request_bytes(url, endpoint, queries, args.k)
    cpu: dict[str, float] = {}

    def on_phase(phase: str) -> None:
        cpu[f"server_{phase}"] = process_cpu_seconds(pid)
        cpu[f"upstream_{phase}"] = upstream.cpu_seconds()

    print(
        f"# {endpoint} / {mix}: C={args.concurrency}, {args.warmup:g} s warm-up, "
        f"{args.duration:g} s or {args.max_requests:,} requests",
        file=sys.stderr,
        flush=True,
    )
    prefill: dict[str, Any] = {}
    if mix == "repeat":
        # Steady state of repeated traffic: every query has been seen once (cache filled).
        filled = run(
            load(
                url,
                raws,
                concurrency=args.concurrency,
                duration_s=PREFILL_LIMIT_S,
                max_requests=len(raws),
                timeout_s=args.timeout,
            )
        ).summary()
        prefill = {k: filled[k] for k in ("requests", "ok", "errors", "elapsed_s")}
    result = run(
        load(
            url,
            raws,
            concurrency=args.concurrency,
            duration_s=args.duration,
            max_requests=args.max_requests,
            warmup_s=args.warmup,
            warmup_requests=args.warmup_requests if args.warmup > 0 else 0,
            timeout_s=args.timeout,
            on_phase=on_phase,
        )
    )
    summary = result.summary()
    done = summary["ok"] + sum(
        n for code, n in summary["statuses"].items() if not 200 <= int(code) < 300
    )
    server_cpu = cpu["server_measure_end"] - cpu["server_measure_start"]
    upstream_cpu = cpu["upstream_measure_end"] - cpu["upstream_measure_start"]
    elapsed = summary["elapsed_s"]
    return {
        "endpoint": endpoint,
        "mix": mix,
        **summary,
        "server_cpu_s": round(server_cpu, 3),
        "server_cpu_ms_per_req": 1e3 * server_cpu / done if done else float("nan"),
        "server_cpu_pct": 100.0 * server_cpu / elapsed if elapsed else float("nan"),
        "upstream_cpu_ms_per_req": 1e3 * upstream_cpu / done if done else float("nan"),
        "server_peak_rss_mib": peak_rss_mib(pid),
        "prefill": prefill,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-c", "--concurrency", type=int, default=16)
    parser.add_argument("--duration", type=float, default=30.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=5.0, help="warm-up seconds")
    parser.add_argument("--warmup-requests", type=int, default=20_000, help="warm-up cap")
    parser.add_argument("--max-requests", type=int, default=100_000)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    parser.add_argument("--pool-size", type=int, default=10_000)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--delay-ms", type=float, default=50.0, help="fake upstream delay")
    parser.add_argument("--endpoints", default="select,chat")
    parser.add_argument("--mixes", default="distinct,repeat")
    parser.add_argument("--data-dir", help="keep (and reuse) the seeded pool here")
    parser.add_argument("--json", help="write the results here as JSON")
    parser.add_argument("--quick", action="store_true", help="5 s after 2 s warm-up, 2k pool")
    args = parser.parse_args()
    probe_speed_at_start()
    if args.quick:
        args.duration, args.warmup, args.pool_size = 5.0, 2.0, 2_000
    endpoints = [e for e in args.endpoints.split(",") if e]
    mixes = [m for m in args.mixes.split(",") if m]
    if not set(endpoints) <= {"select", "chat"} or not set(mixes) <= {"distinct", "repeat"}:
        parser.error("--endpoints is a subset of select,chat; --mixes of distinct,repeat")
    if args.concurrency < 1 or args.max_requests < 1 or args.duration <= 0:
        parser.error("--concurrency, --max-requests and --duration must be positive")

    # Enough distinct bodies for every request a row can send (warm-up included), up to a
    # rate no configuration reaches on a small box (the summary says if they wrapped).
    n_distinct = min(
        args.max_requests + (args.warmup_requests if args.warmup > 0 else 0),
        int((args.duration + args.warmup) * MAX_RATE) + 1,
    )
    started = time.monotonic()
    distinct = make_queries(n_distinct)
    repeat = distinct[:REPEAT_QUERIES]
    print(
        f"# {len(distinct):,} distinct queries in {time.monotonic() - started:.1f} s",
        file=sys.stderr,
        flush=True,
    )

    results: list[dict[str, Any]] = []
    with (
        seeded_workspace(args.data_dir, POOL, args.pool_size) as (seed_dir, scratch),
        ZeroUpstream(args.delay_ms) as upstream,
    ):
        env = {"ICLSERVE_UPSTREAMS": upstreams_env(upstream.base_url)}
        for mix in mixes:
            server_env = (
                {**env, "ICLSERVE_EMBEDDING__CACHE_SIZE": "0"} if mix == "distinct" else env
            )
            with iclserve(copy_data_dir(seed_dir, scratch / mix), env=server_env) as (url, pid):
                for endpoint in endpoints:
                    queries = distinct if mix == "distinct" else repeat
                    results.append(run_row(url, pid, upstream, endpoint, mix, queries, args))

    header = machine_header(
        "load: throughput under concurrent clients",
        {
            "setup": f"pool {args.pool_size:,} rows (topic_rows), k={args.k}, "
            f"C={args.concurrency} keep-alive connections, closed loop, "
            f"{args.duration:g} s (or {args.max_requests:,} requests) after {args.warmup:g} s "
            "warm-up",
            "mixes": "distinct = every query new, ICLSERVE_EMBEDDING__CACHE_SIZE=0; "
            f"repeat = {REPEAT_QUERIES} queries cycled, default cache, each query sent once "
            "before the warm-up (cache hits)",
            "upstream": f"benchmarks/zero_upstream.py, {args.delay_ms:g} ms delay "
            "(separate process), for chat",
            "client": f"benchmarks/loadgen.py, raw asyncio streams on {loop_name()}, one "
            "process sharing the cores with the server and the fake upstream",
            "columns": "server CPU: utime+stime of the server process over the measured "
            "phase; peak RSS: the server's VmHWM so far (earlier rows on the same server "
            "included)",
        },
    )
    print(header)
    print(
        table(
            [
                *("endpoint", "mix", "C", "requests", "errors", "req/s"),
                *("p50 ms", "p95 ms", "p99 ms", "server CPU ms/req", "server CPU %"),
                *("loadgen CPU ms/req", "peak RSS MiB"),
            ],
            [
                [
                    "select" if r["endpoint"] == "select" else "chat + icl",
                    r["mix"],
                    r["concurrency"],
                    r["requests"],
                    r["errors"],
                    r["rps"],
                    r["latency_ms"]["p50"],
                    r["latency_ms"]["p95"],
                    r["latency_ms"]["p99"],
                    r["server_cpu_ms_per_req"],
                    r["server_cpu_pct"],
                    r["loadgen_cpu_ms_per_req"],
                    r["server_peak_rss_mib"],
                ]
                for r in results
            ],
        )
    )
    for r in results:
        if r["error_samples"]:
            print(f"errors in {r['endpoint']} / {r['mix']}: {r['error_kinds']} {r['statuses']}")
            for sample in r["error_samples"]:
                print(f"- {sample}")
        if r["bodies_wrapped"] and r["mix"] == "distinct":
            print(f"note: {r['endpoint']} / distinct ran out of distinct queries and wrapped")
    if args.json:
        out = {
            "benchmark": "load",
            "header": header,
            "config": {
                k: getattr(args, k)
                for k in (
                    "concurrency",
                    "duration",
                    "warmup",
                    "warmup_requests",
                    "max_requests",
                    "pool_size",
                    "k",
                    "delay_ms",
                )
            },
            "rows": results,
        }
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
