"""Shared pieces of the performance benchmarks: percentiles, the machine header, a pool
written straight into a data directory, and an iclserve process on 127.0.0.1.

Every benchmark prints a Markdown table after a header that names the CPU, the thread
settings and the library versions, so a figure is never read without its conditions.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
import resource
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ADMIN_KEY = "bench-admin-key"
CLIENT_KEY = "bench-client-key"


def percentiles(samples_ms: Sequence[float]) -> dict[str, float]:
    """p50 / p95 / p99 (nearest rank) and the mean of a list of milliseconds."""
    if not samples_ms:
        return {"p50": float("nan"), "p95": float("nan"), "p99": float("nan"), "mean": float("nan")}
    arr = np.sort(np.asarray(samples_ms, dtype=np.float64))

    def at(q: float) -> float:
        return float(arr[min(arr.size - 1, max(0, int(np.ceil(q * arr.size)) - 1))])

    return {"p50": at(0.50), "p95": at(0.95), "p99": at(0.99), "mean": float(arr.mean())}


def peak_rss_mib(pid: int | None = None) -> float:
    """Peak resident memory: of this process, or of `pid` (Linux VmHWM)."""
    if pid is None:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "-"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def speed_probe() -> str:
    """How fast this machine is right now, by two fixed tasks (larger: a slower moment).

    On a shared virtual machine the same code runs up to twice as slow from one quarter of an
    hour to the next; the probe tells runs made in different phases apart.
    """
    import numpy as np

    a = np.random.default_rng(0).random((64, 1536), dtype=np.float32)
    b = np.random.default_rng(1).random((1536, 384), dtype=np.float32)
    times = []
    for _ in range(200):
        started = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - started)
    started = time.perf_counter()
    total = 0
    for i in range(2_000_000):
        total += i
    loop_s = time.perf_counter() - started
    return (
        f"64x1536x384 float32 matmul p50 {sorted(times)[100] * 1e6:.0f} us, "
        f"2M-step Python loop {loop_s * 1e3:.0f} ms"
    )


_start_probe: str | None = None


def probe_speed_at_start() -> None:
    """Take the speed probe before the timed work, for `machine_header` to show next to the
    one it takes at the end: a run during which the machine changed pace says so."""
    global _start_probe
    if _start_probe is None:
        _start_probe = speed_probe()


def machine_header(title: str, extra: dict[str, Any] | None = None) -> str:
    """Markdown lines naming the machine, thread settings and versions of this run."""
    flags = ""
    try:
        text = Path("/proc/cpuinfo").read_text()
        present = set(text.split("flags", 1)[1].split("\n", 1)[0].split())
        flags = " ".join(f for f in ("avx2", "fma", "f16c", "avx512f", "avx_vnni") if f in present)
    except (OSError, IndexError):
        pass
    threads = {
        name: os.environ.get(name, "unset")
        for name in ("OMP_NUM_THREADS", "ICLSERVE_EMBEDDING__THREADS")
    }
    versions = ", ".join(
        f"{d} {_version(d)}"
        for d in (
            "numpy",
            "faiss-cpu",
            "torch",
            "onnxruntime",
            "sentence-transformers",
            "fastapi",
            "uvicorn",
            "langchain-core",
            "langchain-community",
        )
    )
    lines = [
        f"## {title}",
        "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M')}; cpu: {cpu_model()}, {os.cpu_count()} cores"
        f" ({flags}); python {platform.python_version()}",
        f"- threads: {', '.join(f'{k}={v}' for k, v in threads.items())}",
        f"- versions: {versions}",
        *([f"- speed probe at the start of the run: {_start_probe}"] if _start_probe else []),
        f"- speed probe at the end of the run: {speed_probe()}",
    ]
    for key, value in (extra or {}).items():
        lines.append(f"- {key}: {value}")
    return "\n".join(lines) + "\n"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table; floats get 2 decimals, ints thousands separators."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return "-" if value != value else f"{value:,.2f}"
        if isinstance(value, int):
            return f"{value:,}"
        return str(value)

    out = ["| " + " | ".join(headers) + " |"]
    out.append("|" + "|".join("---:" if i else "---" for i in range(len(headers))) + "|")
    out.extend("| " + " | ".join(cell(v) for v in row) + " |" for row in rows)
    return "\n".join(out) + "\n"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def seed_pool(
    data_dir: Path,
    pool: str,
    texts: Sequence[str],
    outputs: Sequence[str | None],
    vectors: np.ndarray,
    *,
    embedder_name: str,
) -> int:
    """Publish a pool with given vectors straight into `data_dir` (no server, no embedding).

    For benchmark pools too large to embed through an upload (1M rows). It goes through the
    store's own staging and publishing, so the server opens it like any uploaded pool.
    """
    from app.ingest import ExampleRecord
    from app.settings import IndexSettings
    from app.store import PoolStore

    records = [
        ExampleRecord(input=t, output=o, label=None, external_id=None, metadata=None, line=i + 1)
        for i, (t, o) in enumerate(zip(texts, outputs, strict=True))
    ]
    # The server builds its own index when it opens the pool; an exact one here costs nothing.
    store = PoolStore(data_dir, index=IndexSettings(kind="flat"))
    try:
        job = store.stage_upload(pool, records, mode="replace", max_pool_rows=len(records) + 1)
        store.start_job(job["id"])
        ids, _ = store.staged_rows(job["id"])
        return store.publish_upload(
            job["id"],
            ids,
            np.ascontiguousarray(vectors, dtype=np.float32),
            embedder_name=embedder_name,
        )
    finally:
        store.close()


def http_json(
    method: str, url: str, body: Any = None, *, key: str = ADMIN_KEY, timeout: float = 600
) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Authorization", f"Bearer {key}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read() or b"null")


@contextlib.contextmanager
def iclserve(
    data_dir: Path,
    *,
    env: dict[str, str] | None = None,
    ready_timeout: float = 900.0,
    log_path: Path | None = None,
) -> Iterator[tuple[str, int]]:
    """Run `iclserve serve` on 127.0.0.1 with `data_dir`; yields (base URL, pid).

    Waits for /readyz (large pools build their index at start, so the wait is long).
    """
    port = free_port()
    full_env = {
        **os.environ,
        "ICLSERVE_DATA_DIR": str(data_dir),
        "ICLSERVE_HOST": "127.0.0.1",
        "ICLSERVE_PORT": str(port),
        "ICLSERVE_ADMIN_KEYS": ADMIN_KEY,
        "ICLSERVE_CLIENT_KEYS": CLIENT_KEY,
        "ICLSERVE_LOG_LEVEL": "warning",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        **(env or {}),
    }
    log = open(log_path or data_dir / "iclserve.log", "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "app", "serve"],
        cwd=ROOT,
        env=full_env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"iclserve exited with {proc.returncode}; see {log.name}")
            try:
                with urllib.request.urlopen(f"{url}/readyz", timeout=5) as resp:
                    if resp.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"iclserve not ready after {ready_timeout:.0f} s")
            time.sleep(0.2)
        yield url, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def wait_job(url: str, job_id: str, timeout: float = 7200.0) -> dict[str, Any]:
    """Poll a job until it ends; RuntimeError unless it succeeded."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = http_json("GET", f"{url}/v1/jobs/{job_id}")
        if job["status"] in ("succeeded", "failed", "cancelled"):
            if job["status"] != "succeeded":
                raise RuntimeError(f"job {job_id} {job['status']}: {job.get('error')}")
            return dict(job)
        time.sleep(0.5)
    raise RuntimeError(f"job {job_id} did not finish in {timeout:.0f} s")
