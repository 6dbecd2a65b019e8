"""Upload parsing: every accepted shape, every rejection with its line, and hostile input."""

from __future__ import annotations

import csv
import gc
import json
import random
import threading
import time
from typing import Any

import pytest

from app import ingest
from app.errors import InvalidRequest, PayloadTooLarge, UnprocessableUpload
from app.ingest import (
    MAX_CSV_COLUMNS,
    MAX_METADATA_BYTES,
    MAX_METADATA_DEPTH,
    ExampleRecord,
    UploadFormat,
    detect_format,
    parse_upload,
)
from app.settings import Limits

LIMITS = Limits()
SMALL = Limits(max_rows_per_upload=5, max_field_chars=16, max_body_bytes=1024 * 1024)
BOM = b"\xef\xbb\xbf"


def parse(
    data: bytes | str,
    fmt: UploadFormat = "jsonl",
    *,
    limits: Limits = LIMITS,
    label_from_output: bool = True,
) -> list[ExampleRecord]:
    raw = data.encode() if isinstance(data, str) else data
    return parse_upload(raw, fmt=fmt, limits=limits, label_from_output=label_from_output)


def jsonl(*rows: Any) -> str:
    return "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n"


def rejected(
    data: bytes | str, fmt: UploadFormat = "jsonl", *, limits: Limits = LIMITS
) -> UnprocessableUpload:
    with pytest.raises(UnprocessableUpload) as info:
        parse(data, fmt, limits=limits)
    err = info.value
    assert err.status_code == 422
    assert "nothing was stored" in err.message
    rows = err.details["rows"]
    assert err.details["bad_rows"] >= len(rows)
    assert all(set(row) == {"line", "reason"} for row in rows)
    return err


def only_row(data: bytes | str, fmt: UploadFormat = "jsonl", **kw: Any) -> tuple[int, str]:
    """The single reported bad row as (line, reason)."""
    err = rejected(data, fmt, **kw)
    assert err.details["bad_rows"] == 1, err.details
    row = err.details["rows"][0]
    return row["line"], row["reason"]


# --- detect_format ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content_type", "filename", "expected"),
    [
        ("application/x-ndjson", None, "jsonl"),
        ("application/jsonl", None, "jsonl"),
        ("application/json", None, "json"),
        ("application/json; charset=utf-8", None, "json"),
        ("Application/JSON ;charset=UTF-8", None, "json"),
        ("text/csv", None, "csv"),
        ("text/csv; charset=utf-8; header=present", "x.json", "csv"),
        (None, "pool.jsonl", "jsonl"),
        (None, "pool.ndjson", "jsonl"),
        ("application/octet-stream", "pool.JSON", "json"),
        ("multipart/form-data; boundary=xyz", "pool.csv", "csv"),
        ("text/plain", "C:\\Users\\me\\data.v2.csv", "csv"),
        ("", "dir/pool.jsonl", "jsonl"),
    ],
)
def test_detect_format(content_type: str | None, filename: str | None, expected: str) -> None:
    assert detect_format(content_type, filename) == expected


@pytest.mark.parametrize(
    ("content_type", "filename"),
    [
        (None, None),
        ("application/xml", None),
        ("text/plain", "pool.txt"),
        ("application/octet-stream", "jsonl"),
        (None, "pool.csv.gz"),
    ],
)
def test_detect_format_unknown_lists_accepted_types(
    content_type: str | None, filename: str | None
) -> None:
    with pytest.raises(InvalidRequest) as info:
        detect_format(content_type, filename)
    assert info.value.status_code == 400
    for accepted in ("application/x-ndjson", "application/json", "text/csv", ".jsonl", ".csv"):
        assert accepted in info.value.message


# --- accepted shapes -------------------------------------------------------------------------


def test_jsonl_all_fields() -> None:
    data = jsonl(
        {"input": "  keep my spaces ", "output": "pos", "label": "P", "id": "a1", "metadata": {}},
        {"input": "b", "output": None, "id": 42, "metadata": {"src": ["x", 1, None, True]}},
        {"input": "c", "output": "neg", "label": None, "id": None, "metadata": None},
    )
    assert parse(data) == [
        ExampleRecord("  keep my spaces ", "pos", "P", "a1", {}, 1),
        ExampleRecord("b", None, None, "42", {"src": ["x", 1, None, True]}, 2),
        ExampleRecord("c", "neg", None, None, None, 3),
    ]


