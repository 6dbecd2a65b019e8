"""Parse and validate example uploads (JSONL, CSV, JSON) into `ExampleRecord`s.

An upload is validated whole: every row is checked, and either all rows come back as records
or `UnprocessableUpload` (422) is raised naming the bad rows, so nothing half-valid is ever
stored. The error's details are

    {"rows": [{"line": 7, "reason": "missing required field 'input'"}, ...],   # first 20
     "bad_rows": 3}                                                          # the total

`line` is the 1-based line in the file for JSONL and CSV (a CSV record spanning several lines
reports the line it starts on), and the 1-based index in the array for JSON. Problems with the
file as a whole (invalid UTF-8, broken JSON or CSV syntax, a bad header) stop the parse and are
reported as one more row entry; the position inside the text is then given in the reason.

The work is bounded by the upload's size: the body cap is checked before decoding, parsing
stops once more rows than allowed are seen, CSV cells, CSV columns, JSONL lines, JSON array
elements and metadata have their own caps, and deep nesting is reported instead of crashing.
A file that may hold more rows than allowed is first counted without validating its rows; if
it does, that alone is reported (the row past the cap), without the bad rows before it.
Nothing is evaluated.
"""

from __future__ import annotations

import codecs
import csv
import gc
import json
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Final, Literal, get_args

from app.errors import InvalidRequest, PayloadTooLarge, UnprocessableUpload
from app.settings import Limits

__all__ = [
    "MAX_CSV_COLUMNS",
    "MAX_METADATA_BYTES",
    "MAX_METADATA_DEPTH",
    "MAX_REPORTED_ROWS",
    "ExampleRecord",
    "UploadFormat",
    "detect_format",
    "parse_upload",
]

UploadFormat = Literal["jsonl", "csv", "json"]

MAX_REPORTED_ROWS: Final = 20
"""Bad rows listed in the 422 details; `bad_rows` still counts all of them."""
MAX_METADATA_DEPTH: Final = 32
"""Deepest nesting allowed in `metadata` (the metadata object itself is level 1)."""
MAX_METADATA_BYTES: Final = 64 * 1024
"""Largest `metadata` per row, serialized as compact UTF-8 JSON."""
MAX_CSV_COLUMNS: Final = 256
"""Most columns a CSV header may name."""

_FIELDS: Final = ("input", "output", "label", "id", "metadata")
_STRING_FIELDS: Final = ("input", "output", "label", "id")

_MEDIA_TYPES: Final[dict[str, UploadFormat]] = {
    "application/x-ndjson": "jsonl",
    "application/ndjson": "jsonl",
    "application/jsonl": "jsonl",
    "application/x-jsonlines": "jsonl",
    "application/json": "json",
    "text/csv": "csv",
    "application/csv": "csv",
}
_EXTENSIONS: Final[dict[str, UploadFormat]] = {
    "jsonl": "jsonl",
    "ndjson": "jsonl",
    "json": "json",
    "csv": "csv",
}
_JSON_WS = re.compile(r"[ \t\n\r]*")
# What may follow an array element: a comma and the whitespace after it, or the closing
# bracket (group 1). One match instead of three calls per element of a huge array.
_JSON_AFTER_ELEMENT = re.compile(r"[ \t\n\r]*(?:,[ \t\n\r]*|(\]))")
_SURROGATE = re.compile("[\ud800-\udfff]")

# csv.field_size_limit is process-wide state, so the CSV parse sets and restores it under a
# lock; otherwise two concurrent uploads could restore each other's value mid-parse.
_CSV_LOCK = threading.Lock()


@dataclass(frozen=True, slots=True)
class ExampleRecord:
    """One validated example, as uploaded.

    `input` is non-empty after stripping but kept exactly as sent. `external_id` is the
    caller's `id` (an integer id is turned into its decimal string). `line` is where the row
    was in the upload (see the module docstring), for later error reports.
    """

    input: str
    output: str | None
    label: str | None
    external_id: str | None
    metadata: dict[str, Any] | None
    line: int


