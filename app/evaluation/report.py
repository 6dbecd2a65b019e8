"""Summaries of a quality run: JSON, a Markdown table and a PNG chart.

Everything is computed from the records of `answers.jsonl`, so a report can be rebuilt from
an interrupted or finished run without asking the model again.
"""

from __future__ import annotations

import json
import platform
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from app.evaluation.metrics import UNMAPPED, accuracy, bootstrap_interval, macro_f1

__all__ = ["STAND_IN_BANNER", "machine", "summarize", "write_chart", "write_markdown"]

STAND_IN_BANNER = (
    "STAND-IN UPSTREAM: these answers come from the deterministic fake LLM that CI uses "
    "(it copies the label of the demonstration sharing the most words with the query). They "
    "check the harness and show how selection changes a word-overlap reader; they are not "
    "LLM accuracy."
)


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import os

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "system": f"{platform.system()} {platform.release()}",
    }


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def _mean(values: Iterable[float]) -> float | None:
    found = list(values)
    return float(np.mean(found)) if found else None


def _config_summary(
    name: str,
    title: str,
    answers: list[dict[str, Any]],
    runs: list[dict[str, Any]],
    setups: list[dict[str, Any]],
    labels: list[str],
    test_size: int,
) -> dict[str, Any]:
    by_seed: dict[int, dict[str, dict[str, Any]]] = {}
    for record in answers:
        by_seed.setdefault(record["seed"], {})[record["key"]] = record
    seeds = sorted(by_seed)
    common = sorted(set.intersection(*(set(v) for v in by_seed.values())))
    index = {label: n for n, label in enumerate(labels)}
    gold = np.array([index[by_seed[seeds[0]][key]["gold"]] for key in common], dtype=np.int64)
    predicted = np.array(
        [
            [index.get(by_seed[s][key]["predicted"] or "", UNMAPPED) for key in common]
            for s in seeds
        ],
        dtype=np.int64,
    ).reshape(len(seeds), len(common))
    per_seed = [accuracy(gold, predicted[i]) for i in range(len(seeds))]
    f1_per_seed = [macro_f1(gold, predicted[i], len(labels)) for i in range(len(seeds))]
    interval = (
        bootstrap_interval(gold, predicted, len(labels))
        if common
        else {"accuracy": (0.0, 0.0), "macro_f1": (0.0, 0.0)}
    )
    chosen = [by_seed[s][key] for s in seeds for key in common]
    tokens = [r["prompt_tokens"] for r in chosen if isinstance(r.get("prompt_tokens"), int)]
    latencies = [r["latency_s"] for r in chosen]
    setup_wall = sum(s.get("wall_s") or 0.0 for s in setups)
    summary: dict[str, Any] = {
        "config": name,
        "title": title,
        "seeds": seeds,
        "items": len(common),
        "partial": len(common) < test_size,
        "accuracy": float(np.mean(per_seed)) if per_seed else None,
        "accuracy_ci95": list(interval["accuracy"]),
        "accuracy_by_seed": per_seed,
        "accuracy_seed_std": float(np.std(per_seed)) if len(per_seed) > 1 else None,
        "macro_f1": float(np.mean(f1_per_seed)) if f1_per_seed else None,
        "macro_f1_ci95": list(interval["macro_f1"]),
        "unmapped_rate": float(np.mean(predicted == UNMAPPED)) if predicted.size else None,
        "prompt_tokens_per_query": _mean(tokens),
        "latency_p50_s": float(np.median(latencies)) if latencies else None,
        "answer_wall_s": sum(r.get("wall_s") or 0.0 for r in runs),
        "setup_wall_s": setup_wall,
    }
    searches = [s for s in setups if s.get("calls") is not None]
    if searches:
        summary["search"] = {
            "calls": sum(s["calls"] for s in searches),
            "prompt_tokens": sum(s.get("prompt_tokens") or 0 for s in searches),
            "wall_s": setup_wall,
            "validation_score": _mean(s["score"] for s in searches if s.get("score") is not None),
        }
    return summary