def test_label_defaults_to_output_only_when_absent() -> None:
    data = jsonl({"input": "a", "output": "pos"}, {"input": "b", "output": "neg", "label": None})
    assert [r.label for r in parse(data, label_from_output=True)] == ["pos", None]
    assert [r.label for r in parse(data, label_from_output=False)] == [None, None]


def test_jsonl_blank_lines_crlf_bom_and_no_final_newline() -> None:
    data = BOM + b'\r\n{"input": "a"}\r\n   \r\n\t\n{"input": "b"}'
    records = parse(data)
    assert [(r.input, r.line) for r in records] == [("a", 2), ("b", 5)]


def test_jsonl_unicode_line_separator_inside_string_is_data() -> None:
    # U+2028 is legal inside a JSON string; it must not split the line.
    records = parse(jsonl({"input": "a\u2028b", "output": "é🙂"}))
    assert records[0].input == "a\u2028b"
    assert records[0].output == "é🙂"


@pytest.mark.parametrize("wrapped", [False, True])
def test_json_array_and_examples_object(wrapped: bool) -> None:
    rows = [{"input": "a", "output": "x"}, {"input": "b", "id": 7}]
    doc: Any = {"examples": rows} if wrapped else rows
    text = json.dumps(doc, indent=2)
    records = parse(BOM + text.encode(), "json")
    assert records == [
        ExampleRecord("a", "x", "x", None, None, 1),
        ExampleRecord("b", None, None, "7", None, 2),
    ]


def test_csv_columns_metadata_and_nulls() -> None:
    data = (
        "id,input,output,label,source,lang\n"
        "r1,hello,world,,web,en\n"
        'r2,"quoted, with comma","multi\nline",L,"",\n'
        "r3,short row\n"
    )
    records = parse(data, "csv")
    assert records == [
        ExampleRecord("hello", "world", None, "r1", {"source": "web", "lang": "en"}, 2),
        ExampleRecord(
            "quoted, with comma", "multi\nline", "L", "r2", {"source": "", "lang": ""}, 3
        ),
        ExampleRecord("short row", None, None, "r3", {"source": "", "lang": ""}, 5),
    ]


def test_csv_label_from_output_when_no_label_column() -> None:
    records = parse("input,output\nhi,pos\nho,\n", "csv")
    assert [(r.output, r.label) for r in records] == [("pos", "pos"), (None, None)]
    records = parse("input,output\nhi,pos\n", "csv", label_from_output=False)
    assert records[0].label is None


def test_csv_metadata_column_is_json_merged_with_extra_columns() -> None:
    data = 'input,metadata,topic\na,"{""k"": [1, 2]}",t1\nb,,t2\n'
    records = parse(data, "csv")
    assert [r.metadata for r in records] == [{"k": [1, 2], "topic": "t1"}, {"topic": "t2"}]
    assert parse('input,metadata\na,"{""k"": 1}"\nb,\n', "csv")[1].metadata is None


def test_multipart_style_file_bytes() -> None:
    """What a browser or Excel on Windows sends as a file part: BOM, CRLF, blank rows."""
    data = BOM + b"input,output,label\r\nbonjour,hello,fr\r\n,,\r\n\r\nhola,hello,es\r\n"
    fmt = detect_format("application/octet-stream", "Export (1).CSV")
    records = parse(data, fmt)
    assert [(r.input, r.output, r.label, r.line) for r in records] == [
        ("bonjour", "hello", "fr", 2),
        ("hola", "hello", "es", 5),
    ]
    header_bom = parse(BOM + b"input\r\nx\r\n", "csv")
    assert header_bom[0].input == "x"  # the BOM did not become part of the column name


def test_limits_are_inclusive() -> None:
    sixteen = "x" * 16
    records = parse(jsonl(*({"input": sixteen, "id": str(i)} for i in range(5))), limits=SMALL)
    assert len(records) == 5
    deep: Any = 1
    for _ in range(MAX_METADATA_DEPTH - 1):
        deep = [deep]
    assert parse(jsonl({"input": "a", "metadata": {"d": deep}}))[0].metadata == {"d": deep}