def detect_format(content_type: str | None, filename: str | None) -> UploadFormat:
    """The upload format from a Content-Type header and/or a (multipart) file name.

    A recognised media type wins (parameters such as `charset` are ignored); otherwise, e.g.
    for `application/octet-stream` or `multipart/form-data`, the file extension decides.
    Raises `InvalidRequest` (400) listing the accepted types when neither is recognised.
    """
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media in _MEDIA_TYPES:
        return _MEDIA_TYPES[media]
    if filename:
        # Browsers send a bare name, but some clients send a path: only the extension counts.
        name = filename.replace("\\", "/").rsplit("/", 1)[-1]
        if "." in name:
            ext = name.rsplit(".", 1)[1].strip().lower()
            if ext in _EXTENSIONS:
                return _EXTENSIONS[ext]
    found = f"Content-Type {_show(content_type)}" if content_type else "no Content-Type"
    if filename:
        found += f" and file name {_show(filename)}"
    raise InvalidRequest(
        f"unsupported upload format ({found}); send one of {', '.join(_MEDIA_TYPES)}, "
        "or a multipart file named *.jsonl, *.ndjson, *.json or *.csv"
    )


def parse_upload(
    data: bytes | bytearray,
    *,
    fmt: UploadFormat,
    limits: Limits,
    label_from_output: bool,
) -> list[ExampleRecord]:
    """Parse a whole upload into records, or reject it whole.

    `label_from_output`: a row with no `label` field (or no label column) takes its output as
    label; an explicit null (or an empty CSV cell) stays None.

    Raises `PayloadTooLarge` (413) when `data` exceeds `limits.max_body_bytes` (checked before
    anything else), `InvalidRequest` (400) for an unknown `fmt`, and `UnprocessableUpload`
    (422) when any row is bad or there are no rows; see the module docstring for its details.
    Work and memory are linear in `len(data)`.
    """
    if len(data) > limits.max_body_bytes:
        raise PayloadTooLarge(
            f"upload is {len(data)} bytes; the limit is {limits.max_body_bytes} bytes"
        )
    if fmt not in get_args(UploadFormat):
        raise InvalidRequest(f"unknown upload format {fmt!r}; expected jsonl, csv or json")
    builder = _Builder(limits=limits, label_from_output=label_from_output)
    text = _decode(data, builder)
    if text is not None:
        # One pause for the whole parse: pausing around each decode cost more than the
        # decode itself for tiny rows (5 µs a pause against 3 µs a row).
        with _collector_paused():
            if fmt == "jsonl":
                _parse_jsonl(text, builder)
            elif fmt == "csv":
                _parse_csv(text, builder)
            else:
                _parse_json(text, builder)
    if builder.bad_rows:
        first = builder.reported[0]
        plural = "s" if builder.bad_rows != 1 else ""
        raise UnprocessableUpload(
            f"{builder.bad_rows} bad row{plural}; nothing was stored "
            f"(first: line {first['line']}: {first['reason']})",
            code="invalid_upload",
            details={"rows": builder.reported, "bad_rows": builder.bad_rows},
        )
    if not builder.records:
        raise UnprocessableUpload(
            "the upload contains no examples; nothing was stored",
            code="empty_upload",
            details={"rows": [], "bad_rows": 0},
        )
    return builder.records


# --- shared row validation -----------------------------------------------------------------


class _Fatal(Exception):
    """Stops a parse: the file's structure is broken, later rows cannot be located."""


class _JSONRejected(Exception):
    """Raised from json decoder hooks; not a ValueError so it is never mistaken for one."""


