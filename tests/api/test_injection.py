"""S1: template and format-string injection payloads are rendered literally or refused.

PAYLOADS (over 50) are put everywhere user text reaches a prompt:

* example fields: each payload is the input, output and label of one uploaded row, and the
  query of one selection; `/select` (chat and text), `/v1/chat/completions` (also as the
  caller's system message) and `/v1/completions` must render them verbatim, checked against
  the upstream's recorded request;
* templates: each payload is put in each template field, as the pool's template
  (`PUT /v1/pools`) and as a request's override (`/select`, `icl.template`). A payload that
  the documented rules allow (the placeholders the field takes, `{{` and `}}` for braces)
  must render exactly as `reference_render` says; any other must be refused with a 400.

Rendered text is compared whole with what the rules give, and is also searched for signs of
evaluation (EVALUATED: "49" from 7*7, Python reprs, exception names). No 5xx is allowed.

`run_corpus` takes any httpx client (a TestClient here; the reliability suite runs it against
a real server in tests/reliability/test_canaries.py).
"""

from __future__ import annotations

import string
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.conftest import upload
from tests.fakes.upstream import FakeUpstream, RecordedRequest

PAYLOADS: list[str] = [
    # Python str.format: attribute and item traversal, conversions, format specs.
    "{0.__class__.__init__.__globals__}",
    "{input.__class__}",
    "{input.__class__.__base__.__subclasses__()}",
    "{input.__dict__}",
    "{input[0]}",
    "{input!r}",
    "{input!s:{output}}",
    "{0!a}",
    "{input:>99999999}",
    "{input:{output}}",
    "{0}",
    "{}",
    "{ input }",
    "{input }",
    "{INPUT}",
    "{label.upper}",
    "{__import__('os').system('id')}",
    "{7*7}",
    "{\ninput\n}",
    # Jinja2 and its sandbox escapes.
    "{{7*7}}",
    "{{7*'7'}}",
    "{{ config }}",
    "{{ config.items() }}",
    "{{self.__init__}}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ lipsum.__globals__['os'].popen('id').read() }}",
    "{{ cycler.__init__.__globals__.os }}",
    "{{ ''|attr('__class__') }}",
    '{{ "A"*10000000 }}',
    "{{ range(10**9)|list }}",
    "{% for x in range(9) %}x{% endfor %}",
    "{% import os %}{{ os.system('id') }}",
    "{%raw%}{{7*7}}{%endraw%}",
    "{{input}}",
    "{{{input}}}",
    # Other template languages.
    "${{7*7}}",
    "${7*7}",
    "$input",
    "${input}",
    "#{7*7}",
    "*{7*7}",
    "@{7*7}",
    "~{7*7}",
    "[[${7*7}]]",
    "<%= 7*7 %>",
    "#set($x=7*7)$x",
    "<#assign x=7*7>${x}",
    "{{=7*7}}",
    "{php}echo 7*7;{/php}",
    "${T(java.lang.Runtime).getRuntime().exec('id')}",
    "${__import__('os')}",
    # printf-style and shells.
    "%(input)s",
    "%(output)r",
    "%s%n%x",
    "%%s",
    "%c%c%c",
    "%{7*7}",
    "`7*7`",
    "$(echo 7*7)",
    # Brace runs and near-misses of the real placeholders.
    "{" * 1000,
    "}" * 1000,
    "{{" * 5000,
    "}}{{",
    "{input}{output}{label}",
    "{input}}",
    "{{input}",
    "\\{input\\}",
    "{" * 20_000,
    # Plain hostility: markup, SQL, control characters.
    "<script>alert(7*7)</script>",
    "' OR 1=1 --",
    "line\nbreak\r\nand\ttab",
    "\u202e\u2028\ufeff",
]
FIELDS = ("instruction", "user", "assistant", "example", "query", "separator")
DEFAULTS: dict[str, str | None] = {
    "instruction": None,
    "user": "{input}",
    "assistant": "{output}",
    "example": "Input: {input}\nOutput: {output}",
    "query": "Input: {input}\nOutput:",
    "separator": "\n\n",
}
ALLOWED = {
    "instruction": set(),
    "user": {"input", "output", "label"},
    "assistant": {"input", "output", "label"},
    "example": {"input", "output", "label"},
    "query": {"input"},
    "separator": set(),
}
MAX_TEMPLATE_CHARS = 10_000
# What evaluation would leave behind: 7*7, reprs, exception and module names, `id` output.
EVALUATED = (
    "49",
    "<class",
    "<function",
    "<built-in",
    "<module",
    "object at 0x",
    "Traceback",
    "KeyError",
    "AttributeError",
    "IndexError",
    "ValueError",
    "uid=",
    "AAAAAAAAAA",
)
POOL = "injected"