def summarize(answers_path: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """The JSON report: `meta` plus, per dataset, one summary per configuration."""
    from app.evaluation.harness import configurations

    records = _records(answers_path)
    settings = meta["settings"]
    order = configurations(tuple(settings["budgets"]))
    datasets: dict[str, Any] = {}
    for record in records:
        if record["type"] == "dataset":
            datasets[record["name"]] = {
                "dataset": record["describe"],
                "labels": record["labels"],
                "results": [],
            }
    for name, entry in datasets.items():
        for config in order:
            answers = [
                r
                for r in records
                if r["type"] == "answer" and r["dataset"] == name and r["config"] == config.name
            ]
            if not answers:
                continue
            runs = [
                r
                for r in records
                if r["type"] == "run" and r["dataset"] == name and r["config"] == config.name
            ]
            setups = [
                r
                for r in records
                if r["type"] == "setup" and r["dataset"] == name and r["config"] == config.name
            ]
            entry["results"].append(
                _config_summary(
                    config.name,
                    config.title,
                    answers,
                    runs,
                    setups,
                    entry["labels"],
                    settings["test_size"],
                )
            )
    return {**meta, "datasets": datasets}


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def _interval(low_high: list[float]) -> str:
    return f"[{100 * low_high[0]:.1f}, {100 * low_high[1]:.1f}]"


def _number(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def write_markdown(report: dict[str, Any], path: Path) -> None:
    settings = report["settings"]
    lines = [f"# Selection quality: {report['model']}", ""]
    if settings.get("stand_in"):
        lines += [f"> **{STAND_IN_BANNER}**", ""]
    lines += [
        f"- model: `{report['model']}`" + (" (stand-in)" if settings.get("stand_in") else ""),
        f"- date: {report['date']}",
        f"- command: `{report['command']}`",
        f"- machine: {report['machine']['cpu']}, {report['machine']['cores']} cores",
        f"- k = {settings['k']} demonstrations, {settings['test_size']} test items, seeds "
        f"{', '.join(map(str, settings['seeds']))} (seeded configurations), labeled pool "
        f"{settings['pool_size']}, unlabeled pool {settings['unlabeled_size']}, temperature 0, "
        f"max_tokens {settings['max_tokens']}",
        "",
    ]
    for name, entry in report["datasets"].items():
        described = entry["dataset"]
        lines += [
            f"## {name}",
            "",
            f"{described['rows']} rows, labels {', '.join(entry['labels'])}; "
            f"source: {described['source']}; licence: {described['licence']}.",
            "",
            "| configuration | seeds | items | accuracy % (95% CI) | macro-F1 % (95% CI) "
            "| accuracy % by seed | unparsed % | prompt tokens / query | s / query (p50) "
            "| wall s |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in entry["results"]:
            items = f"{r['items']}" + (" (partial)" if r["partial"] else "")
            lines.append(
                f"| {r['title']} | {len(r['seeds'])} | {items} "
                f"| {_pct(r['accuracy'])} {_interval(r['accuracy_ci95'])} "
                f"| {_pct(r['macro_f1'])} {_interval(r['macro_f1_ci95'])} "
                f"| {' / '.join(_pct(a) for a in r['accuracy_by_seed'])} "
                f"| {_pct(r['unmapped_rate'])} | {_number(r['prompt_tokens_per_query'])} "
                f"| {_number(r['latency_p50_s'], 2)} "
                f"| {_number(r['answer_wall_s'] + r['setup_wall_s'], 0)} |"
            )
        searches = [r for r in entry["results"] if "search" in r]
        for r in searches:
            s = r["search"]
            lines += [
                "",
                f"{r['title']}: the search made {s['calls']} validation calls "
                f"({s['prompt_tokens']} prompt tokens) in {s['wall_s']:.0f} s over "
                f"{len(r['seeds'])} seed(s).",
            ]
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")


def write_chart(report: dict[str, Any], path: Path) -> None:
    """Accuracy by configuration (bars with 95% intervals) and accuracy against budget."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = [(name, e) for name, e in report["datasets"].items() if e["results"]]
    rows = max(1, len(entries))
    fig, axes = plt.subplots(
        rows, 2, figsize=(15, 4.8 * rows), squeeze=False, gridspec_kw={"width_ratios": [2.2, 1]}
    )
    stand_in = " (stand-in LLM)" if report["settings"].get("stand_in") else ""
    for row, (name, entry) in enumerate(entries):
        results = entry["results"]
        bars, budget_ax = axes[row][0], axes[row][1]
        means = [100 * (r["accuracy"] or 0.0) for r in results]
        lows = [m - 100 * r["accuracy_ci95"][0] for m, r in zip(means, results, strict=True)]
        highs = [100 * r["accuracy_ci95"][1] - m for m, r in zip(means, results, strict=True)]
        bars.bar(range(len(results)), means, yerr=[lows, highs], capsize=3, color="#4878a8")
        bars.set_xticks(
            range(len(results)), [r["title"] for r in results], rotation=35, ha="right", fontsize=8
        )
        bars.set_ylabel("accuracy % (95% CI)")
        bars.set_ylim(0, 100)
        bars.set_title(f"{name}: accuracy by configuration{stand_in}")
        by_name = {r["config"]: r for r in results}
        budgets = report["settings"]["budgets"]
        for method, title in (("random", "random"), ("votek", "vote-k"), ("ideal", "IDEAL")):
            points = [(b, by_name.get(f"subset_{method}_{b}")) for b in budgets]
            shown = [(b, r) for b, r in points if r is not None and r["accuracy"] is not None]
            if not shown:
                continue
            xs = [b for b, _ in shown]
            ys = [100 * r["accuracy"] for _, r in shown]
            err = [
                [y - 100 * r["accuracy_ci95"][0] for y, (_, r) in zip(ys, shown, strict=True)],
                [100 * r["accuracy_ci95"][1] - y for y, (_, r) in zip(ys, shown, strict=True)],
            ]
            budget_ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=title)
        settings = report["settings"]
        # The labeled pool is the first `pool_size` training rows, fewer on a small dataset.
        labeled_rows = min(settings["pool_size"], entry["dataset"]["rows"] - settings["test_size"])
        full = by_name.get("knn_last")
        if full is not None and full["accuracy"] is not None:
            budget_ax.axhline(
                100 * full["accuracy"],
                linestyle="--",
                color="grey",
                label=f"kNN, all {labeled_rows:,} labeled",
            )
        budget_ax.set_xscale("log")
        budget_ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        budget_ax.set_xticks(budgets, [str(b) for b in budgets])
        budget_ax.set_xlabel("annotation budget")
        budget_ax.set_ylabel("accuracy %")
        budget_ax.set_title(f"{name}: accuracy against budget")
        budget_ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