# --- rejections, each with its line ----------------------------------------------------------


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ("{not json", "invalid JSON: Expecting property name enclosed in double quotes"),
        ('{"input": "a",}', "invalid JSON: "),
        ('{"input": "a"} trailing', "invalid JSON: Extra data"),
        ("[1, 2]", "expected a JSON object, found array"),
        ('"just a string"', "expected a JSON object, found string"),
        ("null", "expected a JSON object, found null"),
        ('{"output": "x"}', "missing required field 'input'"),
        ('{"input": ""}', "field 'input' is empty"),
        ('{"input": " \\t\\n "}', "field 'input' is empty"),
        ('{"input": 3}', "field 'input' must be a string, found number"),
        ('{"input": true}', "field 'input' must be a string, found boolean"),
        ('{"input": null}', "field 'input' must be a string, found null"),
        ('{"input": "a", "output": 1.5}', "field 'output' must be a string or null, found number"),
        ('{"input": "a", "output": ["x"]}', "field 'output' must be a string or null, found array"),
        ('{"input": "a", "label": {}}', "field 'label' must be a string or null, found object"),
        ('{"input": "a", "id": true}', "field 'id' must be a string or null, found boolean"),
        ('{"input": "a", "id": 1.0}', "field 'id' must be a string or null, found number"),
        ('{"input": "a", "id": ""}', "field 'id' is empty"),
        (
            '{"input": "a", "metadata": [1]}',
            "field 'metadata' must be an object or null, found array",
        ),
        (
            '{"input": "a", "metadata": "x"}',
            "field 'metadata' must be an object or null, found string",
        ),
        ('{"input": "a", "Output": "x"}', "unknown field 'Output'"),
        ('{"input": "a", "lable": "x"}', "unknown field 'lable' (allowed: input, output, label"),
        ('{"input": "a", "input": "b"}', "duplicate key 'input'"),
        ('{"input": "a", "metadata": {"k": 1, "k": 2}}', "duplicate key 'k'"),
        ('{"input": NaN}', "NaN is not allowed"),
        ('{"input": "a", "metadata": {"x": Infinity}}', "Infinity is not allowed"),
        ('{"input": "a\\u0000b"}', "field 'input' contains a NUL character"),
        ('{"input": "a", "output": "\\ud800"}', "field 'output' contains an unpaired surrogate"),
        ('{"input": "a", "metadata": {"k": "\\u0000"}}', "metadata contains a NUL character"),
        ('{"input": "a", "metadata": {"k\\u0000": 1}}', "metadata contains a NUL character"),
        ('{"input": "a", "metadata": {"k": "\\udfff"}}', "metadata contains an unpaired surrogate"),
        ('{"input": "a", "id": ' + "9" * 5000 + "}", "invalid JSON: Exceeds the limit"),
    ],
)
def test_jsonl_row_rejections(row: str, reason: str) -> None:
    data = jsonl({"input": "fine"}, "", row, {"input": "fine too"})
    line, got = only_row(data)
    assert line == 3
    assert reason in got


def test_reason_lists_every_problem_of_a_row() -> None:
    line, reason = only_row(jsonl({"inptu": "a", "output": 3}))
    assert line == 1
    assert "unknown field 'inptu'" in reason
    assert "missing required field 'input'" in reason
    assert "field 'output' must be a string or null, found number" in reason


def test_field_too_long_names_field_length_and_limit() -> None:
    for name in ("input", "output", "label", "id"):
        row = {"input": "ok", name: "y" * 17}
        line, reason = only_row(jsonl({"input": "a"}, row), limits=SMALL)
        assert line == 2
        assert reason == f"field '{name}' is 17 characters long; the limit is 16"


def test_metadata_too_large() -> None:
    line, reason = only_row(jsonl({"input": "a", "metadata": {"k": "x" * MAX_METADATA_BYTES}}))
    assert line == 1
    assert f"the limit is {MAX_METADATA_BYTES} bytes" in reason


