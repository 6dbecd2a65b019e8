"""Query-embedding backends: latency, batch throughput and what int8 costs in retrieval quality.

Usage: .venv/bin/python benchmarks/embedding.py [--pool 8000] [--queries 300] [--json OUT]
           [--quick]

All rows embed the same real texts (Rotten Tomatoes snippets, the quality benchmark's
dataset): the first `--pool` as the pool, the next `--queries` as queries. Rows:

  torch          sentence-transformers `encode` (PyTorch eager): the LangChain peer's path
  onnx fp32      iclserve's default query embedder (retrievers/onnx_embedder.py)
  onnx int8 ...  the same graph through ONNX Runtime's dynamic quantization
                 (`quantize_dynamic`, per-channel int8 weights): every MatMul, only the
                 feed-forward input MatMuls, only the attention Q/K/V MatMuls

Latency: one query per call, p50/p95 over the queries after 20 warm-up calls, for 1 and 2
intra-op threads. A second table times the default embedder (2 threads) on one query after a
pause of 0, 5, 20 and 50 ms, as a lone request sees it, three ways: `embed` without CPU
pinning, `embed` with pinning of passes that follow an idle spell (`retrievers/placement.py`),
and `embed_alone`, the lone-query session (fused graph, threads spinning during the pass,
pinned) that a request alone in the server uses. The three alternate query by query in a
rotating order, so all see the same machine (each also idles during the others' passes, so
even the 0 ms rows follow a few ms of idleness). Throughput: texts/s embedding 256 queries in
batches of 64. Quality: recall@8 of each row's query vectors against the pool's fp32
vectors, relative to the fp32 query's exact top-8 (what a query embedded that way would
retrieve from a pool uploaded in fp32), and the mean cosine between the row's query vectors
and the fp32 ones.

Every figure comes from this one run; `--quick` uses a 2,000-row pool and 100 queries.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import machine_header, probe_speed_at_start, table

os.environ.setdefault("HF_HUB_OFFLINE", "1")

K = 8
WARMUP = 20
THROUGHPUT_TEXTS = 256


def texts(pool: int, queries: int) -> tuple[list[str], list[str]]:
    from app.evaluation.datasets import load_dataset

    items = [item.text for item in load_dataset("rotten_tomatoes").items]
    if len(items) < pool + queries:
        raise SystemExit(f"the dataset has {len(items)} rows, fewer than pool + queries")
    return items[:pool], items[pool : pool + queries]


def p50_p95(times_ms: list[float]) -> dict[str, float]:
    times = sorted(times_ms)
    return {"p50": statistics.median(times), "p95": times[int(0.95 * (len(times) - 1))]}


def latency(embed: Callable[[list[str]], Any], queries: Sequence[str]) -> dict[str, float]:
    for q in queries[:WARMUP]:
        embed([q])
    times = []
    for q in queries:
        started = time.perf_counter()
        embed([q])
        times.append((time.perf_counter() - started) * 1e3)
    return p50_p95(times)


def throughput(embed: Callable[[list[str]], Any], queries: Sequence[str]) -> float:
    batch = list(queries[:THROUGHPUT_TEXTS])
    started = time.perf_counter()
    embed(batch)
    return len(batch) / (time.perf_counter() - started)


def top_k(queries: NDArray[np.float32], pool: NDArray[np.float32]) -> NDArray[np.int64]:
    scores = queries.astype(np.float64) @ pool.astype(np.float64).T
    return np.argsort(-scores, axis=1, kind="stable")[:, :K]


def recall(found: NDArray[np.int64], truth: NDArray[np.int64]) -> float:
    return float(np.mean([len(set(a) & set(b)) / K for a, b in zip(found, truth, strict=True)]))


def quantized_graphs(graph: bytes, workdir: Path) -> dict[str, bytes]:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    source = workdir / "fp32.onnx"
    source.write_bytes(graph)
    model = onnx.load(str(source))
    weights = {init.name for init in model.graph.initializer}
    matmuls = [
        node.name
        for node in model.graph.node
        if node.op_type == "MatMul" and any(name in weights for name in node.input)
    ]
    variants = {
        "onnx int8, every MatMul": matmuls,
        "onnx int8, feed-forward input MatMuls": [n for n in matmuls if "intermediate" in n],
        "onnx int8, attention Q/K/V MatMuls": [n for n in matmuls if "/self/" in n],
    }
    out: dict[str, bytes] = {}
    for name, nodes in variants.items():
        target = workdir / f"{len(out)}.onnx"
        quantize_dynamic(
            str(source),
            str(target),
            weight_type=QuantType.QInt8,
            per_channel=True,
            nodes_to_quantize=nodes,
        )
        out[name] = target.read_bytes()
    return out


PAUSES_MS = (0, 5, 20, 50)


def after_pauses(queries: Sequence[str]) -> list[dict[str, Any]]:
    """p50/p95 of one query after each pause, for each way of embedding it, interleaved."""
    from retrievers.onnx_embedder import OnnxEmbedder, default_cache_dir

    unpinned = OnnxEmbedder(
        threads=2, cache_dir=default_cache_dir(), pin_threads=False, lone_query_session=False
    )
    pinned = OnnxEmbedder(threads=2, cache_dir=default_cache_dir())
    ways: dict[str, tuple[Callable[[str], Any], Any]] = {
        "embed, unpinned": (lambda q: unpinned.embed([q]), None),
        "embed, pinned": (lambda q: pinned.embed([q]), lambda: pinned.pinning),
        "embed_alone, pinned": (pinned.embed_alone, lambda: pinned.lone_pinning),
    }
    for embedder in (unpinned, pinned):
        embedder.open()
    for embed, _ in ways.values():
        for q in queries[:WARMUP]:
            embed(q)
    names = list(ways)

    def pinned_passes(name: str) -> int:
        pins = ways[name][1]() if ways[name][1] is not None else None
        return int(pins.pinned_passes) if pins is not None else 0

    rows = []
    for pause in PAUSES_MS:
        times: dict[str, list[float]] = {name: [] for name in names}
        pinned_before = {name: pinned_passes(name) for name in names}
        for i, q in enumerate(queries):
            for name in names[i % 3 :] + names[: i % 3]:
                time.sleep(pause / 1e3)
                started = time.perf_counter()
                ways[name][0](q)
                times[name].append((time.perf_counter() - started) * 1e3)
        for name, samples in times.items():
            lat = p50_p95(samples)
            rows.append(
                {
                    "pause_ms": pause,
                    "way": name,
                    "p50_ms": lat["p50"],
                    "p95_ms": lat["p95"],
                    "pinned_passes": pinned_passes(name) - pinned_before[name],
                }
            )
    return rows


def onnx_embedder(threads: int, graph: bytes | None = None) -> Any:
    """iclserve's ONNX embedder; with `graph`, the same tokenizer and pooling on another graph."""
    import onnxruntime as ort

    from retrievers.onnx_embedder import OnnxEmbedder, default_cache_dir

    embedder = OnnxEmbedder(threads=threads, cache_dir=default_cache_dir())
    embedder.open()
    if graph is not None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        embedder._session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
    return embedder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--pool", type=int, default=8000)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--json", help="also write the rows as JSON here")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    probe_speed_at_start()
    if args.quick:
        args.pool, args.queries = 2000, 100
    pool_texts, queries = texts(args.pool, args.queries)

    from retrievers.onnx_embedder import _cached_graph, default_cache_dir
    from retrievers.sentence_transformer import SentenceTransformerEmbedder, packaged_model_path

    print("# embedding the pool in fp32 (reference)", file=sys.stderr, flush=True)
    reference = onnx_embedder(threads=os.cpu_count() or 1)
    pool = reference.embed(pool_texts)
    fp32_queries = reference.embed(queries)
    truth = top_k(fp32_queries, pool)
    graph = _cached_graph(packaged_model_path(), default_cache_dir())

    rows: list[dict[str, Any]] = []

    def measure(name: str, threads: int, embedder: Any) -> None:
        print(f"# {name}, {threads} thread(s)", file=sys.stderr, flush=True)
        vectors = embedder.embed(queries)
        lat = latency(embedder.embed, queries)
        rows.append(
            {
                "backend": name,
                "threads": threads,
                "p50_ms": lat["p50"],
                "p95_ms": lat["p95"],
                "texts_per_s": throughput(embedder.embed, queries),
                "recall_at_8": recall(top_k(vectors, pool), truth),
                "mean_cos_to_fp32": float(np.mean(np.sum(vectors * fp32_queries, axis=1))),
            }
        )

    import torch

    for threads in (1, 2):
        torch.set_num_threads(threads)
        measure("torch (sentence-transformers encode)", threads, SentenceTransformerEmbedder())
    for threads in (1, 2):
        measure("onnx fp32 (default)", threads, onnx_embedder(threads))
    with tempfile.TemporaryDirectory() as tmp:
        variants = quantized_graphs(graph, Path(tmp))
    for name, variant in variants.items():
        for threads in (1, 2):
            measure(name, threads, onnx_embedder(threads, variant))

    print(
        machine_header(
            "Query embedding backends",
            {
                "texts": f"Rotten Tomatoes: pool {len(pool_texts):,}, queries {len(queries):,}",
                "recall": f"recall@{K} against the fp32 query's exact top-{K} over the fp32 pool",
                "latency": f"one query per call, after {WARMUP} warm-up calls",
                "throughput": f"{THROUGHPUT_TEXTS} queries in batches of 64",
            },
        )
    )
    print(
        table(
            [
                "backend",
                "threads",
                "p50 ms",
                "p95 ms",
                "texts/s (batch)",
                f"recall@{K}",
                "mean cos to fp32",
            ],
            [
                [
                    r["backend"],
                    r["threads"],
                    r["p50_ms"],
                    r["p95_ms"],
                    r["texts_per_s"],
                    f"{r['recall_at_8']:.3f}",
                    f"{r['mean_cos_to_fp32']:.4f}",
                ]
                for r in rows
            ],
        )
    )
    print("# one query after a pause (2 threads)", file=sys.stderr, flush=True)
    paused = after_pauses(queries)
    print()
    print(
        table(
            ["pause before the query ms", "call", "p50 ms", "p95 ms", "pinned passes"],
            [
                [r["pause_ms"], r["way"], r["p50_ms"], r["p95_ms"], r["pinned_passes"]]
                for r in paused
            ],
        )
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"backends": rows, "after_pause": paused}, indent=2))


if __name__ == "__main__":
    main()
