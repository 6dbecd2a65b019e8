"""`iclserve eval` and `benchmarks/quality.py`: run the quality protocol and write the report.

The evaluated endpoint is any OpenAI-compatible server: `--base-url` (or
`ICLSERVE_EVAL_BASE_URL`), `--model` (or `ICLSERVE_EVAL_MODEL`) and, when it needs one, the
key in `ICLSERVE_EVAL_API_KEY` (never on the command line, where `ps` would show it).
`--stand-in` evaluates the deterministic fake upstream of the test suite instead (a source
checkout is needed), and every output says so.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from app.cli import positive_int

__all__ = ["add_arguments", "main", "run"]

STAND_IN_MODEL = "stand-in"
STAND_IN_CONCURRENCY = 4


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError("expected one or more non-negative integers")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dataset",
        action="append",
        dest="datasets",
        metavar="NAME",
        help="rotten_tomatoes, bbc_news, jsonl:PATH or bigbench:ARCHIVE:TASK; repeatable "
        "(default: rotten_tomatoes)",
    )
    parser.add_argument("--base-url", help="upstream base URL with /v1 ($ICLSERVE_EVAL_BASE_URL)")
    parser.add_argument("--model", help="upstream model name ($ICLSERVE_EVAL_MODEL)")
    parser.add_argument(
        "--stand-in",
        action="store_true",
        help="evaluate the test suite's deterministic fake LLM (checks the harness; not LLM "
        "accuracy)",
    )
    parser.add_argument(
        "--server-url",
        help="use this running iclserve (its upstream routing must know --model) instead of "
        "starting one; it gets eval-* pools, replaced on every run. Key: $ICLSERVE_API_KEY",
    )
    parser.add_argument("--out", default="quality-results", help="output folder")
    parser.add_argument("--test-size", type=positive_int, default=200, help="test items (200)")
    parser.add_argument("--pool-size", type=positive_int, default=3000, help="labeled pool (3000)")
    parser.add_argument(
        "--unlabeled-size", type=positive_int, default=3000, help="unlabeled pool per seed (3000)"
    )
    parser.add_argument("--k", type=positive_int, default=4, help="demonstrations per prompt (4)")
    parser.add_argument("--budgets", type=_int_list, default=(18, 100), help="18,100")
    parser.add_argument("--seeds", type=_int_list, default=(0, 1, 2), help="0,1,2")
    parser.add_argument(
        "--ease-seeds", type=positive_int, help="run EASE on the first N seeds only (a search each)"
    )
    parser.add_argument("--ease-validation", type=positive_int, default=10, help="validation rows")
    parser.add_argument("--ease-budget", type=positive_int, default=120, help="validation calls")
    parser.add_argument(
        "--config",
        action="append",
        dest="configs",
        metavar="NAME",
        help="run only these configurations (repeatable): zero_shot, random, knn_last, "
        "knn_first, mmr, balanced, subsets, subset_random, subset_votek, subset_ideal, "
        "subset_<method>_<budget>, ease",
    )
    parser.add_argument("--max-tokens", type=positive_int, default=10, help="answer length (10)")
    parser.add_argument(
        "--concurrency",
        type=positive_int,
        help="calls in flight (default 1: a local model serves one at a time, and timings stay "
        "per call; 4 with --stand-in)",
    )
    parser.add_argument(
        "--no-prefix-order",
        action="store_true",
        help="ask the test items in their own order (default: sorted by the demonstrations "
        "they get, so that a prefix-caching server reuses shared prompt prefixes)",
    )
    parser.add_argument(
        "--resume", action="store_true", help="keep the answers already in OUT/answers.jsonl"
    )
    parser.add_argument(
        "--report-only", action="store_true", help="rebuild the report from OUT/answers.jsonl"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


@contextlib.contextmanager
def _stand_in() -> Iterator[str]:
    checkout = Path.cwd()
    if (checkout / "tests" / "fakes" / "upstream.py").is_file() and str(checkout) not in sys.path:
        sys.path.insert(0, str(checkout))  # the console script does not see the source tree
    try:
        from tests.fakes.upstream import FakeUpstream
    except ImportError:
        raise SystemExit(
            "error: --stand-in needs a source checkout (it runs tests/fakes/upstream.py); run "
            "it from the repository root"
        ) from None
    with FakeUpstream(models=[STAND_IN_MODEL]) as fake:
        yield fake.base_url


class _Bars:
    """One tqdm bar per (dataset, configuration, seed), on stderr."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar: Any = None
        self.label: str | None = None

    def __call__(self, label: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm  # type: ignore[import-untyped]

        if label != self.label:
            self.close()
            self.bar = tqdm(total=total, desc=label, unit="q", file=sys.stderr, dynamic_ncols=True)
            self.label = label
        self.bar.n = done
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
            self.label = None


def run(args: argparse.Namespace, argv: list[str]) -> int:
    from app.evaluation import report as reporting
    from app.evaluation.datasets import DatasetError, load_dataset
    from app.evaluation.harness import EvalSettings, configurations, run_protocol

    out = Path(args.out)
    meta_path = out / "meta.json"
    if args.report_only:
        import json

        if not meta_path.exists():
            print(f"error: no {meta_path}: nothing to report", file=sys.stderr)
            return 2
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        _write_reports(reporting, out, meta)
        return 0
    model = STAND_IN_MODEL if args.stand_in else args.model or os.environ.get("ICLSERVE_EVAL_MODEL")
    base_url = args.base_url or os.environ.get("ICLSERVE_EVAL_BASE_URL")
    if not model:
        print("error: give --model or set ICLSERVE_EVAL_MODEL (or use --stand-in)", file=sys.stderr)
        return 2
    if not args.stand_in and not base_url and not args.server_url:
        print(
            "error: give --base-url or set ICLSERVE_EVAL_BASE_URL (or --server-url, or --stand-in)",
            file=sys.stderr,
        )
        return 2
    settings = EvalSettings(
        model=model,
        upstream_base_url=base_url,
        upstream_api_key=None if args.stand_in else os.environ.get("ICLSERVE_EVAL_API_KEY"),
        server_url=args.server_url,
        server_key=os.environ.get("ICLSERVE_API_KEY") if args.server_url else None,
        test_size=args.test_size,
        pool_size=args.pool_size,
        unlabeled_size=args.unlabeled_size,
        k=args.k,
        budgets=tuple(sorted(set(args.budgets))),
        seeds=tuple(dict.fromkeys(args.seeds)),
        ease_seeds=args.ease_seeds,
        ease_validation=args.ease_validation,
        ease_budget=args.ease_budget,
        max_tokens=args.max_tokens,
        concurrency=args.concurrency or (STAND_IN_CONCURRENCY if args.stand_in else 1),
        prefix_order=not args.no_prefix_order,
        configs=set(args.configs) if args.configs else None,
        stand_in=args.stand_in,
    )
    try:
        configurations(settings.budgets, settings.configs)
        datasets = [load_dataset(spec) for spec in args.datasets or ["rotten_tomatoes"]]
    except (DatasetError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "model": model,
        "stand_in": args.stand_in,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(shlex.quote(a) for a in argv),
        "machine": reporting.machine(),
        "settings": settings.public(),
    }
    import json

    meta_path.write_text(json.dumps(meta, indent=2), encoding="utf-8")
    bars = _Bars(not args.no_progress)
    try:
        with contextlib.ExitStack() as stack:
            if args.stand_in and not args.server_url:
                settings.upstream_base_url = stack.enter_context(_stand_in())
            run_protocol(settings, datasets, out, resume=args.resume, progress=bars)
    except KeyboardInterrupt:
        bars.close()
        print(f"\ninterrupted: rerun with --resume --out {out} to go on", file=sys.stderr)
        return 130
    finally:
        bars.close()
    _write_reports(reporting, out, meta)
    return 0


def _write_reports(reporting: Any, out: Path, meta: dict[str, Any]) -> None:
    import json

    summary = reporting.summarize(out / "answers.jsonl", meta)
    (out / "report.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    reporting.write_markdown(summary, out / "report.md")
    reporting.write_chart(summary, out / "report.png")
    print((out / "report.md").read_text(encoding="utf-8"))
    print(
        f"wrote {out / 'report.md'}, {out / 'report.json'} and {out / 'report.png'}",
        file=sys.stderr,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="quality.py",
        description="Accuracy of every selector through iclserve's /v1/chat/completions.",
    )
    add_arguments(parser)
    given = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(given)
    return run(args, ["benchmarks/quality.py", *given])