def test_metadata_nesting_limit() -> None:
    deep: Any = 1
    for _ in range(MAX_METADATA_DEPTH + 1):
        deep = {"d": deep}  # 33 nested objects; the metadata object itself is level 1
    line, reason = only_row(jsonl({"input": "a"}, {"input": "b", "metadata": deep}))
    assert (line, reason) == (2, f"metadata nests deeper than {MAX_METADATA_DEPTH} levels")


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv"])
def test_nested_bomb_is_reported_not_crashing(fmt: UploadFormat) -> None:
    bomb = '{"input": "b", "metadata": ' + "[" * 10_000 + "]" * 10_000 + "}"
    if fmt == "jsonl":
        data = jsonl({"input": "a"}, bomb)
        expected_line = 2
    elif fmt == "json":
        data = '[{"input": "a"},\n' + bomb + "]"
        expected_line = 2  # the element index
    else:
        meta = '{"k": ' + "[" * 10_000 + "]" * 10_000 + "}"
        data = "input,metadata\na,\nb," + '"' + meta.replace('"', '""') + '"\n'
        expected_line = 3
    line, reason = only_row(data, fmt)
    assert line == expected_line
    assert "nest" in reason


def test_duplicate_ids_name_the_id_and_first_line() -> None:
    data = jsonl({"input": "a", "id": "x"}, {"input": "b", "id": 5}, {"input": "c", "id": "5"})
    line, reason = only_row(data)
    assert (line, reason) == (3, "duplicate id '5' (first used at line 2)")
    csv_data = "id,input\nq,a\nr,b\nq,c\n"
    line, reason = only_row(csv_data, "csv")
    assert (line, reason) == (4, "duplicate id 'q' (first used at line 2)")


def test_all_bad_rows_are_reported_not_just_the_first() -> None:
    rows = [{"input": "ok"}] * 10
    rows[1] = {"output": "no input"}
    rows[6] = {"input": ""}
    err = rejected(jsonl(*rows))
    assert err.details == {
        "rows": [
            {"line": 2, "reason": "missing required field 'input'"},
            {"line": 7, "reason": "field 'input' is empty"},
        ],
        "bad_rows": 2,
    }
    assert err.message.startswith("2 bad rows; nothing was stored")
    assert err.code == "invalid_upload"


def test_report_keeps_first_20_rows_and_total_count() -> None:
    rows = [{"input": "ok"} if i % 2 else {"input": 1} for i in range(100)]
    err = rejected(jsonl(*rows))
    assert err.details["bad_rows"] == 50
    assert [r["line"] for r in err.details["rows"]] == list(range(1, 41, 2))
    assert err.message.startswith("50 bad rows; nothing was stored")


def test_too_many_rows() -> None:
    data = jsonl(*({"input": str(i)} for i in range(6)))
    assert only_row(data, limits=SMALL) == (
        6,
        "too many rows: an upload may hold at most 5 rows",
    )
    assert only_row("input\n" + "x\n" * 6, "csv", limits=SMALL)[0] == 7
    assert only_row(json.dumps([{"input": "x"}] * 6), "json", limits=SMALL)[0] == 6


@pytest.mark.parametrize(
    ("data", "fmt"),
    [
        (b"", "jsonl"),
        (b"\n  \n\r\n", "jsonl"),
        (BOM, "jsonl"),
        (b"", "csv"),
        (b"input,output\n", "csv"),
        (b"input,output\n,,\n\n", "csv"),
        (b"", "json"),
        (b"  []  ", "json"),
        (b'{"examples": []}', "json"),
    ],
)
def test_empty_upload(data: bytes, fmt: UploadFormat) -> None:
    err = rejected(data, fmt)
    assert err.details == {"rows": [], "bad_rows": 0}
    assert "no examples" in err.message


def test_invalid_utf8_reports_byte_offset_and_line() -> None:
    data = b'{"input": "a"}\n{"input": "caf\xe9"}\n'
    assert only_row(data) == (
        2,
        "invalid UTF-8 at byte offset 29 (line 2); the upload must be UTF-8 encoded",
    )
    # The BOM counts in the offset: positions refer to the bytes as sent.
    assert "byte offset 32 (line 2)" in only_row(BOM + data)[1]
    assert only_row(b"input\nok\n\xff\xfe\n", "csv")[0] == 3
    utf16 = "input\nhello\n".encode("utf-16")
    assert "UTF-16" in only_row(utf16, "csv")[1]


