"""Added latency of /v1/chat/completions through iclserve, against the upstream called directly.

Usage: .venv/bin/python benchmarks/proxy.py [--requests 300] [--warmup 30] [--pool-size 10000]
           [--k 8] [--data-dir DIR] [--json OUT] [--quick]

`--quick` is 50 requests, 5 warm-up rounds and a 2k pool. `--data-dir DIR` keeps the seeded
pool in DIR and reuses it on the next run with the same pool size (the servers always run on
copies of it).

Setup: the zero-latency fake upstream (benchmarks/zero_upstream.py, a separate process); a
pool of `topic_rows(pool_size)` texts (outputs = their topic labels) uploaded once over HTTP
(JSONL, `mode=replace`) and embedded by the server with the packaged MiniLM; then two
iclserve processes on copies of that data directory, both routing every model to the fake:
  A  ICLSERVE_EMBEDDING__CACHE_SIZE=0: every request embeds its query (the honest case);
  B  the default query-embedding cache, filled with every timed query (one untimed request
     each) before the timed part.

Timed series, one request at a time on one keep-alive connection each, N distinct real text
queries (`topic_rows(N, seed=99)` inputs; warm-up uses other ones), every series in turn for
each query (the order rotates), so all series see the same background load:
  direct                  the fake upstream, body without `icl`
  iclserve pass-through   server A, body without `icl`
  iclserve + icl          server A, `"icl": {"pool": POOL, "k": K}`
  iclserve + icl cached   server B, the same body, its query embedding cached
each non-streaming and with `stream: true`. Streaming rows are given to the last byte and to
the first body byte (the first SSE chunk). "added p50" is the row's p50 minus the direct p50 of
the same timing. Bodies: `{"model": "bench", "messages": [{"role": "user", "content": q}],
"max_tokens": 8}`, with CLIENT_KEY through iclserve. Every answer is checked (status 200; JSON
with `icl.demonstrations` of length K; a stream that ends with `data: [DONE]` and has no error
event); a failed check is an error, not a timing.

The client is benchmarks/loadgen.py (raw asyncio streams, uvloop) in this process; the fake
upstream, the servers and the client share the machine's cores.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: tests.datasets

from _common import (
    ADMIN_KEY,
    CLIENT_KEY,
    http_json,
    iclserve,
    machine_header,
    percentiles,
    probe_speed_at_start,
    table,
    wait_job,
)
from loadgen import Reply, Timer, loop_name, post_bytes, run
from zero_upstream import ZeroUpstream

from tests.datasets import topic_rows

POOL = "bench"
MODEL = "bench"
SEED_MARKER = "bench-pool.json"


def upstreams_env(base_url: str) -> str:
    """ICLSERVE_UPSTREAMS routing every model to one fake upstream."""
    return json.dumps([{"name": "zero", "base_url": base_url, "models": ["*"]}])


def seed_data_dir(data_dir: Path, pool: str, size: int) -> float:
    """Upload `topic_rows(size)` as `pool` through a server on `data_dir`; seconds taken.

    Skipped (0.0) when `data_dir` already holds that pool from an earlier run (a marker file
    records what was seeded).
    """
    marker = data_dir / SEED_MARKER
    want = {"pool": pool, "size": size, "rows": "tests.datasets.topic_rows(size, seed=7)"}
    if marker.is_file() and json.loads(marker.read_text()) == want:
        return 0.0
    data_dir.mkdir(parents=True, exist_ok=True)
    rows = topic_rows(size)
    payload = "".join(
        json.dumps({"input": r["input"], "output": r["output"]}) + "\n" for r in rows
    ).encode()
    started = time.monotonic()
    with iclserve(data_dir) as (url, _pid):
        request = urllib.request.Request(
            f"{url}/v1/pools/{pool}/examples?mode=replace",
            data=payload,
            method="POST",
            headers={
                "Authorization": f"Bearer {ADMIN_KEY}",
                "Content-Type": "application/x-ndjson",
            },
        )
        with urllib.request.urlopen(request, timeout=600) as resp:
            job = json.loads(resp.read())["job"]
        wait_job(url, job["id"])
        info = http_json("GET", f"{url}/v1/pools/{pool}")
        if info.get("size") != size:
            raise RuntimeError(f"pool {pool} has {info.get('size')} rows, expected {size}")
    marker.write_text(json.dumps(want))
    return time.monotonic() - started


def copy_data_dir(seed_dir: Path, dest: Path) -> Path:
    """A private copy of a seeded (stopped) data directory for one server."""
    shutil.copytree(seed_dir, dest, ignore=shutil.ignore_patterns("*.log", SEED_MARKER))
    return dest


@contextmanager
def seeded_workspace(data_dir: str | None, pool: str, size: int) -> Iterator[tuple[Path, Path]]:
    """(seed dir, scratch dir): the seed dir is `data_dir` or a temporary one."""
    with tempfile.TemporaryDirectory(prefix="iclserve-bench-") as tmp:
        scratch = Path(tmp)
        seed_dir = Path(data_dir) if data_dir else scratch / "seed"
        seconds = seed_data_dir(seed_dir, pool, size)
        how = f"seeded in {seconds:.0f} s" if seconds else "reused"
        print(f"# pool {pool}: {size:,} rows ({how})", file=sys.stderr, flush=True)
        yield seed_dir, scratch


def chat_body(query: str, *, icl: dict[str, Any] | None, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": query}],
        "max_tokens": 8,
    }
    if stream:
        body["stream"] = True
    if icl is not None:
        body["icl"] = icl
    return body


def check_json(k: int | None) -> Callable[[Reply], str | None]:
    """A check for non-streaming answers: 200, choices, and K demonstrations when `k`."""

    def check(reply: Reply) -> str | None:
        if reply.status != 200:
            return f"HTTP {reply.status}: {reply.body[:200]!r}"
        try:
            answer = json.loads(reply.body)
        except ValueError:
            return f"not JSON: {reply.body[:200]!r}"
        if not answer.get("choices"):
            return f"no choices: {reply.body[:200]!r}"
        if k is not None:
            demos = (answer.get("icl") or {}).get("demonstrations")
            if not isinstance(demos, list) or len(demos) != k:
                return f"expected {k} demonstrations: {reply.body[:200]!r}"
        return None

    return check


def check_stream(reply: Reply) -> str | None:
    if reply.status != 200:
        return f"HTTP {reply.status}: {reply.body[:200]!r}"
    if not reply.body.rstrip().endswith(b"data: [DONE]"):
        return f"stream without [DONE]: {reply.body[-200:]!r}"
    if b'"error"' in reply.body:
        return f"error event: {reply.body[:200]!r}"
    return None


def answer_label(body: bytes) -> str | None:
    """The fake's answer is "<first query word> <nearest demonstration's output>"."""
    try:
        content = json.loads(body)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    words = str(content).split()
    return words[-1] if len(words) >= 2 else None


