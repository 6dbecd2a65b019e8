"""Regenerate benchmarks/RESULTS.md: run every performance benchmark, then write their tables
and the acceptance summary (issue targets, each ratio taken from the same run).

Usage:
    .venv/bin/python benchmarks/results.py            # full run, about 30 minutes on 2 cores
    .venv/bin/python benchmarks/results.py --quick    # small sizes, a few minutes (a smoke test)
    .venv/bin/python benchmarks/results.py --only select,proxy   # rerun some, keep the rest

Each benchmark writes its JSON under benchmarks/results/perf/ (git-ignored) and prints its
Markdown tables; RESULTS.md is assembled from those, so `--only` reruns part of the set and
still writes a complete file from the latest JSON and tables of the others. Peers must run
side by side in one benchmark process, so no figure here is compared across runs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
OUT_DIR = HERE / "results" / "perf"
RESULTS = HERE / "RESULTS.md"

BENCHMARKS: dict[str, tuple[list[str], list[str]]] = {
    # name: (full arguments, quick arguments)
    "select": (["--sizes", "1000,10000,100000,1000000"], ["--quick"]),
    "proxy": ([], ["--quick"]),
    "upstream_client": ([], ["--quick"]),
    "ingest": ([], ["--quick"]),
    "load": ([], ["--quick"]),
}
SCRIPTS = {
    "select": "select_latency.py",
    "proxy": "proxy.py",
    "upstream_client": "upstream_client.py",
    "ingest": "ingest.py",
    "load": "load.py",
}


def run(name: str, quick: bool) -> None:
    full, fast = BENCHMARKS[name]
    args = fast if quick else full
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        str(HERE / SCRIPTS[name]),
        *args,
        "--json",
        str(OUT_DIR / f"{name}.json"),
    ]
    print(f"# running {' '.join(cmd[1:])}", flush=True)
    started = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    (OUT_DIR / f"{name}.md").write_text(proc.stdout)
    (OUT_DIR / f"{name}.log").write_text(proc.stderr)
    print(
        f"#   {name}: exit {proc.returncode} after {time.monotonic() - started:.0f} s", flush=True
    )
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"{name} failed; see {OUT_DIR / (name + '.log')}")


def _load(name: str) -> dict[str, Any] | None:
    path = OUT_DIR / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _row(rows: list[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    for row in rows:
        if all(row.get(k) == v for k, v in match.items()):
            return row
    return None


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("**met**" if ok else "**not met**")


def acceptance() -> list[tuple[str, str, str]]:
    """(target, measured, verdict) for each acceptance point of the performance issue."""
    out: list[tuple[str, str, str]] = []
    select = _load("select")
    if select:
        rows = select["rows"]
        http = _row(rows, size=100_000, path="http")
        peer = _row(rows, size=100_000, path="langchain")
        if http and peer:
            ratio = http["p50"] / peer["p50"]
            out.append(
                (
                    "select over HTTP at 100k: p50 <= 1/3 of LangChain's in-process p50",
                    f"{http['p50']:.2f} ms vs {peer['p50']:.2f} ms = {ratio:.3f} "
                    f"(recall@8 {http.get('recall', float('nan')):.3f})",
                    _verdict(ratio <= 1 / 3),
                )
            )
        million = _row(rows, size=1_000_000, path="http")
        if million:
            recall = million.get("recall", float("nan"))
            out.append(
                (
                    "select over HTTP at 1M: p50 <= 15 ms, recall@8 >= 0.95",
                    f"{million['p50']:.2f} ms, recall@8 {recall:.3f}",
                    _verdict(million["p50"] <= 15 and recall >= 0.95),
                )
            )
    proxy = _load("proxy")
    if proxy:
        for stream in (False, True):
            timing = "stream, last byte" if stream else "response"
            row = _row(proxy["rows"], mode="iclserve + icl", stream=stream, timing=timing)
            if row:
                out.append(
                    (
                        f"chat completions{' (streaming)' if stream else ''} add <= 6 ms p50 "
                        "over the direct call, embedding included",
                        f"{row['added_p50']:.2f} ms",
                        _verdict(row["added_p50"] <= 6),
                    )
                )
    load = _load("load")
    if load:
        for row in load["rows"]:
            if row["endpoint"] != "select":
                continue
            out.append(
                (
                    f"select, 16 clients, {row['mix']} queries: >= 200 req/s, no errors",
                    f"{row['rps']:.1f} req/s, {row['errors']} errors",
                    _verdict(row["rps"] >= 200 and row["errors"] == 0),
                )
            )
    ingest = _load("ingest")
    if ingest and "ratio_to_plain_encode" in ingest:
        ratio = ingest["ratio_to_plain_encode"]
        out.append(
            (
                "upload embedding >= plain sentence-transformers encode",
                f"{ratio:.2f}x",
                _verdict(ratio >= 1.0),
            )
        )
    return out


def write_results(quick: bool) -> None:
    sections = []
    for name in BENCHMARKS:
        md = OUT_DIR / f"{name}.md"
        if md.is_file():
            sections.append(f"# {name}\n\n{md.read_text().strip()}\n")
    command = ".venv/bin/python benchmarks/results.py" + (" --quick" if quick else "")
    lines = [
        "# Performance results",
        "",
        f"Regenerated by `{command}`; each section names its own script, workload and settings.",
        "Every ratio compares figures measured in the same process run, on this machine.",
        "",
    ]
    if quick:
        lines += ["**Quick run: small sizes, a smoke test; not the reference figures.**", ""]
    lines += ["## Acceptance", "", "| target | measured | verdict |", "|---|---|---|"]
    lines += [f"| {t} | {m} | {v} |" for t, m, v in acceptance()]
    lines.append("")
    RESULTS.write_text("\n".join(lines) + "\n" + "\n".join(sections))
    print(f"wrote {RESULTS}")


def _peer_installed() -> bool:
    import importlib.util

    return all(
        importlib.util.find_spec(name) is not None
        for name in ("langchain_core", "langchain_community")
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke test)")
    parser.add_argument("--only", help="comma-separated subset of: " + ",".join(BENCHMARKS))
    parser.add_argument(
        "--report-only", action="store_true", help="rewrite RESULTS.md from the saved outputs"
    )
    args = parser.parse_args()
    names = list(BENCHMARKS) if not args.only else [n.strip() for n in args.only.split(",")]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmarks: {', '.join(unknown)}")
    if "select" in names and not args.report_only and not args.quick and not _peer_installed():
        # Without the peer the select table has no ratio, and RESULTS.md no verdict on it.
        parser.error(
            "the LangChain peer is not installed: .venv/bin/pip install -r requirements/bench.txt"
        )
    if not args.report_only:
        for name in names:
            run(name, args.quick)
    write_results(args.quick)


if __name__ == "__main__":
    main()