def test_raw_nul_bytes() -> None:
    assert only_row(b'{"input": "a"}\n{"input": "a\x00"}\n') == (2, "NUL character at column 13")
    line, reason = only_row(b"input,output\na,b\nc\x00d,e\n", "csv")
    assert (line, reason) == (3, "field 'input' contains a NUL character")
    line, reason = only_row(b'[{"input": "a"}, {"input": "\x00"}]', "json")
    assert line == 2
    assert reason.startswith("NUL character at line 1 column 29")


def test_csv_rejections() -> None:
    assert only_row("input,output\na,b\nc,d,e\n", "csv") == (
        3,
        "row has 3 cells but the header has 2 columns",
    )
    line, reason = only_row("text,answer\na,b\n", "csv")
    assert line == 1
    assert "header has no 'input' column (found: 'text', 'answer')" in reason
    # Leading blank lines: the header is the first non-blank line.
    assert only_row("\n\nfoo,bar\n", "csv")[0] == 3
    assert only_row("input,input\na,b\n", "csv") == (
        1,
        "column 'input' appears twice in the header",
    )
    assert only_row(",input\n0,a\n", "csv") == (1, "header column 1 has no name")
    line, reason = only_row("input\n" + '"unterminated\nx\n', "csv")
    assert line == 2
    assert reason.startswith("invalid CSV: ")
    line, reason = only_row('input,metadata\na,"[1]"\n', "csv")
    assert (line, reason) == (2, "metadata column must hold a JSON object, found array")
    line, reason = only_row('input,metadata\na,"{bad"\n', "csv")
    assert line == 2
    assert reason.startswith("metadata column: invalid JSON: ")
    line, reason = only_row('input,metadata,k\na,"{""k"": 1}",2\n', "csv")
    assert "metadata key 'k' is given both" in reason
    assert only_row("input,label\n   ,x\n", "csv") == (2, "field 'input' is empty")
    assert only_row("input,output\n,x\n", "csv") == (2, "field 'input' is empty")


def test_csv_column_cap() -> None:
    header = ",".join(["input", *(f"c{i}" for i in range(MAX_CSV_COLUMNS))])
    line, reason = only_row(header + "\n" + "a" + "," * MAX_CSV_COLUMNS + "\n", "csv")
    assert line == 1
    assert f"at most {MAX_CSV_COLUMNS}" in reason
    assert only_row("input\n" + "x," * 299 + "x\n", "csv") == (
        2,
        "row has 300 cells but the header has 1 columns",
    )
    line, reason = only_row("input\nok\n" + "x," * 10_000 + "x\n", "csv")
    assert (line, reason) == (
        3,
        "row has more than 8192 cells; the header may name at most 256 columns",
    )
    # Commas inside quotes are text, not cells.
    prose = '"' + "a," * 9_000 + '"'
    assert parse(f"input,output\n{prose},x\n", "csv")[0].input == prose[1:-1]
    multi_line = '"' + "a,\n" * 6_000 + '"'
    assert parse(f"input,output\n{multi_line},x\n", "csv")[0].output == "x"


def test_csv_comma_bomb_fails_fast() -> None:
    started = time.perf_counter()
    line, reason = only_row(b"input\n" + b"," * 50_000_000 + b"\n", "csv")
    assert time.perf_counter() - started < 2.0
    assert line == 2
    assert "row has more than" in reason


@pytest.mark.parametrize(
    ("doc", "line", "reason"),
    [
        ('{"input": "a"}', 1, "found an object with field 'input'"),
        ("{}", 1, "found an object with no field"),
        ('"text"', 1, "expected a JSON array of examples"),
        ('{"examples": {"input": "a"}}', 1, "expected a JSON array of examples"),
        ('[{"input": "a"}, {"input": "b"},]', 3, "invalid JSON: Expecting value at line 1"),
        ('[{"input": "a"}\n {"input": "b"}]', 1, "expected ',' or ']' at line 2 column 2"),
        ('[{"input": "a"} ,\n\t{"input": "b"}  x]', 2, "expected ',' or ']' at line 2 column 18"),
        ('[{"input": "a"}   }', 1, "expected ',' or ']' at line 1 column 19"),
        ('[{"input": "a"} , ', 2, "invalid JSON: Expecting value at line 1 column 19"),
        ('[{"input": "a"}] []', 1, "invalid JSON: extra data at line 1 column 18"),
        ('{"examples": [{"input": "a"}], "more": 1}', 1, "expected '}'"),
        ('[{"input": "a"}, {"input": 1}, 7]', 2, "field 'input' must be a string"),
    ],
)
def test_json_document_rejections(doc: str, line: int, reason: str) -> None:
    err = rejected(doc, "json")
    first = err.details["rows"][0]
    assert first["line"] == line
    assert reason in first["reason"]


