"""In-process selection latency: the pipeline's stages against the raw FAISS search floor.

Usage: .venv/bin/python benchmarks/select_inprocess.py [--sizes 1000,10000,100000] [--queries 200]

For each pool size it builds a pool snapshot (vectors: the packaged MiniLM embedding of
synthetic topical sentences for the first 10k rows, random unit vectors beyond, which is
enough for timing an exact scan), then times, over the same real text queries:
  faiss      IndexFlatIP search of a precomputed query vector (the floor of exact search)
  select     embed (MiniLM, cache off) + retrieve + kNN + order, as a request does
  cached     the same with the query embedding served from the LRU cache
and prints p50 / p95 / p99 in milliseconds with the machine's thread settings.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.snapshot import MemberLabels, PoolSnapshot
from retrievers.cache import CachedEmbedder
from retrievers.faiss_index import FlatIPIndex
from retrievers.sentence_transformer import SentenceTransformerEmbedder
from selection.base import SelectionContext
from selection.knn import KnnSpec
from selection.ordering import build_orderer
from tests.datasets import topic_rows

K = 8


def percentiles(samples: list[float]) -> tuple[float, float, float]:
    ordered = sorted(samples)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    return at(0.50), at(0.95), at(0.99)


def build_pool(
    n: int, embedder: SentenceTransformerEmbedder, rng: np.random.Generator
) -> PoolSnapshot:
    rows = topic_rows(min(n, 10_000))
    vectors = np.empty((n, embedder.dim), dtype=np.float32)
    vectors[: len(rows)] = embedder.embed([r["input"] for r in rows])
    if n > len(rows):
        extra = rng.standard_normal((n - len(rows), embedder.dim)).astype(np.float32)
        vectors[len(rows) :] = extra / np.linalg.norm(extra, axis=1, keepdims=True)
    labels = [rows[i % len(rows)]["output"] for i in range(n)]
    members = MemberLabels(
        ids=np.arange(1, n + 1, dtype=np.int64),
        labeled=np.ones(n, dtype=np.bool_),
        labels=labels,
    )
    return PoolSnapshot.build(
        pool="bench",
        version=1,
        embedder_name=embedder.name,
        dim=embedder.dim,
        members=members,
        vectors=vectors,
    )


def run_pipeline(
    snapshot: PoolSnapshot, embedder: CachedEmbedder | SentenceTransformerEmbedder, query: str
) -> None:
    spec = KnnSpec()
    vector = embedder.embed([query])[0]
    candidates = snapshot.retrieve(vector, spec.candidate_request(K))
    ctx = SelectionContext(
        pool="bench", pool_version=1, rng=np.random.default_rng(0), label_names=snapshot.label_names
    )
    chosen = spec.build(snapshot.label_names).select(vector, candidates, K, ctx)
    build_orderer("nearest_last").order(vector, chosen, ctx)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--queries", type=int, default=200)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    embedder = SentenceTransformerEmbedder()
    embedder.open()
    queries = [r["input"].lower().rstrip(".") + " today" for r in topic_rows(args.queries, seed=99)]
    query_vectors = embedder.embed(queries)
    rng = np.random.default_rng(0)

    print(
        f"# select_inprocess  python {platform.python_version()}  "
        f"cpu {platform.processor() or platform.machine()}"
        f"  cores {os.cpu_count()}  OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"
    )
    print(f"# k={K}, {len(queries)} distinct queries, embedder {embedder.name}")
    print()
    print("| pool size | stage | p50 ms | p95 ms | p99 ms |")
    print("|---:|---|---:|---:|---:|")
    for n in sizes:
        snapshot = build_pool(n, embedder, rng)
        index: FlatIPIndex = snapshot.index
        for q in query_vectors[:10]:
            index.search(q.reshape(1, -1), K)
        results: dict[str, list[float]] = {"faiss": [], "select": [], "cached": []}
        for q in query_vectors:
            t = time.perf_counter()
            index.search(q.reshape(1, -1), K)
            results["faiss"].append((time.perf_counter() - t) * 1e3)
        for query in queries:
            t = time.perf_counter()
            run_pipeline(snapshot, embedder, query)
            results["select"].append((time.perf_counter() - t) * 1e3)
        cached = CachedEmbedder(embedder, capacity=len(queries))
        cached.embed(queries)
        for query in queries:
            t = time.perf_counter()
            run_pipeline(snapshot, cached, query)
            results["cached"].append((time.perf_counter() - t) * 1e3)
        for stage, samples in results.items():
            p50, p95, p99 = percentiles(samples)
            print(f"| {n:,} | {stage} | {p50:.2f} | {p95:.2f} | {p99:.2f} |")
        del snapshot


if __name__ == "__main__":
    main()