@dataclass(slots=True)
class _Builder:
    limits: Limits
    label_from_output: bool
    records: list[ExampleRecord] = field(default_factory=list)
    reported: list[dict[str, Any]] = field(default_factory=list)
    bad_rows: int = 0
    rows_seen: int = 0
    seen_ids: dict[str, int] = field(default_factory=dict)

    def error(self, line: int, reason: str) -> None:
        self.bad_rows += 1
        if len(self.reported) < MAX_REPORTED_ROWS:
            self.reported.append({"line": line, "reason": reason})

    def count_row(self, line: int) -> None:
        """Count one more row; past the cap, report it and stop the parse."""
        self.rows_seen += 1
        if self.rows_seen > self.limits.max_rows_per_upload:
            self.too_many_rows(line)
            raise _Fatal

    def too_many_rows(self, line: int) -> None:
        self.error(
            line,
            f"too many rows: an upload may hold at most {self.limits.max_rows_per_upload} rows",
        )

    def add(
        self,
        line: int,
        reasons: list[str],
        *,
        input_: str | None,
        output: str | None,
        label: str | None,
        label_given: bool,
        external_id: str | None,
        metadata: dict[str, Any] | None,
    ) -> None:
        """Finish one row: shared checks, then keep it or report it (all reasons together)."""
        values = {"input": input_, "output": output, "label": label, "id": external_id}
        for name in _STRING_FIELDS:
            value = values[name]
            if value is not None:
                problem = _check_string(name, value, self.limits.max_field_chars)
                if problem:
                    reasons.append(problem)
        if external_id is not None:
            first = self.seen_ids.setdefault(external_id, line)
            if first != line:
                reasons.append(f"duplicate id {_show(external_id)} (first used at line {first})")
        if metadata is not None:
            problem = _check_metadata(metadata)
            if problem:
                reasons.append(problem)
        if reasons:
            self.error(line, "; ".join(reasons))
            return
        assert input_ is not None  # a row without input always has a reason
        if not label_given and self.label_from_output:
            label = output
        self.records.append(
            ExampleRecord(
                input=input_,
                output=output,
                label=label,
                external_id=external_id,
                metadata=metadata,
                line=line,
            )
        )

    def add_mapping(self, obj: Any, line: int) -> None:
        """Validate one decoded JSON value as an example record."""
        if not isinstance(obj, dict):
            self.error(line, f"expected a JSON object, found {_type_name(obj)}")
            return
        reasons = [
            f"unknown field {_show(key)} (allowed: {', '.join(_FIELDS)})"
            for key in obj
            if key not in _FIELDS
        ]
        input_ = obj.get("input")
        if "input" not in obj:
            reasons.append("missing required field 'input'")
            input_ = None
        elif not isinstance(input_, str):
            reasons.append(f"field 'input' must be a string, found {_type_name(input_)}")
            input_ = None
        elif not input_.strip():
            reasons.append("field 'input' is empty")
        output = _optional_string(obj, "output", reasons)
        label = _optional_string(obj, "label", reasons)
        raw_id = obj.get("id")
        external_id: str | None = None
        if isinstance(raw_id, int) and not isinstance(raw_id, bool):
            external_id = str(raw_id)
        elif raw_id is not None:
            external_id = _optional_string(obj, "id", reasons)
            if external_id == "":
                reasons.append("field 'id' is empty (use null for no id)")
                external_id = None
        metadata = obj.get("metadata")
        if metadata is not None and not isinstance(metadata, dict):
            reasons.append(
                f"field 'metadata' must be an object or null, found {_type_name(metadata)}"
            )
            metadata = None
        self.add(
            line,
            reasons,
            input_=input_,
            output=output,
            label=label,
            label_given="label" in obj,
            external_id=external_id,
            metadata=metadata,
        )


def _optional_string(obj: dict[str, Any], name: str, reasons: list[str]) -> str | None:
    value = obj.get(name)
    if value is None or isinstance(value, str):
        return value
    reasons.append(f"field {name!r} must be a string or null, found {_type_name(value)}")
    return None


def _check_string(name: str, value: str, max_chars: int) -> str | None:
    if len(value) > max_chars:
        return f"field {name!r} is {len(value)} characters long; the limit is {max_chars}"
    problem = _text_problem(value)
    return f"field {name!r} contains {problem}" if problem else None