def test_json_collects_element_errors_before_a_syntax_error() -> None:
    err = rejected('[{"input": 1}, {"input": "ok"}, {"input": 2}, {bad]', "json")
    assert [r["line"] for r in err.details["rows"]] == [1, 3, 4]


@pytest.mark.parametrize("seed", range(20))
def test_json_elements_of_any_size_decode_exactly(seed: int) -> None:
    """Elements are decoded through growing windows; cuts at any point must not matter."""
    rng = random.Random(seed)
    alphabet = ["a", " ", '"', "\\", "\n", "é", "🙂", "\u2028", "{", "]", ","]
    rows = []
    for i in range(12):
        size = rng.choice([0, 1, 2040, 2047, 2048, 2049, 4100, rng.randrange(1, 19_000)])
        text = "x" + "".join(rng.choice(alphabet) for _ in range(size))
        meta = {"n": rng.choice([1, -0.5, 1e300, 12345678901234567890]), "t": True, "z": None}
        rows.append({"input": text[:20_000], "output": str(i), "metadata": meta})
    doc = json.dumps(rows, ensure_ascii=bool(seed % 2), indent=rng.choice([None, 0, 3]))
    records = parse(doc, "json")
    assert [(r.input, r.output, r.metadata) for r in records] == [
        (row["input"], row["output"], row["metadata"]) for row in rows
    ]


def test_json_element_cap() -> None:
    bomb = '[{"input": "a"}, {"input": "b", "metadata": {"k": [' + "[]," * 5_000_000 + "[]]}}]"
    started = time.perf_counter()
    line, reason = only_row(bomb, "json")
    assert time.perf_counter() - started < 3.0  # about 0.2 s; 0.5 s with the collector running
    assert line == 2
    assert "element is longer than" in reason


@pytest.mark.parametrize(
    ("fmt", "doc"),
    [
        ("jsonl", jsonl({"input": "a"}, {"input": "b", "metadata": {"k": [1]}})),
        ("json", '[{"input": "a"}, {"input": "b", "metadata": {"k": [1]}}]'),
        ("csv", 'input,metadata\na,\nb,"{""k"": [1]}"\n'),
    ],
)
def test_the_whole_parse_runs_with_the_collector_paused(
    monkeypatch: pytest.MonkeyPatch, fmt: UploadFormat, doc: str
) -> None:
    # One pause around the parse, not one per decode: pausing costs more than a tiny row.
    enabled_while_adding: list[bool] = []
    add = ingest._Builder.add

    def spy(self: Any, *args: Any, **kwargs: Any) -> None:
        enabled_while_adding.append(gc.isenabled())
        add(self, *args, **kwargs)

    monkeypatch.setattr(ingest._Builder, "add", spy)
    was = gc.isenabled()
    gc.enable()
    try:
        records = parse(doc, fmt)
        assert gc.isenabled()
    finally:
        (gc.enable if was else gc.disable)()
    assert [r.metadata for r in records] == [None, {"k": [1]}]
    assert enabled_while_adding == [False, False]