def tag(n: int) -> str:
    """A row tag without digits (so that no "49" comes from the tags themselves)."""
    letters = string.ascii_lowercase
    return "r" + letters[n // 26] + letters[n % 26]


def reference_render(text: str, field: str, values: dict[str, str]) -> str | None:
    """The documented template rules, applied directly; None where they forbid `text`."""
    if len(text) > MAX_TEMPLATE_CHARS:
        return None
    out: list[str] = []
    pos = 0
    while pos < len(text):
        char = text[pos]
        if char not in "{}":
            out.append(char)
            pos += 1
        elif text.startswith(char * 2, pos):
            out.append(char)
            pos += 2
        elif (
            char == "{"
            and text.find("}", pos) != -1
            and (text[pos + 1 : text.find("}", pos)] in ALLOWED[field])
        ):
            close = text.find("}", pos)
            out.append(values[text[pos + 1 : close]])
            pos = close + 1
        else:
            return None
    return "".join(out)


@dataclass(frozen=True)
class Row:
    external_id: str
    input: str
    output: str
    label: str


def corpus_rows() -> list[Row]:
    return [
        Row(tag(n), f"{tag(n)} {payload}", payload, f"{tag(n)}:{payload}"[:200])
        for n, payload in enumerate(PAYLOADS)
        if len(payload) <= 2000  # the example fields have a cap of their own
    ]


def _values(row: Row) -> dict[str, str]:
    return {"input": row.input, "output": row.output, "label": row.label}


def expected_chat(template: dict[str, str | None], demos: Sequence[Row], query: str) -> list[Any]:
    messages: list[dict[str, str]] = []
    instruction = template["instruction"]
    if instruction:
        rendered = reference_render(instruction, "instruction", {})
        assert rendered is not None
        if rendered:
            messages.append({"role": "system", "content": rendered})
    for row in demos:
        for role, part in (("user", "user"), ("assistant", "assistant")):
            content = reference_render(template[part] or "", part, _values(row))
            messages.append({"role": role, "content": content or ""})
    last = reference_render(
        template["user"] or "", "user", {"input": query, "output": "", "label": ""}
    )
    messages.append({"role": "user", "content": last})
    return messages


def expected_text(template: dict[str, str | None], demos: Sequence[Row], query: str) -> str:
    blocks: list[str] = []
    if template["instruction"]:
        blocks.append(reference_render(template["instruction"], "instruction", {}) or "")
    blocks += [
        reference_render(template["example"] or "", "example", _values(r)) or "" for r in demos
    ]
    separator = reference_render(template["separator"] or "", "separator", {}) or ""
    prefix = separator.join(blocks) + separator if blocks else ""
    return prefix + (reference_render(template["query"] or "", "query", {"input": query}) or "")


@dataclass
class InjectionReport:
    payloads: int = 0
    renderings: int = 0  # rendered prompts and messages compared whole
    refused: int = 0  # template payloads answered with a 400 (per field and way)
    accepted: int = 0  # template payloads accepted and rendered by the rules
    evaluated: list[str] = field(default_factory=list)
    server_errors: int = 0

    def look(self, rendered: Any, where: str) -> None:
        text = repr(rendered)
        for sign in EVALUATED:
            if sign in text:
                self.evaluated.append(f"{where}: {sign!r}")
        self.renderings += 1


def _demo_rows(answer: dict[str, Any], rows: dict[str, Row]) -> list[Row]:
    return [rows[d["external_id"]] for d in answer["demonstrations"]]


def run_corpus(
    client: httpx.Client,
    headers: dict[str, str],
    upstream_requests: Callable[[], list[RecordedRequest]],
    *,
    model: str = "fake-model",
    thorough: bool = False,
) -> InjectionReport:
    """Every check of the module docstring, against `client`; asserts as it goes."""
    report = InjectionReport(payloads=len(PAYLOADS))
    for payload in PAYLOADS:
        for sign in EVALUATED:
            assert sign not in payload, (payload, sign)  # else the search would mislead
    rows = {row.external_id: row for row in corpus_rows()}
    body = [
        {"id": r.external_id, "input": r.input, "output": r.output, "label": r.label}
        for r in rows.values()
    ]
    r = client.put(f"/v1/pools/{POOL}", json={"task": "generation"}, headers=headers)
    assert r.status_code == 200, r.text
    r = client.post(f"/v1/pools/{POOL}/examples?mode=replace", json=body, headers=headers)
    assert r.status_code == 202, r.text
    job = r.json()["job"]["id"]
    _wait(client, job, headers)
    by_id = {
        e["id"]: rows[e["external_id"]]
        for e in client.get(f"/v1/pools/{POOL}/examples?limit=1000", headers=headers).json()[
            "examples"
        ]
    }

    def call(method: str, path: str, **kwargs: Any) -> httpx.Response:
        response = client.request(method, path, headers=headers, **kwargs)
        if response.status_code >= 500:
            report.server_errors += 1
        assert response.status_code < 500, (path, response.text[:500])
        return response

    # Example fields and queries: verbatim, in every route that renders them (/select shows
    # both the chat messages and the text prompt). Thorough: each row as the query of both
    # forwarding routes; otherwise of one of them, in turn.
    for n, row in enumerate(rows.values()):
        query = row.input
        answer = call("POST", f"/v1/pools/{POOL}/select", json={"query": query, "k": 4})
        assert answer.status_code == 200, answer.text
        data = answer.json()
        demos = _demo_rows(data, rows)
        assert row in demos, "the row that equals the query is its nearest"
        for demo, shown in zip(demos, data["demonstrations"], strict=True):
            assert (shown["input"], shown["output"], shown["label"]) == (
                demo.input,
                demo.output,
                demo.label,
            )
        assert data["messages"] == expected_chat(DEFAULTS, demos, query)
        assert data["prompt"] == expected_text(DEFAULTS, demos, query)
        report.look(data["messages"], f"select {row.external_id}")
        report.look(data["prompt"], f"select {row.external_id}")
        if thorough or n % 2 == 0:
            chat = call(
                "POST",
                "/v1/chat/completions",
                json={
                    "model": model,
                    "messages": [
                        {"role": "system", "content": row.output},
                        {"role": "user", "content": query},
                    ],
                    "icl": {"pool": POOL, "k": 3},
                },
            )
            assert chat.status_code == 200, chat.text
            demos = [by_id[i] for i in chat.json()["icl"]["demonstrations"]]
            sent = upstream_requests()[-1].body["messages"]
            expected = [
                {"role": "system", "content": row.output},
                *expected_chat(DEFAULTS, demos, query),
            ]
            assert sent == expected
            report.look(sent, f"chat {row.external_id}")
        if thorough or n % 2 == 1:
            completion = call(
                "POST",
                "/v1/completions",
                json={"model": model, "prompt": query, "icl": {"pool": POOL, "k": 3}},
            )
            assert completion.status_code == 200, completion.text
            demos = [by_id[i] for i in completion.json()["icl"]["demonstrations"]]
            prompt = upstream_requests()[-1].body["prompt"]
            assert prompt == expected_text(DEFAULTS, demos, query)
            report.look(prompt, f"completion {row.external_id}")

    # Templates: rendered by the rules, or refused; as the pool's template, as a /select
    # override and as `icl.template`. Thorough: every payload in every field each way;
    # otherwise the ways take turns, so each (payload, field) pair is tried once.
    query = next(iter(rows.values())).input
    ways = ("pool", "override", "icl")
    for p_index, payload in enumerate(PAYLOADS):
        for f_index, name in enumerate(FIELDS):
            template = {**DEFAULTS, name: payload}
            allowed = reference_render(payload, name, {"input": "i", "output": "o", "label": "l"})
            chosen = ways if thorough else (ways[(p_index + f_index) % len(ways)],)
            for way in chosen:
                if way == "pool":
                    answer = call("PUT", f"/v1/pools/{POOL}", json={"template": {name: payload}})
                elif way == "override":
                    answer = call(
                        "POST",
                        f"/v1/pools/{POOL}/select",
                        json={"query": query, "k": 2, "template": {name: payload}},
                    )
                else:
                    answer = call(
                        "POST",
                        "/v1/chat/completions",
                        json={
                            "model": model,
                            "messages": [{"role": "user", "content": query}],
                            "icl": {"pool": POOL, "k": 2, "template": {name: payload}},
                        },
                    )
                where = (way, name, payload[:80], answer.text[:300])
                if allowed is None:
                    assert answer.status_code == 400, where
                    error = answer.json()["error"]
                    assert error["type"] == "invalid_request_error", error
                    report.look(error["message"], f"refusal {way} {name}")
                    report.refused += 1
                    continue
                assert answer.status_code == 200, where
                report.accepted += 1
                if way == "icl":
                    sent = upstream_requests()[-1].body["messages"]
                    demos = [by_id[i] for i in answer.json()["icl"]["demonstrations"]]
                    # The caller's own last message stays as sent: only demonstrations (and
                    # the instruction) come from the template.
                    wanted = [
                        *expected_chat(template, demos, query)[:-1],
                        {"role": "user", "content": query},
                    ]
                    assert sent == wanted, where
                    report.look(sent, f"chat template {name}")
                    continue
                if way == "pool":
                    answer = call("POST", f"/v1/pools/{POOL}/select", json={"query": query, "k": 2})
                    reset = call("PUT", f"/v1/pools/{POOL}", json={"template": None})
                    assert reset.status_code == 200, reset.text
                data = answer.json()
                demos = _demo_rows(data, rows)
                assert data["messages"] == expected_chat(template, demos, query), where
                assert data["prompt"] == expected_text(template, demos, query), where
                report.look(data["messages"], f"template {way} {name}")
                report.look(data["prompt"], f"template {way} {name}")
    assert not report.evaluated, report.evaluated
    return report


def _wait(client: httpx.Client, job_id: str, headers: dict[str, str]) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}", headers=headers).json()
        if job["status"] not in ("queued", "running"):
            assert job["status"] == "succeeded", job
            return
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} did not finish")


