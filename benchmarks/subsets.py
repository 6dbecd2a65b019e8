"""Pool-level subset selection: time and peak RSS per method and pool size, side by side with
dense implementations that work the way the reference code does.

Usage:
    .venv/bin/python benchmarks/subsets.py                       # N = 3k, 30k, 100k
    .venv/bin/python benchmarks/subsets.py --sizes 3000 --budget 100 --dense-timeout 600

Every cell runs in a fresh process so that its peak RSS is its own. Vectors are 384-d (the
packaged MiniLM's size), synthetic: unit vectors around 64 seeded cluster centres, which
gives the kNN graphs the skewed in-degrees real text embeddings have. The fast side runs
`app.subsets.fit_subset` exactly as a subset job does (graph build included), after a call on
a 400-item pool that compiles the numba kernels; that one-off compile is its own column. The
dense side runs `selection.dense_reference`: per-row similarity and argsort graphs, an N x N
matrix for MFL, Python-list cascades for IDEAL. Cells that cannot run (N x N memory over the
machine's RAM) or that pass `--dense-timeout` are reported as such, not run or cut off.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DIM = 384
FAST = {
    "votek": {"k": 150},
    "ideal": {"k": 10, "rounds": 10},
    "mfl": {},
    "diversity": {},
    "random": {},
}
DENSE = ("votek", "ideal", "mfl")


def make_vectors(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((64, DIM)).astype(np.float32)
    x = centres[rng.integers(0, 64, n)] + 0.9 * rng.standard_normal((n, DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def run_cell(impl: str, method: str, n: int, budget: int) -> dict[str, Any]:
    vectors = make_vectors(n)
    compile_s = 0.0
    if impl == "fast":
        from app.subsets import PARAMS, fit_subset

        params = PARAMS[method].model_validate(FAST[method])
        # numba compiles each kernel on its first call in a process; a server pays that once,
        # so it is timed apart from the run (a 400-item pool exercises every kernel).
        started = time.perf_counter()
        fit_subset(make_vectors(400, seed=1), method, 20, params, 0, lambda done, total: True)
        compile_s = time.perf_counter() - started
    started = time.perf_counter()
    if impl == "fast":
        picks = fit_subset(vectors, method, budget, params, 0, lambda done, total: True).positions
    else:
        from selection import dense_reference as dense

        if method == "votek":
            picks = dense.dense_votek_reference(vectors, budget, k=150)
        elif method == "mfl":
            picks = dense.dense_mfl_reference(vectors, budget)
        else:
            picks = dense.dense_ideal_reference(vectors, budget, k=10, rounds=10, seed=0)
    seconds = time.perf_counter() - started
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "seconds": seconds,
        "peak_rss_mb": peak_kb / 1024,
        "picked": len(picks),
        "compile_s": compile_s,
    }


def spawn(impl: str, method: str, n: int, budget: int, timeout: float | None) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--cell", impl, method, str(n), str(budget)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"status": f"stopped after {timeout:.0f} s"}
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["?"]
        return {"status": f"failed: {tail[0][:80]}"}
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    result["status"] = "ok"
    return result


def total_ram_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="3000,30000,100000")
    parser.add_argument("--budget", type=int, default=100)
    parser.add_argument("--methods", default=",".join(FAST))
    parser.add_argument("--dense-timeout", type=float, default=600.0)
    parser.add_argument(
        "--dense-max-n", type=int, default=30000, help="run the dense side only up to this N"
    )
    parser.add_argument("--cell", nargs=4, metavar=("IMPL", "METHOD", "N", "BUDGET"))
    args = parser.parse_args()
    if args.cell:
        impl, method, n, budget = args.cell
        print(json.dumps(run_cell(impl, method, int(n), int(budget))))
        return

    from selection.dense_reference import dense_memory_bytes

    sizes = [int(s) for s in args.sizes.split(",")]
    methods = args.methods.split(",")
    ram = total_ram_bytes()
    print(
        f"# subsets benchmark  python {platform.python_version()}  cores {os.cpu_count()}  "
        f"RAM {ram / 2**30:.0f} GiB  budget {args.budget}  d {DIM}  "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"
    )
    print()
    print(
        "| method | N | iclserve s | first-call compile s | iclserve peak RSS MB | "
        "dense reference-style s | "
        "dense peak RSS MB | speed-up |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for method in methods:
        for n in sizes:
            fast = spawn("fast", method, n, args.budget, None)
            fast_s = f"{fast['seconds']:.2f}" if fast["status"] == "ok" else fast["status"]
            fast_mb = f"{fast['peak_rss_mb']:.0f}" if fast["status"] == "ok" else "-"
            fast_c = f"{fast['compile_s']:.1f}" if fast["status"] == "ok" else "-"
            dense_s, dense_mb, ratio = "-", "-", "-"
            if method in DENSE:
                matrix = dense_memory_bytes(n)
                if method == "mfl" and matrix > 0.8 * ram:
                    dense_s = f"cannot run: N x N float32 = {matrix / 2**30:.0f} GiB"
                elif n > args.dense_max_n:
                    dense_s = f"not run (N > --dense-max-n {args.dense_max_n})"
                else:
                    dense = spawn("dense", method, n, args.budget, args.dense_timeout)
                    if dense["status"] == "ok":
                        dense_s = f"{dense['seconds']:.2f}"
                        dense_mb = f"{dense['peak_rss_mb']:.0f}"
                        if fast["status"] == "ok":
                            ratio = f"{dense['seconds'] / max(fast['seconds'], 1e-9):.1f}x"
                    else:
                        dense_s = dense["status"]
                        if fast["status"] == "ok" and dense["status"].startswith("stopped"):
                            ratio = f">{args.dense_timeout / max(fast['seconds'], 1e-9):.0f}x"
            print(
                f"| {method} | {n:,} | {fast_s} | {fast_c} | {fast_mb} | {dense_s} | {dense_mb} "
                f"| {ratio} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