@pytest.mark.parametrize("enabled", [True, False])
def test_decoding_pauses_the_collector_and_restores_it(enabled: bool) -> None:
    seen: list[bool] = []
    start = threading.Barrier(4)

    def decode() -> None:
        start.wait(timeout=10)
        for _ in range(200):
            with ingest._collector_paused():
                seen.append(gc.isenabled())
                with ingest._collector_paused():
                    seen.append(gc.isenabled())

    was = gc.isenabled()
    (gc.enable if enabled else gc.disable)()
    try:
        threads = [threading.Thread(target=decode) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert len(seen) == 4 * 200 * 2 and not any(seen)
        assert gc.isenabled() is enabled
    finally:
        (gc.enable if was else gc.disable)()


# --- bounded work ----------------------------------------------------------------------------


def test_payload_too_large_before_parsing() -> None:
    limits = Limits(max_body_bytes=1024)
    with pytest.raises(PayloadTooLarge) as info:
        parse(b"\xff" * 1025, limits=limits)
    assert info.value.status_code == 413
    assert "1025 bytes" in info.value.message
    assert len(parse(jsonl({"input": "x" * 900}), limits=limits)) == 1


def test_huge_csv_field_fails_fast() -> None:
    data = b'input,output\n"' + b"x" * 50_000_000 + b'",y\n'
    started = time.perf_counter()
    line, reason = only_row(data, "csv")
    assert time.perf_counter() - started < 2.0
    assert line == 2
    assert "a cell is longer than" in reason


def test_csv_field_size_limit_is_restored() -> None:
    before = csv.field_size_limit()
    parse("input\nx\n", "csv")
    with pytest.raises(UnprocessableUpload):
        parse("input\n" + "x" * 100_000 + "\n", "csv")
    assert csv.field_size_limit() == before


def test_huge_jsonl_line_fails_fast() -> None:
    data = b'{"input": "' + b"x" * 50_000_000 + b'"}\n'
    started = time.perf_counter()
    line, reason = only_row(data)
    assert time.perf_counter() - started < 2.0
    assert line == 1
    assert "characters long; one record may be at most" in reason


def test_row_cap_stops_parsing_early() -> None:
    limits = Limits(max_rows_per_upload=1000)
    data = b'{"input": "x"}\n' * 2_000_000  # 30 MB
    started = time.perf_counter()
    assert only_row(data, limits=limits)[0] == 1001
    assert only_row(b"input\n" + b"x\n" * 2_000_000, "csv", limits=limits)[0] == 1002
    doc = b"[" + b'{"input": "x"},' * 2_000_000 + b'{"input": "x"}]'
    assert only_row(doc, "json", limits=limits)[0] == 1001
    assert time.perf_counter() - started < 2.0


# --- hostile junk never escapes as another exception -----------------------------------------

VALID: dict[UploadFormat, bytes] = {
    "jsonl": jsonl(
        {"input": "a", "output": "b", "id": 1, "metadata": {"k": [1, {"z": None}]}},
        {"input": "c", "label": "d"},
    ).encode(),
    "json": json.dumps({"examples": [{"input": "a", "metadata": {"k": "v"}}]}).encode(),
    "csv": b'id,input,output,metadata,x\n1,a,b,"{""k"": 1}",z\n2,"c\nd",e,,\n',
}
JUNK_PIECES = [
    b"{",
    b"}",
    b"[",
    b"]",
    b'"',
    b",",
    b"\n",
    b"\r",
    b"\x00",
    b"\xff",
    b"\xef\xbb\xbf",
    b"\\u0000",
    b"\\ud800",
    b"NaN",
    b'"input"',
    b":",
    b"[" * 3000,
    b"\xe2\x80\xa8",
    b"9" * 5000,
]


@pytest.mark.parametrize("seed", range(200))
def test_random_junk_only_raises_upload_errors(seed: int) -> None:
    rng = random.Random(seed)
    fmt: UploadFormat = rng.choice(["jsonl", "json", "csv"])
    kind = seed % 3
    if kind == 0:  # pure noise
        data = rng.randbytes(rng.randrange(0, 4096))
    elif kind == 1:  # a valid upload with bytes flipped, cut or spliced in
        buf = bytearray(VALID[fmt])
        for _ in range(rng.randrange(1, 8)):
            at = rng.randrange(0, len(buf) + 1)
            op = rng.randrange(3)
            if op == 0 and buf:
                buf[min(at, len(buf) - 1)] = rng.randrange(256)
            elif op == 1:
                del buf[at : at + rng.randrange(1, 10)]
            else:
                buf[at:at] = rng.choice(JUNK_PIECES)
        data = bytes(buf)
    else:  # structured junk
        data = b"".join(rng.choice(JUNK_PIECES) for _ in range(rng.randrange(1, 60)))
    limits = Limits(max_body_bytes=64 * 1024, max_rows_per_upload=50, max_field_chars=200)
    try:
        records = parse_upload(data, fmt=fmt, limits=limits, label_from_output=bool(seed % 2))
    except (UnprocessableUpload, InvalidRequest, PayloadTooLarge):
        return
    assert records
    assert all(isinstance(r, ExampleRecord) and r.input.strip() for r in records)
