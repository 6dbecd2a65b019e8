"""The selection-quality protocol, run through iclserve's own HTTP API.

For each dataset: a fixed test split, a labeled pool, and per seed an unlabeled pool for the
vote-k paper's two-step protocol. Every configuration answers the same test items through
`POST /v1/chat/completions` of a real iclserve, which forwards to the evaluated upstream:

* `zero_shot`: the instruction and the query, no `icl` (a plain pass-through);
* `random`, `knn_last`, `knn_first`, `mmr`, `balanced`: per-query selection from the labeled
  pool;
* `subset_<method>_<budget>` for random, vote-k and IDEAL at each budget: the method picks
  `budget` rows of an unlabeled pool, the harness annotates exactly those with their gold
  labels (`PATCH /examples`, the annotation step), then kNN retrieves from the subset;
* `ease`: an EASE preset searched against the same upstream on validation rows of the
  labeled pool, then served to every query.

Seeded configurations (random, the subsets, EASE) run once per seed; the others are
deterministic and run once. Answers are appended to `answers.jsonl` as they arrive, so an
interrupted run resumes (`resume=True`) without asking the model again.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from app.cli import ApiError, Client, Unreachable, wait_for_job
from app.evaluation.datasets import Dataset, Item
from app.evaluation.metrics import map_answer

__all__ = [
    "CONFIG_ORDER",
    "Configuration",
    "EvalSettings",
    "configurations",
    "run_protocol",
]

SUBSET_METHODS = ("random", "votek", "ideal")
CONFIG_ORDER = (
    "zero_shot",
    "random",
    "knn_last",
    "knn_first",
    "mmr",
    "balanced",
    "subsets",
    "ease",
)
# A preset search against a slow local model can take an hour.
JOB_WAIT_S = 6 * 3600.0
CHAT_ATTEMPTS = 4
CHAT_RETRY_WAIT_S = 2.0
TRANSIENT_STATUSES = frozenset({429, 500, 502, 503, 504})
SERVER_START_S = 300.0


@dataclass(frozen=True)
class Configuration:
    name: str
    title: str
    seeded: bool
    selector: dict[str, Any] | None = None  # None: zero-shot
    order: str | None = None
    subset_method: str | None = None
    budget: int | None = None
    preset: bool = False


def configurations(budgets: tuple[int, ...], only: set[str] | None = None) -> list[Configuration]:
    """Every configuration of the protocol, in report order (`only`: names or groups)."""
    found = [
        Configuration("zero_shot", "zero-shot", seeded=False),
        Configuration(
            "random", "random", seeded=True, selector={"method": "random"}, order="as_selected"
        ),
        Configuration(
            "knn_last",
            "kNN, nearest last",
            seeded=False,
            selector={"method": "knn"},
            order="nearest_last",
        ),
        Configuration(
            "knn_first",
            "kNN, nearest first",
            seeded=False,
            selector={"method": "knn"},
            order="nearest_first",
        ),
        Configuration("mmr", "MMR", seeded=False, selector={"method": "mmr"}, order="nearest_last"),
        Configuration(
            "balanced",
            "label-balanced kNN",
            seeded=False,
            selector={"method": "balanced"},
            order="nearest_last",
        ),
    ]
    titles = {"random": "random", "votek": "vote-k", "ideal": "IDEAL"}
    for budget in budgets:
        for method in SUBSET_METHODS:
            found.append(
                Configuration(
                    f"subset_{method}_{budget}",
                    f"{titles[method]} subset, budget {budget}",
                    seeded=True,
                    selector={"method": "knn"},
                    order="nearest_last",
                    subset_method=method,
                    budget=budget,
                )
            )
    found.append(Configuration("ease", "EASE preset", seeded=True, preset=True))
    if not only:
        return found
    unknown = only - {c.name for c in found} - {"subsets", *(f"subset_{m}" for m in SUBSET_METHODS)}
    if unknown:
        raise ValueError(f"unknown configuration(s): {', '.join(sorted(unknown))}")
    return [
        c
        for c in found
        if c.name in only
        or (
            c.subset_method is not None
            and ("subsets" in only or f"subset_{c.subset_method}" in only)
        )
    ]


@dataclass
class EvalSettings:
    """Everything a run depends on (also written into the report)."""

    model: str
    upstream_base_url: str | None = None  # None with `server_url`: that server's routing
    upstream_api_key: str | None = field(default=None, repr=False)
    server_url: str | None = None  # an existing iclserve; default: start one
    server_key: str | None = field(default=None, repr=False)
    test_size: int = 200
    pool_size: int = 3000
    unlabeled_size: int = 3000
    k: int = 4
    budgets: tuple[int, ...] = (18, 100)
    seeds: tuple[int, ...] = (0, 1, 2)
    ease_seeds: int | None = None  # cap on the seeds EASE runs (each is a search)
    ease_validation: int = 10
    ease_budget: int = 120
    ease_params: dict[str, Any] = field(default_factory=dict)
    max_tokens: int = 10
    concurrency: int = 1
    # Ask in the order of each query's demonstrations, so that consecutive prompts share their
    # longest prefix and a server with a prefix (KV) cache evaluates only what is new.
    prefix_order: bool = True
    configs: set[str] | None = None
    stand_in: bool = False
    split_seed: int = 0

    def public(self) -> dict[str, Any]:
        found = asdict(self)
        for secret in ("upstream_api_key", "server_key"):
            found.pop(secret)
        found["budgets"] = list(self.budgets)
        found["seeds"] = list(self.seeds)
        found["configs"] = sorted(self.configs) if self.configs else None
        return found


# ---------------------------------------------------------------------------------------
# The server under test


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def owned_server(settings: EvalSettings, data_dir: Path, log: Path) -> Iterator[str]:
    """A fresh `iclserve serve` on 127.0.0.1 routing every model to the evaluated upstream."""
    assert settings.upstream_base_url is not None
    port = _free_port()
    upstream: dict[str, Any] = {
        "name": "eval",
        "base_url": settings.upstream_base_url,
        "models": ["*"],
        # Small CPU models take seconds per call, and calls queue behind each other.
        "first_byte_timeout": 900.0,
        "idle_timeout": 900.0,
        "total_timeout": 1800.0,
        # A measurement waits out a struggling upstream rather than failing fast: an open
        # breaker would turn a slow minute of the model into a run of wrong answers.
        "breaker_enabled": False,
    }
    if settings.upstream_api_key:
        upstream["api_key"] = settings.upstream_api_key
    env = {
        **os.environ,
        "ICLSERVE_DATA_DIR": str(data_dir),
        "ICLSERVE_HOST": "127.0.0.1",
        "ICLSERVE_PORT": str(port),
        "ICLSERVE_UPSTREAMS": json.dumps([upstream]),
        "HF_HUB_OFFLINE": "1",
    }
    for name in (
        "ICLSERVE_ADMIN_KEY",
        "ICLSERVE_CLIENT_KEY",
        "ICLSERVE_ADMIN_KEY_FILE",
        "ICLSERVE_CLIENT_KEY_FILE",
    ):
        env.pop(name, None)
    url = f"http://127.0.0.1:{port}"
    with log.open("ab") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "app", "serve"], env=env, stdout=sink, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"iclserve exited with {proc.returncode}; see {log}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(url + "/readyz", timeout=2) as answer:
                    if answer.status == 200:
                        break
            if time.monotonic() > deadline:
                raise RuntimeError(f"iclserve was not ready after {SERVER_START_S:g} s; see {log}")
            time.sleep(0.25)
        yield url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


# ---------------------------------------------------------------------------------------
# Talking to it


class Api:
    def __init__(self, url: str, key: str | None) -> None:
        self.client = Client(url, key=key, timeout=1800.0)

    def wait_job(self, job: dict[str, Any], what: str) -> dict[str, Any]:
        final = wait_for_job(self.client, job, wait_timeout=JOB_WAIT_S, progress=False, desc=what)
        if final is None:
            raise RuntimeError(f"{what}: job {job['id']} still running after {JOB_WAIT_S:g} s")
        if final.get("status") != "succeeded":
            raise RuntimeError(
                f"{what}: job {job['id']} {final.get('status')}: {final.get('error')}"
            )
        return final

    def upload(self, pool: str, rows: list[dict[str, Any]]) -> None:
        with contextlib.suppress(ApiError):
            self.client.call("DELETE", f"/v1/pools/{pool}")
        payload = "".join(json.dumps(r) + "\n" for r in rows).encode()
        answer = self.client.call(
            "POST",
            f"/v1/pools/{pool}/examples",
            query={"mode": "replace"},
            data=payload,
            content_type="application/x-ndjson",
            length=len(payload),
        )
        self.wait_job(answer["job"], f"upload of {pool}")

    def subset(self, pool: str, name: str, method: str, budget: int, seed: int) -> list[str]:
        answer = self.client.call(
            "POST",
            f"/v1/pools/{pool}/subsets",
            body={"name": name, "method": method, "budget": budget, "seed": seed},
        )
        self.wait_job(answer["job"], f"subset {name}")
        found = self.client.call("GET", f"/v1/pools/{pool}/subsets/{name}", query={"rows": "true"})
        return [row["external_id"] for row in found["examples"]]

    def annotate(self, pool: str, labels: dict[str, str]) -> None:
        examples = [{"id": key, "output": label, "label": label} for key, label in labels.items()]
        self.client.call("PATCH", f"/v1/pools/{pool}/examples", body={"examples": examples})

    def preset(self, pool: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
        with contextlib.suppress(ApiError):
            self.client.call("DELETE", f"/v1/pools/{pool}/presets/{name}")
        answer = self.client.call("POST", f"/v1/pools/{pool}/presets", body={"name": name, **body})
        self.wait_job(answer["job"], f"preset {name}")
        found: dict[str, Any] = self.client.call("GET", f"/v1/pools/{pool}/presets/{name}")
        return found

    def select(self, pool: str, body: dict[str, Any]) -> list[int]:
        """The demonstration ids, in prompt order, that a query gets (the dry run)."""
        found = self.client.call("POST", f"/v1/pools/{pool}/select", body=body)
        return [int(demo["id"]) for demo in found["demonstrations"]]

    def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        """One chat completion; a transient failure is retried a few times, then raised (the
        run stops, and `--resume` goes on from the answers already recorded)."""
        for attempt in range(CHAT_ATTEMPTS):
            try:
                answer: dict[str, Any] = self.client.call("POST", "/v1/chat/completions", body=body)
                return answer
            except (ApiError, Unreachable) as exc:
                transient = isinstance(exc, Unreachable) or exc.status in TRANSIENT_STATUSES
                if not transient or attempt == CHAT_ATTEMPTS - 1:
                    raise
                time.sleep(CHAT_RETRY_WAIT_S * 2**attempt)
        raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------------
# The protocol


@dataclass(frozen=True)
class Split:
    test: list[Item]
    train: list[Item]


def split(dataset: Dataset, test_size: int, seed: int) -> Split:
    items = list(dataset.items)
    random.Random(seed).shuffle(items)
    if len(items) <= test_size:
        raise ValueError(f"{dataset.name} has {len(items)} rows, not more than the test size")
    return Split(test=items[:test_size], train=items[test_size:])


def _pool_name(dataset: str, suffix: str) -> str:
    # The harness replaces these pools on every run: the prefix keeps it off users' pools.
    return f"eval-{dataset.replace('_', '-')[:40]}-{suffix}"


def _labeled_rows(items: list[Item]) -> list[dict[str, Any]]:
    return [{"id": i.key, "input": i.text, "output": i.label, "label": i.label} for i in items]


class Recorder:
    """Appends answers and setup records to `answers.jsonl`; knows what is already done."""

    def __init__(self, path: Path, resume: bool) -> None:
        self.path = path
        self.done: dict[tuple[str, str, int, str], dict[str, Any]] = {}
        self.records: list[dict[str, Any]] = []
        if resume and path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    self._remember(json.loads(line))
        self._lock = threading.Lock()
        self._fh: TextIO = path.open("a" if resume else "w", encoding="utf-8")

    def _remember(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if record["type"] == "answer":
            key = (record["dataset"], record["config"], record["seed"], record["key"])
            self.done[key] = record

    def write(self, record: dict[str, Any]) -> None:
        with self._lock:
            self._remember(record)
            self._fh.write(json.dumps(record) + "\n")
            self._fh.flush()

    def close(self) -> None:
        self._fh.close()


Progress = Callable[[str, int, int], None]


def _icl_for(
    config: Configuration, icl: dict[str, Any] | None, seed: int, index: int
) -> dict[str, Any] | None:
    if icl is None or not config.seeded:
        return icl
    return {**icl, "seed": seed * 1_000_003 + index}


def prefix_order(
    api: Api,
    config: Configuration,
    seed: int,
    todo: list[tuple[int, Item]],
    icl: dict[str, Any] | None,
) -> list[tuple[int, Item]]:
    """`todo` sorted by the demonstrations each query will get, in prompt order.

    Consecutive prompts then share their longest common prefix (the instruction and the
    leading demonstrations), which a server with a prefix cache, such as llama.cpp's, does
    not evaluate again. The answers do not depend on the order; only the time does.
    """
    if icl is None or config.preset:
        return todo  # zero-shot and presets: every prompt already has the same prefix
    keys: dict[int, list[int]] = {}
    for n, item in todo:
        spec = _icl_for(config, icl, seed, n)
        assert spec is not None
        body = {name: value for name, value in spec.items() if name != "pool"}
        keys[n] = api.select(spec["pool"], {**body, "query": item.text})
    return sorted(todo, key=lambda pair: (keys[pair[0]], pair[0]))


def _ask(
    api: Api,
    settings: EvalSettings,
    dataset: Dataset,
    config: Configuration,
    seed: int,
    index: int,
    item: Item,
    icl: dict[str, Any] | None,
) -> dict[str, Any]:
    messages: list[dict[str, str]] = []
    if not config.preset:  # a preset brings its own instruction as the system message
        messages.append({"role": "system", "content": dataset.instruction})
    messages.append({"role": "user", "content": item.text})
    body: dict[str, Any] = {
        "model": settings.model,
        "messages": messages,
        "temperature": 0,
        "max_tokens": settings.max_tokens,
    }
    chosen = _icl_for(config, icl, seed, index)
    if chosen is not None:
        body["icl"] = chosen
    started = time.perf_counter()
    answer = api.chat(body)
    latency = time.perf_counter() - started
    choices = answer.get("choices") or [{}]
    text = ((choices[0] or {}).get("message") or {}).get("content") or ""
    usage = answer.get("usage") or {}
    return {
        "type": "answer",
        "dataset": dataset.name,
        "config": config.name,
        "seed": seed,
        "key": item.key,
        "index": index,
        "gold": item.label,
        "answer": text,
        "predicted": map_answer(text, dataset.labels),
        "prompt_tokens": usage.get("prompt_tokens"),
        "completion_tokens": usage.get("completion_tokens"),
        "latency_s": round(latency, 4),
        "demonstrations": (answer.get("icl") or {}).get("demonstrations"),
    }


def _answer_all(
    api: Api,
    settings: EvalSettings,
    recorder: Recorder,
    dataset: Dataset,
    config: Configuration,
    seed: int,
    test: list[Item],
    icl: dict[str, Any] | None,
    progress: Progress,
) -> None:
    todo = [
        (n, item)
        for n, item in enumerate(test)
        if (dataset.name, config.name, seed, item.key) not in recorder.done
    ]
    label = f"{dataset.name} {config.name}" + (f" seed {seed}" if config.seeded else "")
    done = len(test) - len(todo)
    progress(label, done, len(test))
    if not todo:
        return
    started = time.perf_counter()
    if settings.prefix_order:
        todo = prefix_order(api, config, seed, todo, icl)
    with ThreadPoolExecutor(max_workers=settings.concurrency) as pool:
        futures = [
            pool.submit(_ask, api, settings, dataset, config, seed, n, item, icl)
            for n, item in todo
        ]
        for future in futures:
            recorder.write(future.result())
            done += 1
            progress(label, done, len(test))
    recorder.write(
        {
            "type": "run",
            "dataset": dataset.name,
            "config": config.name,
            "seed": seed,
            "items": len(todo),
            "wall_s": round(time.perf_counter() - started, 3),
        }
    )


def _setup_record(dataset: str, config: str, seed: int, **fields: Any) -> dict[str, Any]:
    return {"type": "setup", "dataset": dataset, "config": config, "seed": seed, **fields}


def _needed(
    recorder: Recorder, dataset: str, config: Configuration, seed: int, test: list[Item]
) -> bool:
    return any((dataset, config.name, seed, i.key) not in recorder.done for i in test)


def run_dataset(
    api: Api,
    settings: EvalSettings,
    recorder: Recorder,
    dataset: Dataset,
    progress: Progress,
    log: Callable[[str], None],
) -> None:
    parts = split(dataset, settings.test_size, settings.split_seed)
    recorder.write(
        {
            "type": "dataset",
            "name": dataset.name,
            "labels": dataset.labels,
            "describe": dataset.describe(),
        }
    )
    labeled_items = parts.train[: settings.pool_size]
    configs = configurations(settings.budgets, settings.configs)
    labeled_pool = _pool_name(dataset.name, "labeled")
    uses_labeled = any(
        (c.subset_method is None and c.selector is not None) or c.preset for c in configs
    )
    if uses_labeled:
        log(f"{dataset.name}: uploading {len(labeled_items)} labeled rows to {labeled_pool}")
        started = time.perf_counter()
        api.upload(labeled_pool, _labeled_rows(labeled_items))
        recorder.write(
            _setup_record(
                dataset.name,
                "labeled_pool",
                0,
                rows=len(labeled_items),
                wall_s=round(time.perf_counter() - started, 3),
            )
        )
    for config in configs:
        if config.subset_method is not None or config.preset:
            continue
        seeds = settings.seeds if config.seeded else settings.seeds[:1]
        icl = None
        if config.selector is not None:
            icl = {
                "pool": labeled_pool,
                "k": settings.k,
                "selector": config.selector,
                "order": config.order,
            }
        for seed in seeds:
            _answer_all(api, settings, recorder, dataset, config, seed, parts.test, icl, progress)

    ease = next((c for c in configs if c.preset), None)
    if ease is not None:
        ease_seeds = (
            settings.seeds[: settings.ease_seeds] if settings.ease_seeds else settings.seeds
        )
        for seed in ease_seeds:
            if not _needed(recorder, dataset.name, ease, seed, parts.test):
                continue
            name = f"ease-s{seed}"
            log(f"{dataset.name}: searching EASE preset {name} against {settings.model}")
            started = time.perf_counter()
            preset = api.preset(
                labeled_pool,
                name,
                {
                    "method": "ease",
                    "k": settings.k,
                    "validation": {"pool": labeled_pool, "limit": settings.ease_validation},
                    "budget": settings.ease_budget,
                    "model": settings.model,
                    "instructions": [dataset.instruction],
                    "seed": seed,
                    "max_tokens": settings.max_tokens,
                    "concurrency": settings.concurrency,
                    "params": settings.ease_params,
                },
            )
            recorder.write(
                _setup_record(
                    dataset.name,
                    ease.name,
                    seed,
                    wall_s=round(time.perf_counter() - started, 3),
                    calls=preset.get("calls"),
                    score=preset.get("score"),
                    ids=preset.get("ids"),
                    prompt_tokens=preset.get("prompt_tokens"),
                )
            )
            icl = {"pool": labeled_pool, "selector": {"method": "preset", "name": name}}
            _answer_all(api, settings, recorder, dataset, ease, seed, parts.test, icl, progress)

    subset_configs = [c for c in configs if c.subset_method is not None]
    for seed in settings.seeds:
        if not any(_needed(recorder, dataset.name, c, seed, parts.test) for c in subset_configs):
            continue
        _run_subsets(api, settings, recorder, dataset, parts, subset_configs, seed, progress, log)


def _run_subsets(
    api: Api,
    settings: EvalSettings,
    recorder: Recorder,
    dataset: Dataset,
    parts: Split,
    configs: list[Configuration],
    seed: int,
    progress: Progress,
    log: Callable[[str], None],
) -> None:
    """Step 1 (select what to annotate from an unlabeled pool), annotation, step 2 (retrieve)."""
    size = min(settings.unlabeled_size, len(parts.train))
    drawn = random.Random(1_000 + seed).sample(parts.train, size)
    gold = {item.key: item.label for item in drawn}
    pool = _pool_name(dataset.name, f"unlabeled-s{seed}")
    log(f"{dataset.name}: seed {seed}: uploading {size} unlabeled rows to {pool}")
    api.upload(pool, [{"id": i.key, "input": i.text, "output": None} for i in drawn])
    members: dict[str, list[str]] = {}
    for config in configs:
        assert config.subset_method is not None and config.budget is not None
        started = time.perf_counter()
        keys = api.subset(pool, config.name, config.subset_method, config.budget, seed)
        members[config.name] = keys
        recorder.write(
            _setup_record(
                dataset.name,
                config.name,
                seed,
                members=keys,
                wall_s=round(time.perf_counter() - started, 3),
            )
        )
    to_label = {key: gold[key] for keys in members.values() for key in keys}
    log(f"{dataset.name}: seed {seed}: annotating the {len(to_label)} selected rows")
    api.annotate(pool, to_label)
    for config in configs:
        icl = {
            "pool": pool,
            "subset": config.name,
            "k": settings.k,
            "selector": config.selector,
            "order": config.order,
        }
        _answer_all(api, settings, recorder, dataset, config, seed, parts.test, icl, progress)


def run_protocol(
    settings: EvalSettings,
    datasets: list[Dataset],
    out_dir: Path,
    *,
    resume: bool = False,
    progress: Progress | None = None,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Run every configuration on every dataset; returns the answers file."""
    out_dir.mkdir(parents=True, exist_ok=True)
    say = log or (lambda text: print(text, file=sys.stderr, flush=True))
    show = progress or (lambda label, done, total: None)
    recorder = Recorder(out_dir / "answers.jsonl", resume)
    try:
        with contextlib.ExitStack() as stack:
            if settings.server_url:
                url = settings.server_url
            else:
                data_dir = Path(
                    stack.enter_context(tempfile.TemporaryDirectory(prefix="iclserve-eval-"))
                )
                url = stack.enter_context(
                    owned_server(settings, data_dir, out_dir / "iclserve.log")
                )
                say(f"iclserve is serving on {url}, forwarding to {settings.upstream_base_url}")
            api = Api(url, settings.server_key)
            for dataset in datasets:
                run_dataset(api, settings, recorder, dataset, show, say)
    finally:
        recorder.close()
    return recorder.path
