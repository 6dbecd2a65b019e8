"""The quality harness's pieces that need no server: configurations, split, settings, retries."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from app.cli import ApiError
from app.evaluation import harness
from app.evaluation.datasets import Dataset, Item
from app.evaluation.harness import Api, EvalSettings, configurations, split


def test_configurations_cover_the_protocol_in_report_order() -> None:
    names = [c.name for c in configurations((18, 100))]
    assert names == [
        "zero_shot", "random", "knn_last", "knn_first", "mmr", "balanced",
        "subset_random_18", "subset_votek_18", "subset_ideal_18",
        "subset_random_100", "subset_votek_100", "subset_ideal_100",
        "ease",
    ]  # fmt: skip
    seeded = {c.name for c in configurations((18, 100)) if c.seeded}
    assert seeded == {"random", "ease", *(n for n in names if n.startswith("subset_"))}


@pytest.mark.parametrize(
    ("only", "expected"),
    [
        ({"knn_last"}, ["knn_last"]),
        ({"subsets"}, [f"subset_{m}_{b}" for b in (18, 100) for m in ("random", "votek", "ideal")]),
        ({"subset_votek", "ease"}, ["subset_votek_18", "subset_votek_100", "ease"]),
        ({"subset_ideal_100", "zero_shot"}, ["zero_shot", "subset_ideal_100"]),
    ],
)
def test_configurations_filter(only: set[str], expected: list[str]) -> None:
    assert [c.name for c in configurations((18, 100), only)] == expected


def test_unknown_configuration_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="knn_middle"):
        configurations((18,), {"knn_last", "knn_middle"})


def _dataset(n: int) -> Dataset:
    items = [Item(f"k{i}", f"text {i}", "a" if i % 2 else "b") for i in range(n)]
    return Dataset("toy", items, ["a", "b"], "Answer.", "test", "none")


def test_split_is_seeded_disjoint_and_complete() -> None:
    data = _dataset(50)
    one, again, other = split(data, 10, 0), split(data, 10, 0), split(data, 10, 1)
    assert one == again and one.test != other.test
    assert len(one.test) == 10 and len(one.train) == 40
    assert {i.key for i in one.test} | {i.key for i in one.train} == {i.key for i in data.items}
    assert not {i.key for i in one.test} & {i.key for i in one.train}
    with pytest.raises(ValueError, match="not more than the test size"):
        split(_dataset(10), 10, 0)


def test_public_settings_carry_no_keys() -> None:
    settings = EvalSettings(model="m", upstream_api_key="sk-canary-1", server_key="sk-canary-2")
    shown = json.dumps(settings.public())
    assert "canary" not in shown and "canary" not in repr(settings)


class _Flaky:
    """A loopback server answering chat with the given statuses in turn, then 200."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = list(statuses)
        self.calls = 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length") or 0))
                owner.calls += 1
                status = owner.statuses.pop(0) if owner.statuses else 200
                body = (
                    {"choices": [{"message": {"content": "ok"}}]}
                    if status == 200
                    else {"error": {"message": f"status {status}", "type": "x"}}
                )
                raw = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"


@pytest.fixture
def flaky(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[_Flaky]:
    monkeypatch.setattr(harness.time, "sleep", lambda _: None)
    server = _Flaky(request.param)
    server.thread.start()
    try:
        yield server
    finally:
        server.server.shutdown()
        server.server.server_close()


@pytest.mark.parametrize("flaky", [[503, 502, 429]], indirect=True)
def test_chat_retries_transient_failures(flaky: _Flaky) -> None:
    answer = Api(flaky.url, None).chat({"model": "m", "messages": []})
    assert answer["choices"][0]["message"]["content"] == "ok"
    assert flaky.calls == 4


@pytest.mark.parametrize("flaky", [[503, 503, 503, 503, 503]], indirect=True)
def test_chat_gives_up_after_bounded_attempts(flaky: _Flaky) -> None:
    with pytest.raises(ApiError) as caught:
        Api(flaky.url, None).chat({"model": "m", "messages": []})
    assert caught.value.status == 503 and flaky.calls == harness.CHAT_ATTEMPTS


@pytest.mark.parametrize("flaky", [[400]], indirect=True)
def test_chat_does_not_retry_a_client_error(flaky: _Flaky) -> None:
    with pytest.raises(ApiError) as caught:
        Api(flaky.url, None).chat({"model": "m", "messages": []})
    assert caught.value.status == 400 and flaky.calls == 1