def test_reference_rules_agree_with_the_documented_examples() -> None:
    values = {"input": "I", "output": "O", "label": "L"}
    assert reference_render("{input}-{output}-{label}", "user", values) == "I-O-L"
    assert reference_render("{{input}}", "user", values) == "{input}"
    assert reference_render("{{7*7}}", "instruction", values) == "{7*7}"
    assert reference_render("{output}", "query", values) is None
    assert reference_render("{input!r}", "user", values) is None
    assert reference_render("{", "separator", values) is None
    assert len(PAYLOADS) >= 50
    kinds = {reference_render(p, "user", values) is None for p in PAYLOADS}
    assert kinds == {True, False}, "the corpus has payloads of both kinds"


def test_injection_payloads_are_literal_or_refused(
    client: TestClient, upstream: FakeUpstream
) -> None:
    report = run_corpus(client, {}, lambda: upstream.requests)
    assert report.server_errors == 0
    assert report.refused > 20 and report.accepted > 10, report
    assert report.renderings > 3 * len(corpus_rows()), report


@pytest.mark.parametrize("payload", ["{0.__class__.__init__.__globals__}", "{{ config }}"])
def test_refusal_names_the_field_and_leaks_nothing(client: TestClient, payload: str) -> None:
    upload(client, "small", [{"input": "a film", "output": "good"}])
    r = client.put("/v1/pools/small", json={"template": {"user": payload + "{input!r}"}})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == "template.user"
    assert "template field 'user'" in error["message"]
    for sign in EVALUATED:
        assert sign not in r.text