SERIES = (
    # name, server ("direct" | "A" | "B"), icl, whether its cache is filled before timing
    ("direct", "direct", False, False),
    ("iclserve pass-through", "A", False, False),
    ("iclserve + icl", "A", True, False),
    ("iclserve + icl cached", "B", True, True),
)


async def measure(
    urls: dict[str, str],
    queries: list[str],
    topics: list[str],
    warm_queries: list[str],
    k: int,
) -> tuple[dict[tuple[str, bool], Timer], dict[str, int]]:
    """Time every series in turn for each query; the timers hold the results."""
    icl = {"pool": POOL, "k": k}
    timers: dict[tuple[str, bool], Timer] = {}
    for name, server, with_icl, _prime in SERIES:
        for stream in (False, True):
            check = check_stream if stream else check_json(k if with_icl else None)
            timers[(name, stream)] = Timer(urls[server], check=check)

    def raw(name: str, stream: bool, query: str) -> bytes:
        server, with_icl = next((s, i) for n, s, i, _ in SERIES if n == name)
        body = chat_body(query, icl=icl if with_icl else None, stream=stream)
        key = None if server == "direct" else CLIENT_KEY
        return post_bytes(urls[server], "/chat/completions", body, key=key)

    keys = list(timers)
    for query in warm_queries:
        for name, stream in keys:
            await timers[(name, stream)].send(raw(name, stream, query))
    # The cached series' queries go to server B once, untimed, before the timed part: a
    # forward pass in that neighbour process, in the middle of the rotation, would load the
    # cores and caches under the other series' timed requests.
    for name, _server, _icl, prime in SERIES:
        if prime:
            for query in queries:
                await timers[(name, False)].send(raw(name, False, query))
    labels = {"match": 0, "answers": 0}
    for i, (query, topic) in enumerate(zip(queries, topics, strict=True)):
        # Encode outside the timed calls; rotate the order so no series always goes first.
        raws = {key: raw(key[0], key[1], query) for key in keys}
        for j in range(len(keys)):
            name, stream = keys[(i + j) % len(keys)]
            reply = await timers[(name, stream)].measure(raws[(name, stream)])
            if name == "iclserve + icl" and not stream and reply is not None:
                labels["answers"] += 1
                labels["match"] += answer_label(reply.body) == topic
    for timer in timers.values():
        timer.close()
    return timers, labels


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=300, help="timed requests per series")
    parser.add_argument("--warmup", type=int, default=30, help="untimed rounds first")
    parser.add_argument("--pool-size", type=int, default=10_000)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--data-dir", help="keep (and reuse) the seeded pool here")
    parser.add_argument("--json", help="write the results here as JSON")
    parser.add_argument("--quick", action="store_true", help="50 requests, 5 warm-up, 2k pool")
    args = parser.parse_args()
    probe_speed_at_start()
    if args.quick:
        args.requests, args.warmup, args.pool_size = 50, 5, 2_000
    if args.requests < 1 or args.warmup < 0 or args.pool_size < args.k:
        parser.error("need --requests >= 1, --warmup >= 0 and --pool-size >= --k")

    rows = topic_rows(args.requests + args.warmup, seed=99)
    queries = [r["input"] for r in rows[: args.requests]]
    topics = [r["output"] for r in rows[: args.requests]]
    warm_queries = [r["input"] for r in rows[args.requests :]]

    with ExitStack() as stack:
        seed_dir, scratch = stack.enter_context(
            seeded_workspace(args.data_dir, POOL, args.pool_size)
        )
        upstream = stack.enter_context(ZeroUpstream(0.0))
        common_env = {"ICLSERVE_UPSTREAMS": upstreams_env(upstream.base_url)}
        url_a, _ = stack.enter_context(
            iclserve(
                copy_data_dir(seed_dir, scratch / "a"),
                env={**common_env, "ICLSERVE_EMBEDDING__CACHE_SIZE": "0"},
            )
        )
        url_b, _ = stack.enter_context(
            iclserve(copy_data_dir(seed_dir, scratch / "b"), env=common_env)
        )
        urls = {"direct": upstream.base_url, "A": f"{url_a}/v1", "B": f"{url_b}/v1"}
        print(
            f"# timing {len(SERIES) * 2} series x {len(queries)} requests",
            file=sys.stderr,
            flush=True,
        )
        started = time.monotonic()
        timers, labels = run(measure(urls, queries, topics, warm_queries, args.k))
        seconds = time.monotonic() - started

    results: list[dict[str, Any]] = []
    for name, _server, _icl, _prime in SERIES:
        for stream in (False, True):
            res = timers[(name, stream)].result
            timings = [("stream, last byte", res.latencies_ms), ("stream, first byte", res.ttfb_ms)]
            for timing, samples in timings if stream else [("response", res.latencies_ms)]:
                results.append(
                    {
                        "mode": name,
                        "stream": stream,
                        "timing": timing,
                        "n": len(samples),
                        "errors": len(res.errors),
                        "error_samples": res.errors[:3],
                        **percentiles(samples),
                    }
                )
    direct = {r["timing"]: r["p50"] for r in results if r["mode"] == "direct"}
    for r in results:
        r["added_p50"] = r["p50"] - direct[r["timing"]]

    header = machine_header(
        "proxy: added latency of /v1/chat/completions through iclserve",
        {
            "setup": f"pool {args.pool_size:,} rows (topic_rows), k={args.k}, "
            f"{args.requests} distinct real-text queries per series after {args.warmup} "
            "warm-up rounds, one request at a time, keep-alive",
            "upstream": "benchmarks/zero_upstream.py, 0 ms delay (separate process)",
            "servers": "A: ICLSERVE_EMBEDDING__CACHE_SIZE=0 (every request embeds); "
            "B: default cache, each query sent twice, the second timed",
            "client": f"benchmarks/loadgen.py, raw asyncio streams on {loop_name()}, in the "
            "benchmark process; client, servers and fake share the cores",
            "icl sanity": f"{labels['match']}/{labels['answers']} non-streaming icl answers "
            "carry the query's topic as the nearest demonstration's label",
            "wall": f"{seconds:.1f} s for the timed part",
        },
    )
    print(header)
    print(
        table(
            [
                "mode",
                "stream",
                "timing",
                "n",
                "errors",
                "p50 ms",
                "p95 ms",
                "p99 ms",
                "added p50 ms",
            ],
            [
                [
                    r["mode"],
                    "yes" if r["stream"] else "no",
                    r["timing"],
                    r["n"],
                    r["errors"],
                    r["p50"],
                    r["p95"],
                    r["p99"],
                    r["added_p50"],
                ]
                for r in results
            ],
        )
    )
    errors = [e for r in results for e in r["error_samples"]]
    if errors:
        print("errors (first ones):")
        for e in dict.fromkeys(errors):
            print(f"- {e}")
    if args.json:
        out = {
            "benchmark": "proxy",
            "header": header,
            "config": {
                "requests": args.requests,
                "warmup": args.warmup,
                "pool_size": args.pool_size,
                "k": args.k,
            },
            "icl_label_match": labels,
            "rows": results,
        }
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