def _check_metadata(metadata: dict[str, Any]) -> str | None:
    # One iterative walk (a recursive one could hit the recursion limit) checks depth and
    # text, and sums an upper bound of the serialized size; only when that bound passes the
    # cap is the metadata serialized to measure it exactly. Most rows carry a few small keys,
    # and skipping json.dumps for them halves the cost of the check.
    deep = f"metadata nests deeper than {MAX_METADATA_DEPTH} levels"
    bound = 0
    stack: list[tuple[Any, int]] = [(metadata, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            bound += 4 * len(value) + 2  # at most 4 UTF-8 bytes per character, plus quotes
            problem = _text_problem(value)
            if problem:
                return f"metadata contains {problem}"
        elif isinstance(value, dict):
            if depth > MAX_METADATA_DEPTH:
                return deep
            bound += 2 + 2 * len(value)  # braces, colons and commas
            for key, item in value.items():
                bound += 4 * len(key) + 2
                problem = _text_problem(key)
                if problem:
                    return f"metadata contains {problem}"
                stack.append((item, depth + 1))
        elif isinstance(value, list):
            if depth > MAX_METADATA_DEPTH:
                return deep
            bound += 2 + len(value)
            stack.extend((item, depth + 1) for item in value)
        else:
            bound += 32  # null, booleans and numbers (ints are capped at 4300 digits by json)
            if isinstance(value, int) and not isinstance(value, bool):
                bound += len(str(value)) if abs(value) > 10**30 else 0
    if bound <= MAX_METADATA_BYTES:
        return None
    size = len(
        json.dumps(metadata, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
    )
    if size > MAX_METADATA_BYTES:
        return f"metadata is {size} bytes serialized; the limit is {MAX_METADATA_BYTES} bytes"
    return None


def _text_problem(value: str) -> str | None:
    """A NUL or an unpaired surrogate in `value`, in words; None when it has neither."""
    if "\x00" in value:
        return "a NUL character"
    # Only JSON escapes can produce surrogates (strict UTF-8 decoding never does), and they
    # cannot be stored or embedded as UTF-8 later.
    if not value.isascii():
        match = _SURROGATE.search(value)
        if match:
            return f"an unpaired surrogate \\u{ord(match.group()):04x}"
    return None


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _show(text: str, limit: int = 60) -> str:
    """A quoted, escaped, length-capped rendering of user text for error messages."""
    if len(text) > limit:
        return repr(text[:limit]) + "…"
    return repr(text)


# --- decoding --------------------------------------------------------------------------------


def _decode(data: bytes | bytearray, builder: _Builder) -> str | None:
    start = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        # str(memoryview) decodes without first copying the (possibly 64 MB) body.
        return str(memoryview(data)[start:], "utf-8")
    except UnicodeDecodeError as exc:
        offset = start + exc.start
        line = data.count(b"\n", 0, offset) + 1
        hint = ""
        if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
            hint = " (this looks like UTF-16)"
        builder.error(
            line,
            f"invalid UTF-8 at byte offset {offset} (line {line}){hint}; "
            "the upload must be UTF-8 encoded",
        )
        return None


def _reject_constant(name: str) -> Any:
    raise _JSONRejected(f"{name} is not allowed")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                # A repeated key would silently keep only the last value.
                raise _JSONRejected(f"duplicate key {_show(key)} in an object")
            seen.add(key)
    return obj


_DECODER = json.JSONDecoder(object_pairs_hook=_unique_keys, parse_constant=_reject_constant)
# The scanner raw_decode calls; JSONDecoder sets it in __init__, typeshed does not declare it.
_scan_once: Callable[[str, int], tuple[Any, int]] = _DECODER.scan_once  # type: ignore[attr-defined]

_collector_lock = threading.Lock()
_collector_pauses = 0
_collector_was_enabled = False


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector paused (process-wide) while the block runs.

    Parsing an upload creates no reference cycles, but a hostile value of a million tiny lists
    makes the collector run full collections, each walking every object of the process: in a
    server with its models loaded, that turned a 0.2 s refusal into several seconds. The
    whole parse runs paused: one pause per row cost more than a tiny row's decode. Nested and
    concurrent pauses are counted; the last one to end restores the collector as the first
    one found it.
    """
    global _collector_pauses, _collector_was_enabled
    with _collector_lock:
        if _collector_pauses == 0:
            _collector_was_enabled = gc.isenabled()
            gc.disable()
        _collector_pauses += 1
    try:
        yield
    finally:
        with _collector_lock:
            _collector_pauses -= 1
            if _collector_pauses == 0 and _collector_was_enabled:
                gc.enable()


def _position(text: str, pos: int) -> str:
    line = text.count("\n", 0, pos) + 1
    column = pos - text.rfind("\n", 0, pos)
    return f"line {line} column {column}"


def _json_reason(exc: BaseException, text: str, *, where: Callable[[int], str]) -> str:
    """The reason for a failed JSON decode; `where` turns a position into words."""
    if isinstance(exc, RecursionError):
        return f"JSON nests too deeply (metadata may nest at most {MAX_METADATA_DEPTH} levels)"
    if isinstance(exc, json.JSONDecodeError):
        if exc.pos < len(text) and text[exc.pos] == "\x00":
            return f"NUL character at {where(exc.pos)}"
        return f"invalid JSON: {exc.msg} at {where(exc.pos)}"
    # e.g. an integer past Python's 4300-digit limit; drop the advice about sys settings.
    return "invalid JSON: " + str(exc).split(";", 1)[0]


def _column(pos: int) -> str:
    return f"column {pos + 1}"


def _record_char_limit(limits: Limits) -> int:
    # One record is at most four capped strings plus capped metadata; JSON escapes can take up
    # to 12 characters per code point (a surrogate pair), hence the factor.
    return 12 * (4 * limits.max_field_chars + MAX_METADATA_BYTES) + 4096


# --- JSONL -----------------------------------------------------------------------------------


_NOT_BLANK = re.compile(r"[^ \t\r]")


def _lines(text: str) -> Iterator[tuple[int, int, int]]:
    """(1-based line number, start, end) of each line with content, in `text`.

    `end` leaves out the line's "\\n" or "\\r\\n". Only these end a line: str.splitlines
    would also split on characters such as U+2028 that may legally appear inside JSON
    strings. Nothing is copied, so that an over-long line can be refused by its length.
    """
    pos, number, size = 0, 0, len(text)
    while pos < size:
        end = text.find("\n", pos)
        if end == -1:
            end = size
        number += 1
        start, pos = pos, end + 1
        if end > start and text[end - 1] == "\r":
            end -= 1
        if _NOT_BLANK.search(text, start, end) is not None:
            yield number, start, end


def _jsonl_over_cap(text: str, builder: _Builder) -> bool:
    """Report the first row past the row cap, found without validating the rows before it."""
    for rows, (number, _, _) in enumerate(_lines(text), start=1):
        if rows > builder.limits.max_rows_per_upload:
            builder.too_many_rows(number)
            return True
    return False


def _parse_jsonl(text: str, builder: _Builder) -> None:
    # Validating a row costs some twenty times more than finding it: millions of tiny rows
    # are refused by a first pass that only counts, instead of after validating the rows up
    # to the cap (seconds at the default cap). Fewer lines than the cap need no such pass.
    if text.count("\n") >= builder.limits.max_rows_per_upload and _jsonl_over_cap(text, builder):
        return
    max_chars = _record_char_limit(builder.limits)
    try:
        for number, start, end in _lines(text):
            builder.count_row(number)
            if end - start > max_chars:
                builder.error(
                    number,
                    f"line is {end - start} characters long; one record may be at most {max_chars}",
                )
                continue
            line = text[start:end]
            nul = line.find("\x00")
            if nul != -1:
                builder.error(number, f"NUL character at column {nul + 1}")
                continue
            try:
                obj = _DECODER.decode(line)
            except (ValueError, RecursionError, _JSONRejected) as exc:
                builder.error(number, _json_reason(exc, line, where=_column))
                continue
            builder.add_mapping(obj, number)
    except _Fatal:
        pass


# --- JSON ------------------------------------------------------------------------------------


def _skip_ws(text: str, pos: int) -> int:
    match = _JSON_WS.match(text, pos)
    assert match is not None  # the pattern matches the empty string
    return match.end()


class _TooLong(Exception):
    """A JSON array element longer than one record may be."""


def _decode_element(text: str, pos: int, max_chars: int) -> tuple[Any, int]:
    """Decode the JSON value at `pos` without looking further than about `max_chars` ahead.

    json only decodes whole strings, so the value is decoded from a window that grows until
    the value fits: memory for one element stays bounded like a JSONL line, instead of growing
    with a hostile element as big as the body. Returns (value, end position).
    """
    size = len(text)
    width = 2048
    while True:
        end = min(size, pos + width)
        window = text[pos:end]
        truncated = end < size
        try:
            try:
                value, used = _scan_once(window, 0)
            except StopIteration as stop:  # what raw_decode turns it into, without its call
                raise json.JSONDecodeError("Expecting value", window, stop.value) from None
        except json.JSONDecodeError as exc:
            # Running off the window's end shows up as an unterminated string or an error at
            # (or, for a cut literal or escape, just before) its last characters.
            cut = exc.msg.startswith("Unterminated string") or exc.pos >= len(window) - 16
            if not (truncated and cut):
                exc.pos += pos
                raise
        else:
            # A number cut at the window's end would decode as a shorter number.
            if not truncated or used < len(window):
                return value, pos + used
        if width > max_chars:
            raise _TooLong
        # Quadrupling keeps the re-decoded prefixes to a third of the final window.
        width = min(width * 4, max_chars + 1)


def _parse_json(text: str, builder: _Builder) -> None:
    """A top-level array or {"examples": [...]}, decoded one element at a time.

    Element-wise decoding locates a syntax error at its element and lets the row cap stop the
    parse without decoding the rest of the document. As for JSONL, a document that may hold
    more elements than the cap (elements are separated by commas) is first only counted, so
    that millions of tiny elements are refused without validating the first ones.
    """
    cap = builder.limits.max_rows_per_upload
    if text.count(",") >= cap:
        counter = _Builder(limits=builder.limits, label_from_output=builder.label_from_output)
        decoded = _walk_json(text, counter, validate=False)
        if counter.rows_seen > cap:
            builder.too_many_rows(counter.rows_seen)
            return
        if counter.bad_rows:
            # The document breaks after `decoded` elements: validate those, then report the
            # break as found. Same report as one full pass, without decoding twice the
            # (possibly huge) element that broke it.
            if decoded:
                _walk_json(text, builder, validate=True, stop_after=decoded)
            for row in counter.reported:
                builder.error(row["line"], row["reason"])
            return
    _walk_json(text, builder, validate=True)


def _walk_json(
    text: str, builder: _Builder, *, validate: bool, stop_after: int | None = None
) -> int:
    """Walk the document's elements (validating them if asked); the number decoded whole."""
    size = len(text)
    pos = _skip_ws(text, 0)
    if pos == size:
        return 0  # empty: reported as "no examples"
    decoded = 0

    def where(p: int) -> str:
        return _position(text, p)

    def fatal(index: int, reason: str) -> _Fatal:
        builder.error(index, reason)
        return _Fatal()

    try:
        wrapped = text[pos] == "{"
        if wrapped:
            pos = _skip_ws(text, pos + 1)
            key: Any = None
            if text.startswith('"', pos):
                try:
                    key, pos = _DECODER.raw_decode(text, pos)
                except (ValueError, _JSONRejected) as exc:
                    raise fatal(1, _json_reason(exc, text, where=where)) from None
            if key != "examples":
                found = "no field" if key is None else f"field {_show(key)}"
                raise fatal(
                    1,
                    'expected a JSON array of examples or {"examples": [...]}, found an object '
                    f"with {found} at {where(pos)}",
                )
            pos = _skip_ws(text, pos)
            if not text.startswith(":", pos):
                raise fatal(1, f"invalid JSON: expected ':' at {where(pos)}")
            pos = _skip_ws(text, pos + 1)
        if not text.startswith("[", pos):
            raise fatal(
                1,
                'expected a JSON array of examples or {"examples": [...]} at ' + where(pos),
            )
        pos = _skip_ws(text, pos + 1)
        index = 0
        if text.startswith("]", pos):
            pos += 1
        else:
            max_chars = _record_char_limit(builder.limits)
            while True:
                index += 1
                builder.count_row(index)
                try:
                    obj, pos = _decode_element(text, pos, max_chars)
                except _TooLong:
                    raise fatal(
                        index,
                        f"element is longer than {max_chars} characters; one record may be "
                        f"at most {max_chars}",
                    ) from None
                except (ValueError, RecursionError, _JSONRejected) as exc:
                    raise fatal(index, _json_reason(exc, text, where=where)) from None
                decoded = index
                if validate:
                    builder.add_mapping(obj, index)
                if index == stop_after:
                    return decoded
                after = _JSON_AFTER_ELEMENT.match(text, pos)
                if after is None:
                    raise fatal(
                        index, f"invalid JSON: expected ',' or ']' at {where(_skip_ws(text, pos))}"
                    )
                pos = after.end()
                if after.lastindex == 1:  # the closing bracket
                    break
        pos = _skip_ws(text, pos)
        if wrapped:
            if not text.startswith("}", pos):
                raise fatal(max(index, 1), f"invalid JSON: expected '}}' at {where(pos)}")
            pos = _skip_ws(text, pos + 1)
        if pos != size:
            raise fatal(max(index, 1), f"invalid JSON: extra data at {where(pos)}")
    except _Fatal:
        pass
    return decoded


# --- CSV -------------------------------------------------------------------------------------


def _parse_csv(text: str, builder: _Builder) -> None:
    # Cells may hold capped strings or a metadata JSON object; anything longer fails inside
    # the C parser as soon as the cell passes the limit, so a huge cell costs nothing more.
    cell_limit = max(builder.limits.max_field_chars, MAX_METADATA_BYTES) + 1024
    with _CSV_LOCK:
        previous = csv.field_size_limit(cell_limit)
        try:
            # As for JSONL (a record may span lines, so the line count is an upper bound).
            cap = builder.limits.max_rows_per_upload
            if text.count("\n") + text.count("\r") >= cap:
                _csv_over_cap(text, builder)
            _parse_csv_rows(text, builder, cell_limit)
        except _Fatal:
            pass
        finally:
            csv.field_size_limit(previous)


_CSV_LINE = re.compile(r"[^\r\n]*(?:\r\n?|\n)|[^\r\n]+")
# A physical line with more unquoted commas than this is rejected before the csv module turns
# it into a list (a 50 MB line of commas would be a 400 MB list). Well above MAX_CSV_COLUMNS,
# so that a quote miscounted by the cheap scan below cannot reject a sane row.
_CSV_MAX_LINE_CELLS: Final = 8192


class _TooManyCells(Exception):
    pass


def _csv_lines(text: str) -> Iterator[str]:
    """The physical lines of `text` with their endings, as csv.reader wants them.

    Splits like a file opened with newline="" (at \r\n, \r or \n, never at U+2028), without
    StringIO's copy of the text. Tracks quote parity to count the commas outside quotes.
    """
    in_quotes = False
    for match in _CSV_LINE.finditer(text):
        line = match.group()
        quotes = line.count('"')
        if not quotes:
            outside = 0 if in_quotes else line.count(",")
        else:
            segments = line.split('"')
            outside = sum(seg.count(",") for seg in segments[1 if in_quotes else 0 :: 2])
            in_quotes ^= quotes % 2 == 1
        if outside >= _CSV_MAX_LINE_CELLS:
            raise _TooManyCells
        yield line


def _csv_over_cap(text: str, builder: _Builder) -> None:
    """Report the first row past the row cap (raising _Fatal), without validating rows.

    Returns quietly when the rows fit, or when the file is broken before the cap: the full
    parse then reports that.
    """
    reader = csv.reader(_csv_lines(text), strict=True)
    header = False
    rows = 0
    while True:
        line = reader.line_num + 1
        try:
            row = next(reader)
        except (StopIteration, csv.Error, _TooManyCells):
            return
        if not any(row):
            continue
        if not header:
            _csv_header(row, line, builder)  # a bad header stops here, as in the full parse
            header = True
            continue
        rows += 1
        if rows > builder.limits.max_rows_per_upload:
            builder.too_many_rows(line)
            raise _Fatal


def _parse_csv_rows(text: str, builder: _Builder, cell_limit: int) -> None:
    reader = csv.reader(_csv_lines(text), strict=True)
    header: list[str] | None = None
    columns: dict[str, int] = {}
    while True:
        line = reader.line_num + 1  # where the next record starts
        try:
            row = next(reader)
        except StopIteration:
            return
        except _TooManyCells:
            builder.error(
                line,
                f"row has more than {_CSV_MAX_LINE_CELLS} cells; the header may name at most "
                f"{MAX_CSV_COLUMNS} columns",
            )
            raise _Fatal from None
        except csv.Error as exc:
            if "field larger than field limit" in str(exc):
                reason = (
                    f"a cell is longer than {cell_limit} characters (input, output, label and "
                    f"id may be at most {builder.limits.max_field_chars})"
                )
            else:
                reason = f"invalid CSV: {exc}"
            builder.error(line, reason)
            raise _Fatal from None
        if not any(row):  # a blank line, or a row of empty cells as spreadsheets export
            continue
        if header is None:
            header = _csv_header(row, line, builder)
            columns = {name: i for i, name in enumerate(header)}
            continue
        builder.count_row(line)
        _csv_record(row, line, header, columns, builder)


def _csv_header(row: list[str], line: int, builder: _Builder) -> list[str]:
    def fatal(reason: str) -> _Fatal:
        builder.error(line, reason)
        return _Fatal()

    if len(row) > MAX_CSV_COLUMNS:
        raise fatal(f"header has {len(row)} columns; at most {MAX_CSV_COLUMNS} are allowed")
    names = [cell.strip() for cell in row]
    seen: set[str] = set()
    for position, name in enumerate(names, start=1):
        if not name:
            raise fatal(f"header column {position} has no name")
        if name in seen:
            raise fatal(f"column {_show(name)} appears twice in the header")
        seen.add(name)
    if "input" not in seen:
        shown = ", ".join(_show(n, 30) for n in names[:10]) + (", …" if len(names) > 10 else "")
        raise fatal(
            f"header has no 'input' column (found: {shown}); the first line must be a header "
            "naming the columns"
        )
    return names


def _csv_record(
    row: list[str], line: int, header: list[str], columns: dict[str, int], builder: _Builder
) -> None:
    if len(row) > len(header):
        builder.error(line, f"row has {len(row)} cells but the header has {len(header)} columns")
        return
    # Spreadsheets drop trailing empty cells: a short row means those cells are empty.
    cells = row + [""] * (len(header) - len(row))
    reasons: list[str] = []

    def cell(name: str) -> str | None:
        index = columns.get(name)
        return None if index is None or cells[index] == "" else cells[index]

    input_ = cell("input")
    if input_ is None or not input_.strip():
        reasons.append("field 'input' is empty")
    metadata: dict[str, Any] | None = None
    raw_metadata = cell("metadata")
    if raw_metadata is not None:
        try:
            parsed = _DECODER.decode(raw_metadata)
        except (ValueError, RecursionError, _JSONRejected) as exc:
            parsed = None
            reasons.append("metadata column: " + _json_reason(exc, raw_metadata, where=_column))
        else:
            if isinstance(parsed, dict):
                metadata = parsed
            else:
                reasons.append(
                    f"metadata column must hold a JSON object, found {_type_name(parsed)}"
                )
    extra = {name: cells[i] for i, name in enumerate(header) if name not in _FIELDS}
    if extra:
        metadata = dict(metadata or {})
        for name, value in extra.items():
            if name in metadata:
                reasons.append(
                    f"metadata key {_show(name)} is given both in the metadata column and as "
                    "a column"
                )
            metadata[name] = value
    builder.add(
        line,
        reasons,
        input_=input_,
        output=cell("output"),
        label=cell("label"),
        label_given="label" in columns,
        external_id=cell("id"),
        metadata=metadata,
    )
