"""F2: hostile uploads against a real server: a 4xx at once, nothing published, memory bounded.

The server is `iclserve serve` with its default caps (64 MiB bodies, 200,000 rows per upload,
20,000 characters per field) and a published pool, `victim`. Every upload here is broken on
purpose and goes to `victim` (replace or append) or to a pool that does not exist yet:

* fixed bombs (BOMBS): bodies over the cap (declared and chunked), millions of tiny rows in
  each format, 100,000 CSV columns, a 40 MB quoted CSV field, a 50 MB JSONL line, 10,000
  levels of nesting, 60 MB of text that decodes four bytes per character, UTF-16, Latin-1,
  NUL bytes, empty bodies, and multipart bodies with many parts, many fields or no file;
* generated ones (hypothesis, seeded): a few rows of random text in JSONL, CSV or JSON, with
  one defect from DEFECTS spliced in (bad encodings, BOMs, NUL, missing or mistyped fields,
  over-long fields, deep nesting, broken syntax, duplicate ids, NaN, lone surrogates).

Each must get a 400, 413 or 422 in the OpenAI error shape within ANSWER_BOUND_S, and leave
`victim` exactly as it was (version, size, labels) and no new pool behind. At the end a
selection on `victim` returns what it returned before, and the server's resident memory
(VmRSS from /proc) has grown by less than RSS_GROWTH_MIB over the whole module; its peak
(VmHWM) is recorded too.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from app.ingest import parse_upload
from app.settings import Limits
from tests.datasets import topic_rows
from tests.e2e.server import Server
from tests.fakes.upstream import FakeUpstream
from tests.reliability.figures import Figures, scale
from tests.reliability.test_limits import raw_request

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(900)]

ADMIN_KEY = "sk-hostile-admin-c4d2a9"
MIB = 1024 * 1024
CAP = 64 * MIB  # the default max_body_bytes
MAX_FIELD = 20_000  # the default max_field_chars
ANSWER_BOUND_S = 2.0
RSS_GROWTH_MIB = 64.0
VICTIM = "victim"
QUERY = "who scored in the match last night"
NDJSON, CSV, JSON = "application/x-ndjson", "text/csv", "application/json"


@dataclass
class Victim:
    server: Server
    http: httpx.Client
    info: dict[str, Any]
    pools: list[str]
    selection: list[int]
    rss_start: int = 0
    tried: int = 0
    refused: int = 0
    slowest: tuple[float, str] = (0.0, "")
    statuses: dict[int, int] = field(default_factory=dict)

    def auth(self, **extra: str) -> dict[str, str]:
        return {"authorization": f"Bearer {ADMIN_KEY}", **extra}

    def memory(self) -> dict[str, int]:
        """VmRSS and VmHWM of the server, in KiB."""
        assert self.server.proc is not None
        found = {}
        for line in Path(f"/proc/{self.server.proc.pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                found[name] = int(value.split()[0])
        return found

    def check(self, what: str, status: int, body: bytes, seconds: float) -> None:
        """One refused upload: a documented 4xx, in time, and nothing changed."""
        self.tried += 1
        self.statuses[status] = self.statuses.get(status, 0) + 1
        if seconds > self.slowest[0]:
            self.slowest = (seconds, what)
        assert status in (400, 413, 422), (what, status, body[:400])
        error = json.loads(body)["error"]
        assert {"message", "type", "param", "code"} <= set(error), (what, error)
        assert "Traceback" not in error["message"], (what, error)
        assert seconds < ANSWER_BOUND_S, (what, seconds)
        info = self.http.get(f"/v1/pools/{VICTIM}", headers=self.auth()).json()
        assert _published(info) == _published(self.info), (what, info)
        self.refused += 1

    def post(self, what: str, path: str, **kwargs: Any) -> None:
        headers = self.auth(**kwargs.pop("headers", {}))
        request = self.http.build_request("POST", path, headers=headers, **kwargs)
        request.read()  # encode a multipart body before the clock starts: that is our work
        started = time.monotonic()
        response = self.http.send(request)
        self.check(what, response.status_code, response.content, time.monotonic() - started)


def _published(info: dict[str, Any]) -> tuple[Any, ...]:
    return (info["version"], info["size"], info["labeled"], info["labels"], info["status"])


@pytest.fixture(scope="module")
def victim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Victim]:
    root = tmp_path_factory.mktemp("hostile")
    with FakeUpstream(models=["fake-model"]) as fake:
        server = Server(root / "data", fake, env={"ICLSERVE_ADMIN_KEYS": ADMIN_KEY})
        server.start()
        try:
            with httpx.Client(base_url=server.url, timeout=60.0) as http:
                headers = {"authorization": f"Bearer {ADMIN_KEY}"}
                body = "".join(json.dumps(row) + "\n" for row in topic_rows(40))
                r = http.post(
                    f"/v1/pools/{VICTIM}/examples",
                    content=body.encode(),
                    headers={**headers, "content-type": NDJSON},
                )
                assert r.status_code == 202, r.text
                deadline = time.monotonic() + 120
                job: dict[str, Any] = {"status": "queued"}
                while job["status"] in ("queued", "running") and time.monotonic() < deadline:
                    time.sleep(0.05)
                    job = http.get(f"/v1/jobs/{r.json()['job']['id']}", headers=headers).json()
                assert job["status"] == "succeeded", job
                found = Victim(
                    server,
                    http,
                    info=http.get(f"/v1/pools/{VICTIM}", headers=headers).json(),
                    pools=_pool_names(http, headers),
                    selection=_select(http, headers),
                )
                # Warm up what every upload touches (parsing, a refused 64 MB body), so the
                # memory baseline is the server at work, not the server at rest.
                found.post("warm-up", f"/v1/pools/{VICTIM}/examples", content=b"{", headers={})
                found.post(
                    "warm-up 2",
                    f"/v1/pools/{VICTIM}/examples",
                    content=b'{"input": "' + b"w" * (CAP - 64) + b'"}\n',
                    headers={"content-type": NDJSON},
                )
                time.sleep(0.5)
                found.rss_start = found.memory()["VmRSS"]
                yield found
        finally:
            server.stop()


def _pool_names(http: httpx.Client, headers: dict[str, str]) -> list[str]:
    return sorted(p["name"] for p in http.get("/v1/pools", headers=headers).json()["data"])


def _select(http: httpx.Client, headers: dict[str, str]) -> list[int]:
    r = http.post(f"/v1/pools/{VICTIM}/select", json={"query": QUERY, "k": 8}, headers=headers)
    assert r.status_code == 200, r.text
    return [d["id"] for d in r.json()["demonstrations"]]


# --- fixed bombs ---------------------------------------------------------------------------


def _deep(levels: int) -> bytes:
    return b'{"a": ' * levels + b"1" + b"}" * levels


def _csv_bytes(rows: list[list[str]]) -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    return out.getvalue()


BOMBS: dict[str, tuple[str, Callable[[], bytes]]] = {
    "JSONL, 2 million tiny rows": (NDJSON, lambda: b'{"input": "a"}\n' * 2_000_000),
    "CSV, 3 million tiny rows": (CSV, lambda: b"input\n" + b"a\n" * 3_000_000),
    "JSON, 2 million tiny elements": (
        JSON,
        lambda: b"[" + b'{"input": "a"},' * 2_000_000 + b'{"input": "a"}]',
    ),
    "CSV, 100,000 columns": (
        CSV,
        lambda: ("input," + ",".join(f"c{i}" for i in range(100_000)) + "\nx\n").encode(),
    ),
    "CSV, 100,000 cells in a row": (CSV, lambda: b"input,output\n" + b"x," * 100_000 + b"x\n"),
    "CSV, a 40 MB quoted field": (CSV, lambda: b'input\n"' + b"q" * (40 * MIB) + b'"\n'),
    "CSV, an unterminated quote over 30 MB": (CSV, lambda: b'input\n"' + b"q\n" * (15 * MIB)),
    "JSONL, a 50 MB line": (NDJSON, lambda: b'{"input": "' + b"l" * (50 * MIB) + b'"}\n'),
    "JSON, a 30 MB field": (JSON, lambda: b'[{"input": "' + b"f" * (30 * MIB) + b'"}]'),
    "JSONL, metadata nested 10,000 levels": (
        NDJSON,
        lambda: b'{"input": "x", "metadata": ' + _deep(10_000) + b"}\n",
    ),
    "JSONL, metadata nested 100,000 levels": (
        NDJSON,
        lambda: b'{"input": "x", "metadata": ' + _deep(100_000) + b"}\n",
    ),
    "JSON, arrays nested 10,000 levels": (JSON, lambda: b"[" * 10_000 + b"]" * 10_000),
    "CSV, a metadata cell nested 10,000 levels": (
        CSV,
        lambda: b'input,metadata\nx,"' + _deep(10_000).replace(b'"', b'""') + b'"\n',
    ),
    # One four-byte character makes the decoded text four bytes per character: ~240 MB.
    "JSONL, 60 MB that decode to 4 bytes a character": (
        NDJSON,
        lambda: '{"input": "🙂'.encode() + b"a" * (60 * MIB) + b'"}\n',
    ),
    "JSONL, 16 MB of 4-byte characters in one field": (
        NDJSON,
        lambda: ('{"input": "' + "🙂" * (4 * MIB) + '"}\n').encode(),
    ),
    "CSV, UTF-16 with a BOM": (
        CSV,
        lambda: codecs.BOM_UTF16_LE + "input,output\ncafé,x\n".encode("utf-16-le"),
    ),
    "JSONL, UTF-16 big-endian without a BOM": (
        NDJSON,
        lambda: '{"input": "a"}\n'.encode("utf-16-be"),
    ),
    "CSV, Latin-1": (CSV, lambda: "input,output\ncafé!,crème!\n".encode("latin-1")),
    "JSONL, UTF-8 BOM then Latin-1": (
        NDJSON,
        lambda: codecs.BOM_UTF8 + '{"input": "naïve!"}\n'.encode("latin-1"),
    ),
    "JSONL, invalid UTF-8 (overlong, surrogate, lone continuation)": (
        NDJSON,
        lambda: b'{"input": "a\xc0\x80b\xed\xa0\x80c\x80d"}\n',
    ),
    "JSONL, a raw NUL byte": (NDJSON, lambda: b'{"input": "nul\x00here"}\n'),
    "JSONL, an escaped NUL": (NDJSON, lambda: b'{"input": "nul\\u0000here"}\n'),
    "CSV, a NUL byte": (CSV, lambda: b"input\nnul\x00here\n"),
    "JSONL, a lone surrogate escape": (NDJSON, lambda: b'{"input": "\\ud800"}\n'),
    "JSONL, an empty body": (NDJSON, lambda: b""),
    "CSV, only a header": (CSV, lambda: b"input,output\n"),
    "JSON, only whitespace and a BOM": (JSON, lambda: codecs.BOM_UTF8 + b" \n\t \n"),
    "JSONL, a field of 20,001 commas": (
        NDJSON,
        lambda: b'{"input": "' + b"," * (MAX_FIELD + 1) + b'"}\n',
    ),
    "JSON, a huge integer": (JSON, lambda: b'[{"input": "x", "id": ' + b"9" * 5000 + b"}]"),
    "JSON, NaN and Infinity": (JSON, lambda: b'[{"input": "x", "metadata": {"a": NaN}}]'),
    "JSON, duplicate keys": (JSON, lambda: b'[{"input": "x", "input": "y"}]'),
    "unsupported type: application/octet-stream": (
        "application/octet-stream",
        lambda: b'{"input": "x"}\n',
    ),
    "unsupported type: application/zip": ("application/zip", lambda: b"PK\x03\x04" + b"\0" * 64),
}


@pytest.mark.parametrize("name", list(BOMBS))
def test_bomb_is_refused(victim: Victim, name: str) -> None:
    content_type, make = BOMBS[name]
    body = make()
    assert len(body) <= CAP, name
    mode = "replace" if victim.tried % 2 else "append"
    victim.post(
        name,
        f"/v1/pools/{VICTIM}/examples?mode={mode}",
        content=body,
        headers={"content-type": content_type},
    )


def test_bodies_over_the_cap_are_refused(victim: Victim) -> None:
    port = victim.server.port
    path = f"/v1/pools/{VICTIM}/examples?mode=replace"
    declared = victim.auth(**{"content-type": NDJSON, "content-length": str(CAP + 1)})
    answer = raw_request(port, "POST", path, declared, [], timeout=10.0)
    victim.check("declared body over the cap", answer.status, answer.body, answer.seconds)
    piece = b'{"input": "' + b"c" * (MIB - 16) + b'"}\n'
    answer = raw_request(
        port,
        "POST",
        path,
        victim.auth(**{"content-type": NDJSON}),
        (piece for _ in range(CAP // MIB + 64)),
        chunked=True,
        timeout=30.0,
    )
    # The clock of a chunked body starts with its first byte: the 64 MiB must travel first.
    victim.check("chunked body over the cap", answer.status, answer.body, answer.seconds)
    assert answer.sent < CAP + 32 * MIB


def test_multipart_bombs_are_refused(victim: Victim) -> None:
    path = f"/v1/pools/{VICTIM}/examples?mode=replace"
    good = b'{"input": "fine"}\n'
    # 1,000 files where one is allowed.
    victim.post(
        "multipart, 1,000 file parts",
        path,
        files=[("file", (f"p{i}.jsonl", good, NDJSON)) for i in range(1000)],
    )
    # 10,000 form fields next to one (bad) file.
    victim.post(
        "multipart, 10,000 fields",
        path,
        data={f"f{i}": "v" for i in range(10_000)},
        files={"file": ("rows.jsonl", b"{", NDJSON)},
    )
    # A 20 MB text field and no file.
    victim.post("multipart, a 20 MB field and no file", path, data={"file": "x" * (20 * MIB)})
    # A 60 MB file whose single line is too long.
    big = b'{"input": "' + b"m" * (60 * MIB) + b'"}\n'
    victim.post("multipart, a 60 MB file", path, files={"file": ("big.jsonl", big, NDJSON)})
    # A file named like nothing we read.
    victim.post(
        "multipart, a .pkl file",
        path,
        files={"file": ("index.pkl", b"\x80\x04\x95", "application/octet-stream")},
    )
    # A body that claims multipart but has no boundary, or a broken one.
    victim.post(
        "multipart without a boundary",
        path,
        content=b"--x\r\n\r\n",
        headers={"content-type": "multipart/form-data"},
    )
    victim.post(
        "multipart with a broken body",
        path,
        content=b"--b\r\ncontent-disposition: form-data; name=file; filename=a.jsonl\r\n\r\n{",
        headers={"content-type": "multipart/form-data; boundary=b"},
    )


# --- generated uploads ---------------------------------------------------------------------

GENERATED = scale("hostile_uploads", 100, 1000)
TEXT = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
    min_size=1,
    max_size=40,
)
ROWS = st.lists(
    st.fixed_dictionaries(
        {"input": TEXT, "output": st.one_of(st.none(), TEXT)},
        optional={"label": TEXT, "id": st.integers(0, 10**6).map(str)},
    ),
    min_size=1,
    max_size=12,
)
COLUMNS = ["input", "output", "label", "id", "metadata"]
# Each defect alone makes an upload invalid, whatever the rest of it holds.
DEFECTS = [
    "utf16",
    "utf16_bom",
    "latin1",
    "invalid_utf8",
    "nul",
    "missing_input",
    "blank_or_mistyped_input",
    "field_too_long",
    "deep_metadata",
    "broken_syntax",
    "duplicate_id",
    "unknown_field",
    "lone_surrogate",
    "nan",
]


def _serialize(rows: list[dict[str, Any]], fmt: str, ascii_only: bool) -> str:
    if fmt == "jsonl":
        return "".join(json.dumps(row, ensure_ascii=ascii_only) + "\n" for row in rows)
    if fmt == "json":
        return json.dumps(rows, ensure_ascii=ascii_only)
    columns = [c for c in COLUMNS if any(c in row for row in rows)]
    table = [columns]
    for row in rows:
        cells = []
        for column in columns:
            value = row.get(column)
            cells.append(json.dumps(value) if isinstance(value, dict) else value or "")
        table.append(cells)
    return _csv_bytes(table)


def broken_upload(
    rows: list[dict[str, Any]], fmt: str, defect: str, at: int, ascii_only: bool
) -> bytes:
    """`rows` in `fmt`, with `defect` in row `at` (or in the whole file)."""
    rows = [dict(row) for row in rows]
    row = rows[at % len(rows)]
    if defect == "nul":
        row["input"] += "\x00"
    elif defect == "missing_input":
        del row["input"]
        if fmt == "csv":
            row["input"] = ""  # an empty cell
    elif defect == "blank_or_mistyped_input":
        row["input"] = " \t " if fmt == "csv" else [row["input"], 7]
    elif defect == "field_too_long":
        row["input"] += "z" * MAX_FIELD
    elif defect == "deep_metadata":
        deep: Any = 1
        for _ in range(40):
            deep = {"d": deep}
        row["metadata"] = deep
    elif defect == "duplicate_id":
        row["id"] = "dup"
        rows.append(dict(row))
    elif defect == "unknown_field" and fmt != "csv":
        row["__class__"] = "x"
    elif defect == "lone_surrogate":
        row["input"] = "\ud800" + row["input"]
        ascii_only = True  # JSON carries it as an escape; CSV as the bytes UTF-8 forbids
    elif defect == "nan":
        row["metadata"] = {"m": float("nan")}
    elif defect == "latin1":
        row["input"] = "déjà!" + row["input"]
        ascii_only = False  # an escaped \u00e9 would be ASCII, and so valid UTF-8
    text = _serialize(rows, fmt, ascii_only)
    if defect == "unknown_field" and fmt == "csv":
        text = text.replace("input", "inptu", 1)  # extra CSV columns are metadata: no input
    elif defect == "broken_syntax":
        if fmt == "csv":
            text += '"unterminated,' + str(row["input"])
        else:
            text = text[: len(text) * 2 // 3] + '{"input": '
    if defect == "utf16":
        return text.encode("utf-16-le")
    if defect == "utf16_bom":
        return codecs.BOM_UTF16_BE + text.encode("utf-16-be")
    if defect == "latin1":
        return text.encode("latin-1", errors="replace")
    data = text.encode("utf-8", errors="surrogatepass")
    if defect == "invalid_utf8":
        cut = len(data) // 2
        data = data[:cut] + b"\xff\xfe\xc3(" + data[cut:]
    return data


@settings(
    max_examples=GENERATED,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    # No shrinking: a failing upload changed the server, and replaying variants of it
    # would only pile up more versions. The first failure is reported as it was.
    phases=[Phase.explicit, Phase.generate],
)
@given(
    rows=ROWS,
    fmt=st.sampled_from(["jsonl", "csv", "json"]),
    defect=st.sampled_from(DEFECTS),
    at=st.integers(0, 11),
    ascii_only=st.booleans(),
    new_pool=st.booleans(),
)
def test_generated_broken_uploads_are_refused(
    victim: Victim,
    rows: list[dict[str, Any]],
    fmt: str,
    defect: str,
    at: int,
    ascii_only: bool,
    new_pool: bool,
) -> None:
    body = broken_upload(rows, fmt, defect, at, ascii_only)
    pool = "never-made" if new_pool else VICTIM
    mode = "replace" if at % 2 else "append"
    victim.post(
        f"generated {fmt} with {defect}",
        f"/v1/pools/{pool}/examples?mode={mode}",
        content=body,
        headers={"content-type": {"jsonl": NDJSON, "csv": CSV, "json": JSON}[fmt]},
    )


@settings(max_examples=60, derandomize=True, database=None, deadline=None)
@given(rows=ROWS, fmt=st.sampled_from(["jsonl", "csv", "json"]), extra=ROWS, broken=st.booleans())
def test_row_cap_first_pass_reports_like_a_single_pass(
    rows: list[dict[str, Any]], fmt: str, extra: list[dict[str, Any]], broken: bool
) -> None:
    """The counting first pass (taken when a file may hold more rows than the cap) changes
    nothing for a file within the cap: same records, or the same rejection."""
    mixed = rows + [{**row, "input": 5 if fmt != "csv" else ""} for row in extra[:3]]
    # Enough commas and newlines that the first pass runs at a cap of len(mixed).
    mixed[0] = {**mixed[0], "metadata": {"pad": "," * 40 + "\n" * 40}}
    data = _serialize(mixed, fmt, ascii_only=False).encode()
    if broken:
        data = data[: len(data) * 3 // 4]

    def outcome(cap: int) -> Any:
        limits = Limits(max_rows_per_upload=cap)
        try:
            return parse_upload(data, fmt=fmt, limits=limits, label_from_output=True)
        except Exception as exc:  # the rejection, compared by its details
            return type(exc).__name__, str(exc), getattr(exc, "details", None)

    assert outcome(len(mixed)) == outcome(10**9)


# --- the whole module ----------------------------------------------------------------------


def test_zz_victim_intact_and_memory_bounded(victim: Victim, figures: Figures) -> None:
    """After every upload above (pytest runs a module's tests in file order)."""
    headers = victim.auth()
    assert _pool_names(victim.http, headers) == victim.pools
    assert _select(victim.http, headers) == victim.selection
    time.sleep(0.5)
    memory = victim.memory()
    growth = (memory["VmRSS"] - victim.rss_start) / 1024
    peak = (memory["VmHWM"] - victim.rss_start) / 1024
    log = victim.server.log.read_text(errors="replace")
    name = "test_zz_victim_intact_and_memory_bounded"
    figures.record(
        "F2",
        f"hostile uploads ({len(BOMBS)} fixed bombs, {GENERATED} generated, multipart, "
        "over the cap) refused with a 4xx, pool unchanged",
        f"{victim.refused} of {victim.tried} "
        f"({', '.join(f'{n}x {s}' for s, n in sorted(victim.statuses.items()))})",
        "100% 4xx, published version unchanged",
        victim.refused == victim.tried,
        test=name,
    )
    figures.record(
        "F2",
        "slowest refusal",
        f"{victim.slowest[0] * 1000:.0f} ms ({victim.slowest[1]})",
        f"< {ANSWER_BOUND_S:.0f} s",
        victim.slowest[0] < ANSWER_BOUND_S,
        test=name,
    )
    figures.record(
        "F2",
        "server memory over the module (VmRSS growth; peak above the start)",
        f"{growth:+.1f} MiB (peak +{peak:.0f} MiB)",
        f"growth < {RSS_GROWTH_MIB:.0f} MiB",
        growth < RSS_GROWTH_MIB,
        test=name,
    )
    assert victim.refused == victim.tried >= len(BOMBS) + GENERATED
    assert growth < RSS_GROWTH_MIB, memory
    assert "Traceback" not in log, log[log.index("Traceback") - 1000 :][:5000]
