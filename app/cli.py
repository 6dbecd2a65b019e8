"""The `iclserve` command: run the server, or talk to a running one over HTTP.

    iclserve serve [--host H] [--port P] [--data-dir D]
    iclserve pools upload NAME FILE [--mode append|replace] [--format jsonl|csv|json] [--no-wait]
    iclserve pools list | show NAME | delete NAME [--yes]
    iclserve pools annotate NAME FILE
    iclserve subsets create POOL NAME --method M --budget B [--param K=V ...] [--seed S] [--no-wait]
    iclserve subsets list POOL | show POOL NAME | delete POOL NAME [--yes]
    iclserve subsets export POOL NAME [--unlabeled] [--output FILE]
    iclserve presets create POOL NAME --model M [--method ease|random_search] [--k K]
             [--validation-pool P [--validation-limit N] | --validation-file F.jsonl]
             [--budget B] [--instruction TEXT ...] [--param K=V ...] [--seed S] [--no-wait]
    iclserve presets list POOL | show POOL NAME | delete POOL NAME [--yes]
    iclserve jobs show ID | list [--pool P]
    iclserve select NAME QUERY [-k K] [--method M] [--order O] [--seed S] [--json]

The client side uses only the standard library (urllib), so `iclserve --help` and the client
commands start fast: pydantic, FastAPI and the embedding stack are imported only by `serve`,
and tqdm only when a progress bar is shown. Exit codes: 0 success, 1 the server said no or
could not be reached, 2 a usage or local input error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO, NoReturn

DEFAULT_URL = "http://127.0.0.1:8000"
# Seconds between job polls: start quick so small uploads finish promptly, then back off so a
# long embedding job costs the server at most two requests a second.
POLL_MIN_S = 0.25
POLL_MAX_S = 0.5
# A server restart resumes upload jobs (API.md, Jobs), so polling rides out this many seconds
# of unreachable server or 502/503/504 before giving up.
POLL_OUTAGE_S = 60.0
# Validating and durably storing a large upload happens before the 202, so the response to the
# upload itself may take much longer than an ordinary call.
UPLOAD_MIN_TIMEOUT_S = 300.0
# Files at least this large get a byte-level bar while they are sent.
UPLOAD_BAR_MIN_BYTES = 8 * 1024 * 1024

TERMINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})
CONTENT_TYPES = {"jsonl": "application/x-ndjson", "csv": "text/csv", "json": "application/json"}
EXTENSION_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".json": "json"}
INPUT_PREVIEW_CHARS = 80
SUBSET_METHODS = ("votek", "votek_two_stage", "ideal", "mfl", "diversity", "random")
PRESET_METHODS = ("ease", "random_search")
VALIDATION_KEYS = ("input", "output", "label")


class CliError(Exception):
    """A local problem (bad argument, unreadable file); exit code 2."""


class ApiError(Exception):
    """The server answered with an error status, in the OpenAI shape when it could."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        rows: list[Any] | None = None,
        bad_rows: int | None = None,
        retry_after: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.rows = rows or []
        self.bad_rows = bad_rows
        self.retry_after = retry_after


class Unreachable(Exception):
    """No HTTP answer at all: refused, reset, timed out, DNS or TLS failure."""

    def __init__(self, url: str, reason: object) -> None:
        super().__init__(f"cannot reach iclserve at {url}: {reason}")
        self.url = url
        self.reason = reason


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # urllib forwards every header, Authorization included, to wherever a redirect points.
    # The API never redirects, so a 3xx is reported as an error instead of followed.
    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: Any,
        code: int,
        msg: str,
        headers: Any,
        newurl: str,
    ) -> urllib.request.Request | None:
        return None


def _display_url(url: str) -> str:
    """The URL without any user:password part, safe to print."""
    parts = urllib.parse.urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


class Client:
    """A minimal JSON client for the iclserve HTTP API (stdlib only)."""

    def __init__(self, base_url: str, *, key: str | None, timeout: float) -> None:
        self.base_url = base_url.rstrip("/")
        self.display_url = _display_url(self.base_url)
        self.timeout = timeout
        self._key = key
        self._opener = urllib.request.build_opener(_NoRedirect)

    def call(
        self,
        method: str,
        path: str,
        *,
        query: dict[str, str] | None = None,
        body: Any = None,
        data: BinaryIO | Any | None = None,
        content_type: str | None = None,
        length: int | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Send one request and return the decoded JSON body (None when empty).

        `body` is sent as JSON; `data` is a readable file object streamed as is, with
        `length` as its Content-Length. Raises ApiError or Unreachable.
        """
        url = self.base_url + path
        if query:
            url += "?" + urllib.parse.urlencode(query)
        headers = {"Accept": "application/json", "User-Agent": f"iclserve-cli/{_version()}"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        payload: Any = None
        if body is not None:
            payload = json.dumps(body).encode("utf-8")
            headers["Content-Type"] = "application/json"
        elif data is not None:
            payload = data
            if content_type:
                headers["Content-Type"] = content_type
            if length is not None:
                # Without it urllib would switch to chunked encoding; with it the file is sent
                # in blocks straight from disk.
                headers["Content-Length"] = str(length)
        request = urllib.request.Request(url, data=payload, method=method, headers=headers)
        try:
            with self._opener.open(request, timeout=timeout or self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            try:
                raw_error = exc.read()
            except (OSError, http.client.HTTPException):
                raw_error = b""
            finally:
                exc.close()
            raise _api_error(exc.code, exc.headers, raw_error, exc.reason) from None
        except urllib.error.URLError as exc:
            raise Unreachable(self.display_url, self._reason(exc.reason, timeout)) from None
        except (OSError, http.client.HTTPException) as exc:
            # Raised while reading the response: a timeout, a reset, a server that hung up.
            raise Unreachable(self.display_url, self._reason(exc, timeout)) from None
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            raise ApiError(200, "the server sent a response that is not JSON") from None

    def _reason(self, reason: object, timeout: float | None) -> object:
        if isinstance(reason, TimeoutError):
            return f"no answer within {timeout or self.timeout:g} s"
        if isinstance(reason, BaseException) and not str(reason):
            return type(reason).__name__
        return reason


def _api_error(status: int, headers: Any, raw: bytes, reason: object) -> ApiError:
    retry_after = headers.get("Retry-After") if headers is not None else None
    try:
        decoded = json.loads(raw) if raw else None
    except ValueError:
        decoded = None
    error = decoded.get("error") if isinstance(decoded, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        rows = error.get("rows")
        bad_rows = error.get("bad_rows")
        return ApiError(
            status,
            error["message"],
            rows=rows if isinstance(rows, list) else None,
            bad_rows=bad_rows if isinstance(bad_rows, int) else None,
            retry_after=retry_after,
        )
    # Not our error shape (a proxy in between, say): a short excerpt is more useful than nothing.
    text = raw[:200].decode("utf-8", "replace").strip() if raw else ""
    return ApiError(status, text or str(reason), retry_after=retry_after)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("iclserve")
    except PackageNotFoundError:
        return "unknown"


# ----------------------------------------------------------------------------- output helpers


def _out(text: str = "") -> None:
    print(text)


def _err(text: str) -> None:
    print(text, file=sys.stderr)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False, separators=(", ", ": "))
    return str(value)


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    lines = [headers, *cells]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines
    )


def _listing(pairs: Sequence[tuple[str, Any]]) -> str:
    width = max((len(k) for k, _ in pairs), default=0)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in pairs)


def _labels(labels: Any, limit: int = 20) -> str:
    if not isinstance(labels, dict) or not labels:
        return _cell(labels or None)
    ranked = sorted(labels.items(), key=lambda kv: (-int(kv[1] or 0), str(kv[0])))
    shown = ", ".join(f"{name}={count}" for name, count in ranked[:limit])
    more = len(ranked) - limit
    return shown + (f", ... ({more} more)" if more > 0 else "")


def _embedder(embedder: Any) -> str:
    if isinstance(embedder, dict) and "name" in embedder:
        dim = embedder.get("dim")
        return f"{embedder['name']} (dim {dim})" if dim is not None else str(embedder["name"])
    return _cell(embedder)


POOL_SUMMARY_KEYS = ("name", "version", "size", "labeled", "labels", "embedder", "status")


def _pool_listing(pool: dict[str, Any], *, full: bool) -> str:
    keys = list(POOL_SUMMARY_KEYS)
    if full:
        keys += [k for k in pool if k not in POOL_SUMMARY_KEYS]
    pairs: list[tuple[str, Any]] = []
    for key in keys:
        value = pool.get(key)
        if key == "labels":
            pairs.append((key, _labels(value)))
        elif key == "embedder":
            pairs.append((key, _embedder(value)))
        else:
            pairs.append((key, _cell(value)))
    return _listing(pairs)


def _job_listing(job: dict[str, Any]) -> str:
    keys = ["id", "kind", "pool", "status"]
    pairs: list[tuple[str, Any]] = [(k, _cell(job.get(k))) for k in keys]
    pairs.append(("progress", _progress_text(job)))
    error = job.get("error")
    pairs.append(("error", _error_text(error) if error else "-"))
    rest = [k for k in job if k not in {*keys, "done", "total", "progress", "error"}]
    pairs += [(k, _cell(job.get(k))) for k in rest]
    return _listing(pairs)


def _progress_text(job: dict[str, Any]) -> str:
    done, total = job.get("done"), job.get("total")
    if not total:
        return f"{done or 0}/?"
    return f"{done or 0}/{total} ({100.0 * (done or 0) / total:.0f}%)"


def _error_text(error: Any) -> str:
    if isinstance(error, dict) and "message" in error:
        return str(error["message"])
    return _cell(error)


def _items(response: Any, key: str) -> list[dict[str, Any]]:
    # The list routes answer OpenAI-style {"object": "list", "data": [...]}; {"pools": [...]}
    # and a bare array are accepted too, so an older or newer server still lists.
    items: Any = response
    if isinstance(response, dict):
        items = response.get(key, response.get("data"))
    if not isinstance(items, list):
        return []
    return [item for item in items if isinstance(item, dict)]


def _dump_json(value: Any) -> None:
    _out(json.dumps(value, indent=2, ensure_ascii=False))


def _one_line(text: Any, limit: int = INPUT_PREVIEW_CHARS) -> str:
    flat = " ".join(str(text or "").split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _pool_path(name: str, suffix: str = "") -> str:
    # Quote everything: a name with "/" or "?" must not turn into another route.
    return f"/v1/pools/{urllib.parse.quote(name, safe='')}{suffix}"


def _job_path(job_id: Any) -> str:
    return f"/v1/jobs/{urllib.parse.quote(str(job_id), safe='')}"


# ----------------------------------------------------------------------------- commands


def _client(args: argparse.Namespace) -> Client:
    url = args.url or os.environ.get("ICLSERVE_URL") or DEFAULT_URL
    if not url.startswith(("http://", "https://")):
        raise CliError(f"--url must start with http:// or https://, got {_display_url(url)!r}")
    key = args.key if args.key is not None else os.environ.get("ICLSERVE_API_KEY")
    key = (key or "").strip() or None
    # http.client would reject such a header with an error that quotes the whole value,
    # key included; check first and say so without echoing it.
    if key is not None and not all(33 <= ord(ch) <= 126 for ch in key):
        raise CliError(
            "the API key contains spaces or control characters (--key / ICLSERVE_API_KEY)"
        )
    return Client(url, key=key, timeout=args.timeout)


def cmd_serve(args: argparse.Namespace) -> int:
    """Build Settings from the environment (and .env), apply the flags, and run the server."""
    from pydantic import ValidationError

    from app.settings import Settings

    overrides: dict[str, Any] = {}
    if args.host is not None:
        overrides["host"] = args.host
    if args.port is not None:
        overrides["port"] = args.port
    if args.data_dir is not None:
        overrides["data_dir"] = Path(args.data_dir)
    try:
        # Init arguments take precedence over env and .env in pydantic-settings, and unlike
        # attribute assignment they are validated.
        settings = Settings(**overrides)
        settings.check_bind()
    except ValidationError as exc:
        _err("error: invalid settings:")
        # include_input=False: a rejected value may be a key.
        for problem in exc.errors(include_input=False, include_url=False):
            loc = "__".join(str(part) for part in problem["loc"])
            name = f"ICLSERVE_{loc.upper()}" if loc else "settings"
            _err(f"  {name}: {problem['msg']}")
        return 2
    except ValueError as exc:
        _err(f"error: {exc}")
        return 2
    except OSError as exc:
        # A key file named in ICLSERVE_*_KEYS_FILE that cannot be read.
        _err(f"error: cannot read settings: {exc}")
        return 2

    from app.threads import configure_threads

    configure_threads()  # before app.server loads FAISS and ONNX Runtime
    try:
        from app.server import serve
    except ModuleNotFoundError as exc:
        _err(f"error: cannot start the server: {exc}")
        return 1
    serve(settings)
    return 0


def _content_type(fmt: str | None, path: Path) -> str:
    if fmt is None:
        fmt = EXTENSION_FORMATS.get(path.suffix.lower())
        if fmt is None:
            raise CliError(
                f"cannot tell the format of {path} from its extension: pass --format jsonl|csv|json"
            )
    return CONTENT_TYPES[fmt]


class _ReadProgress:
    """A file wrapper that advances a tqdm bar as http.client reads blocks from it."""

    def __init__(self, fh: BinaryIO, bar: Any) -> None:
        self._fh = fh
        self._bar = bar

    def read(self, size: int = -1) -> bytes:
        chunk = self._fh.read(size)
        self._bar.update(len(chunk))
        return chunk


def cmd_pools_upload(args: argparse.Namespace) -> int:
    """Upload a file of examples, then follow the embedding job to its end."""
    client = _client(args)
    path = Path(args.file)
    content_type = _content_type(args.format, path)
    try:
        size = path.stat().st_size
        fh = path.open("rb")
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror or exc}") from None
    progress = not args.no_progress
    bar: Any = None
    try:
        data: Any = fh
        if progress and size >= UPLOAD_BAR_MIN_BYTES:
            from tqdm import tqdm  # type: ignore[import-untyped]

            bar = tqdm(
                total=size,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=f"uploading {path.name}",
                file=sys.stderr,
                dynamic_ncols=True,
            )
            data = _ReadProgress(fh, bar)
        try:
            response = client.call(
                "POST",
                _pool_path(args.name, "/examples"),
                query={"mode": args.mode},
                data=data,
                content_type=content_type,
                length=size,
                timeout=max(args.timeout, UPLOAD_MIN_TIMEOUT_S),
            )
        except Unreachable as exc:
            if isinstance(exc.reason, BrokenPipeError | ConnectionResetError):
                # Servers cut the connection when a body passes their size cap (413) before
                # they have read it all, so the status never arrives.
                raise Unreachable(
                    exc.url,
                    f"{exc.reason} while sending {path.name} ({size} bytes); "
                    "the file may exceed the server's upload size limit",
                ) from None
            raise
        except KeyboardInterrupt:
            _err("\ninterrupted during the upload: nothing was stored")
            return 130
    finally:
        if bar is not None:
            bar.close()
        fh.close()

    job = response.get("job") if isinstance(response, dict) else None
    code = _follow_job(client, job, args, what="upload", desc=f"embedding {args.name}")
    if code is not None:
        return code
    pool = client.call("GET", _pool_path(args.name))
    _out(_pool_listing(pool if isinstance(pool, dict) else {}, full=False))
    return 0


def _follow_job(
    client: Client,
    job: Any,
    args: argparse.Namespace,
    *,
    what: str,
    desc: str,
    unit: str = "row",
) -> int | None:
    """Follow a job that a 202 answer started, with a progress bar on stderr.

    Uses args.no_wait, args.wait_timeout and args.no_progress. Returns None once the job has
    succeeded (the caller prints its summary); otherwise says why on stderr and returns the
    exit code: 0 for --no-wait (the job id printed on stdout), 1 for a job that failed or was
    cancelled, a wait that timed out or a lost server, 130 for Ctrl-C.
    """
    if not isinstance(job, dict) or "id" not in job:
        raise ApiError(202, f"the server accepted the {what} but returned no job")
    job_id = job["id"]
    if args.no_wait:
        _err(f"{what} accepted: job {job_id} ({job.get('status', 'queued')})")
        _out(str(job_id))
        return 0
    try:
        final = wait_for_job(
            client,
            job,
            wait_timeout=args.wait_timeout,
            progress=not args.no_progress,
            desc=desc,
            unit=unit,
        )
    except KeyboardInterrupt:
        _err(
            f"\ninterrupted: job {job_id} keeps running on the server; "
            f"follow it with `iclserve jobs show {job_id}`"
        )
        return 130
    except (Unreachable, ApiError) as exc:
        if isinstance(exc, ApiError):
            _report_api_error(exc)
        else:
            _err(str(exc))
        _err(f"the {what} was accepted: job {job_id} may still be running on the server")
        return 1
    if final is None:
        _err(
            f"gave up waiting after {args.wait_timeout:g} s: job {job_id} keeps running on the "
            f"server; follow it with `iclserve jobs show {job_id}`"
        )
        return 1
    status = final.get("status")
    if status != "succeeded":
        detail = _error_text(final.get("error")) if final.get("error") else "no error given"
        _err(f"job {job_id} {status}: {detail}")
        return 1
    return None


def wait_for_job(
    client: Client,
    job: dict[str, Any],
    *,
    wait_timeout: float,
    progress: bool,
    desc: str,
    unit: str = "row",
) -> dict[str, Any] | None:
    """Poll a job until it ends; None when `wait_timeout` passes first."""
    from tqdm import tqdm

    job_id = job["id"]
    deadline = time.monotonic() + wait_timeout
    interval = POLL_MIN_S
    outage_since: float | None = None
    bar = tqdm(
        total=None,
        unit=unit,
        desc=desc,
        file=sys.stderr,
        dynamic_ncols=True,
        disable=not progress,
    )
    try:
        _show_job(bar, job)
        while job.get("status") not in TERMINAL_STATUSES:
            if time.monotonic() >= deadline:
                return None
            time.sleep(min(interval, max(0.0, deadline - time.monotonic())))
            interval = min(interval * 2, POLL_MAX_S)
            try:
                polled = client.call("GET", _job_path(job_id))
            except (Unreachable, ApiError) as exc:
                transient = isinstance(exc, Unreachable) or exc.status in {502, 503, 504}
                now = time.monotonic()
                outage_since = outage_since if outage_since is not None else now
                if not transient or now - outage_since > POLL_OUTAGE_S:
                    raise
                bar.set_postfix_str("server unavailable, retrying")
                continue
            outage_since = None
            if isinstance(polled, dict):
                # Accept the job bare or wrapped as {"job": {...}} like the upload answer.
                job = polled["job"] if isinstance(polled.get("job"), dict) else polled
            _show_job(bar, job)
        return job
    finally:
        bar.close()


def _show_job(bar: Any, job: dict[str, Any]) -> None:
    total = job.get("total") or 0
    done = job.get("done") or 0
    # The total is 0 until the server has counted the rows; keep the bar open-ended till then.
    if total and bar.total != total:
        bar.total = total
    if done >= bar.n:
        # update() rather than assigning n keeps tqdm's rate and ETA estimates working.
        bar.update(done - bar.n)
    else:
        bar.n = done  # a restarted job may report less than before
    postfix = str(job.get("status", ""))
    result = job.get("result")
    best = result.get("best_score") if isinstance(result, dict) else None
    if isinstance(best, int | float) and not isinstance(best, bool):
        postfix += f", best {best:.3f}"  # preset jobs report the best score so far
    bar.set_postfix_str(postfix)


def cmd_pools_list(args: argparse.Namespace) -> int:
    """Print a table of pools."""
    response = _client(args).call("GET", "/v1/pools")
    if args.json:
        _dump_json(response)
        return 0
    pools = _items(response, "pools")
    if not pools:
        _err("no pools")
        return 0
    headers = ("name", "version", "size", "labeled", "status")
    _out(_table(headers, [[p.get(h) for h in headers] for p in pools]))
    return 0


def cmd_pools_show(args: argparse.Namespace) -> int:
    """Print one pool's summary."""
    pool = _client(args).call("GET", _pool_path(args.name))
    if args.json or not isinstance(pool, dict):
        _dump_json(pool)
    else:
        _out(_pool_listing(pool, full=True))
    return 0


def cmd_pools_delete(args: argparse.Namespace) -> int:
    """Delete a pool and its files, after a confirmation unless --yes."""
    client = _client(args)
    if not _confirmed(args, f"delete pool {args.name!r} and all its files?"):
        return 1
    client.call("DELETE", _pool_path(args.name))
    _out(f"deleted pool {args.name}")
    return 0


def _confirmed(args: argparse.Namespace, question: str) -> bool:
    """True with --yes or when the user says yes; refuses (exit 2) when no one can be asked."""
    if args.yes:
        return True
    if not sys.stdin.isatty():
        raise CliError("refusing to delete without confirmation: pass --yes")
    answer = input(f"{question} [y/N] ")
    if answer.strip().lower() in {"y", "yes"}:
        return True
    _err("not deleted")
    return False


ANNOTATION_KEYS = ("id", "output", "label")


def _read_annotations(path: str) -> tuple[list[dict[str, Any]], list[int], int]:
    """The PATCH items of a JSONL file, the file line of each, and how many rows were skipped.

    Only id, output and label are kept. A null output or label is left out rather than sent:
    an exported row that the annotator did not fill in has both null, and sending "label": null
    would clear the label that the server derives from the output on classification pools.
    A row with neither is skipped.
    """
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise CliError(f"{path} is not UTF-8 text") from None
    items: list[dict[str, Any]] = []
    line_numbers: list[int] = []
    skipped = 0
    # Split on newlines only: str.splitlines() would also split inside a string holding U+2028,
    # which the export writes as is (ensure_ascii=False).
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise CliError(f"{path} line {number}: not valid JSON") from None
        if not isinstance(row, dict):
            raise CliError(f"{path} line {number}: expected a JSON object")
        ref = row.get("id")
        if isinstance(ref, bool) or not isinstance(ref, int | str):
            raise CliError(f"{path} line {number}: 'id' must be the example's id")
        item = {k: row[k] for k in ANNOTATION_KEYS if row.get(k) is not None}
        if len(item) == 1:
            skipped += 1
            continue
        items.append(item)
        line_numbers.append(number)
    return items, line_numbers, skipped


def cmd_pools_annotate(args: argparse.Namespace) -> int:
    """Send the outputs (and labels) of a JSONL file as one annotation request."""
    client = _client(args)
    items, line_numbers, skipped = _read_annotations(args.file)
    if skipped:
        _err(f"skipped {skipped} row{'s' if skipped != 1 else ''} with no output or label")
    if not items:
        raise CliError(f"nothing to annotate in {args.file}")
    try:
        response = client.call(
            "PATCH",
            _pool_path(args.name, "/examples"),
            body={"examples": items},
            timeout=max(args.timeout, UPLOAD_MIN_TIMEOUT_S),
        )
    except ApiError as exc:
        # The server numbers the items of the request; say which line of the file each was.
        for row in exc.rows:
            line = row.get("line") if isinstance(row, dict) else None
            if isinstance(line, int) and 1 <= line <= len(line_numbers):
                row["line"] = line_numbers[line - 1]
        raise
    result = response if isinstance(response, dict) else {}
    updated = result.get("updated", len(items))
    _out(
        f"annotated {updated} example{'s' if updated != 1 else ''} of pool "
        f"{result.get('pool', args.name)}: version {_cell(result.get('version'))}"
    )
    return 0


def cmd_jobs_show(args: argparse.Namespace) -> int:
    """Print one job."""
    job = _client(args).call("GET", _job_path(args.id))
    if isinstance(job, dict) and isinstance(job.get("job"), dict):
        job = job["job"]
    if args.json or not isinstance(job, dict):
        _dump_json(job)
    else:
        _out(_job_listing(job))
    return 0


def cmd_jobs_list(args: argparse.Namespace) -> int:
    """Print a table of jobs, optionally of one pool."""
    query = {"pool": args.pool} if args.pool else None
    response = _client(args).call("GET", "/v1/jobs", query=query)
    if args.json:
        _dump_json(response)
        return 0
    jobs = _items(response, "jobs")
    if not jobs:
        _err("no jobs")
        return 0
    rows = [
        [
            j.get("id"),
            j.get("kind"),
            j.get("pool"),
            j.get("status"),
            _progress_text(j),
            j.get("created_at"),
        ]
        for j in jobs
    ]
    _out(_table(("id", "kind", "pool", "status", "progress", "created_at"), rows))
    return 0


def _subset_path(pool: str, name: str | None = None) -> str:
    suffix = "/subsets" if name is None else f"/subsets/{urllib.parse.quote(name, safe='')}"
    return _pool_path(pool, suffix)


def _param(text: str) -> tuple[str, Any]:
    """--param KEY=VALUE: the value as JSON when it parses (3, 0.5, true, "x"), else a string."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")

    def no_constants(name: str) -> Any:
        raise ValueError(name)  # NaN and Infinity are not JSON the server would accept

    try:
        return key.strip(), json.loads(value, parse_constant=no_constants)
    except ValueError:
        return key.strip(), value


def _seconds(subset: dict[str, Any]) -> str:
    timing = subset.get("timing")
    seconds = timing.get("seconds") if isinstance(timing, dict) else None
    return f"{seconds:.1f}" if isinstance(seconds, int | float) else "-"


def _yes_no(value: Any) -> str:
    return "-" if value is None else ("yes" if value else "no")


SUBSET_SUMMARY_KEYS = ("name", "method", "size", "status", "seconds", "stale")


def _subset_listing(subset: dict[str, Any], *, full: bool, ids_shown: int = 20) -> str:
    keys: list[str] = ["pool", *SUBSET_SUMMARY_KEYS]
    if full:
        keys = ["pool", "name", "method", "budget", "params", "seed", "status", "job"]
        keys += ["pool_version", "size", "stale", "seconds", "info", "error"]
        keys += [k for k in subset if k not in {*keys, "timing", "ids", "examples"}]
    pairs: list[tuple[str, Any]] = []
    for key in keys:
        if key == "seconds":
            pairs.append((key, _seconds(subset)))
        elif key == "stale":
            pairs.append((key, _yes_no(subset.get(key))))
        else:
            pairs.append((key, _cell(subset.get(key))))
    ids = subset.get("ids")
    if full and isinstance(ids, list):
        shown = ", ".join(str(i) for i in ids[:ids_shown]) or "-"
        more = len(ids) - ids_shown
        pairs.append(("ids", shown + (f", ... ({more} more)" if more > 0 else "")))
    return _listing(pairs)


def _submit_and_follow(
    args: argparse.Namespace,
    *,
    what: str,
    name: str,
    body: dict[str, Any],
    path: Callable[..., str],
    listing: Callable[..., str],
    unit: str = "row",
) -> int:
    """POST a subset or preset job, follow it with a progress bar, print the result's summary."""
    client = _client(args)
    response = client.call("POST", path(args.name), body=body)
    job = response.get("job") if isinstance(response, dict) else None
    desc = f"{args.method} {args.name}/{name}"
    code = _follow_job(client, job, args, what=what, desc=desc, unit=unit)
    if code is not None:
        return code
    result = client.call("GET", path(args.name, name))
    _out(listing(result if isinstance(result, dict) else {}, full=False))
    return 0


def _params(pairs: list[tuple[str, Any]] | None) -> dict[str, Any]:
    """`--param KEY=VALUE` pairs as a dict; a key given twice is an error."""
    params: dict[str, Any] = {}
    for key, value in pairs or []:
        if key in params:
            raise CliError(f"--param {key} is given twice")
        params[key] = value
    return params


def cmd_subsets_create(args: argparse.Namespace) -> int:
    """Start a subset job, follow it, and print the subset's summary."""
    params = _params(args.param)
    body: dict[str, Any] = {"name": args.subset, "method": args.method, "budget": args.budget}
    if params:
        body["params"] = params
    if args.seed is not None:
        body["seed"] = args.seed
    return _submit_and_follow(
        args, what="subset", name=args.subset, body=body, path=_subset_path,
        listing=_subset_listing,
    )  # fmt: skip


def cmd_subsets_list(args: argparse.Namespace) -> int:
    """Print a table of a pool's subsets."""
    response = _client(args).call("GET", _subset_path(args.name))
    if args.json:
        _dump_json(response)
        return 0
    subsets = _items(response, "subsets")
    if not subsets:
        _err(f"no subsets in pool {args.name}")
        return 0
    headers = ("name", "method", "budget", "size", "status", "stale", "pool_version", "seconds")
    rows = [
        [
            s.get("name"),
            s.get("method"),
            s.get("budget"),
            s.get("size"),
            s.get("status"),
            _yes_no(s.get("stale")),
            s.get("pool_version"),
            _seconds(s),
        ]
        for s in subsets
    ]
    _out(_table(headers, rows))
    return 0


def cmd_subsets_show(args: argparse.Namespace) -> int:
    """Print one subset: its summary and first ids."""
    return _show_named(args, args.subset, _subset_path, _subset_listing)


def cmd_subsets_delete(args: argparse.Namespace) -> int:
    """Delete a subset (its job is cancelled if still computing)."""
    return _delete_named(args, "subset", args.subset, _subset_path)


def _show_named(
    args: argparse.Namespace, name: str, path: Callable[..., str], listing: Callable[..., str]
) -> int:
    """Print one subset or preset of the pool `args.name` (JSON with --json)."""
    found = _client(args).call("GET", path(args.name, name))
    if args.json or not isinstance(found, dict):
        _dump_json(found)
    else:
        _out(listing(found, full=True))
    return 0


def _delete_named(args: argparse.Namespace, what: str, name: str, path: Callable[..., str]) -> int:
    """Delete one subset or preset of the pool `args.name`, after confirmation."""
    client = _client(args)
    if not _confirmed(args, f"delete {what} {name!r} of pool {args.name!r}?"):
        return 1
    client.call("DELETE", path(args.name, name))
    _out(f"deleted {what} {name} of pool {args.name}")
    return 0


EXPORT_KEYS = ("id", "external_id", "input", "output", "label", "metadata")
# Line breaks to Python's str.splitlines() that json.dumps(ensure_ascii=False) leaves raw.
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def _jsonl_line(row: dict[str, Any]) -> str:
    """One JSONL line, readable text (UTF-8), that no line-splitting reader cuts in two."""
    return json.dumps(row, ensure_ascii=False).translate(_LINE_BREAKS) + "\n"


def cmd_subsets_export(args: argparse.Namespace) -> int:
    """Write a subset's members as JSONL rows in subset order, for annotation."""
    client = _client(args)
    query = {"unlabeled": "true"} if args.unlabeled else {"rows": "true"}
    subset = client.call("GET", _subset_path(args.name, args.subset), query=query)
    if not isinstance(subset, dict):
        raise ApiError(200, "the server sent no subset")
    status = subset.get("status")
    if status != "ready":
        if status == "computing":
            detail = f" by job {subset.get('job')}; wait for it" if subset.get("job") else ""
        else:
            error = subset.get("error")
            detail = f": {_error_text(error)}" if error else ""
        _err(f"subset {args.subset} is {status}{detail}; nothing to export")
        return 1
    if subset.get("stale"):
        _err(
            f"warning: subset {args.subset} is stale: the pool's examples changed since it was "
            "computed"
        )
    rows = [r for r in subset.get("examples") or [] if isinstance(r, dict)]
    text = "".join(_jsonl_line({k: r.get(k) for k in EXPORT_KEYS}) for r in rows)
    if args.output:
        try:
            Path(args.output).write_text(text, encoding="utf-8")
        except OSError as exc:
            raise CliError(f"cannot write {args.output}: {exc.strerror or exc}") from None
    else:
        sys.stdout.write(text)
        sys.stdout.flush()
    ids = subset.get("ids")
    members = len(ids) if isinstance(ids, list) else subset.get("size")
    what = "unlabeled members" if args.unlabeled else "members"
    where = f" to {args.output}" if args.output else ""
    summary = f"exported {len(rows)} {what} of subset {args.subset} ({members} in all){where}"
    if not args.unlabeled and isinstance(members, int) and len(rows) < members:
        summary += f"; {members - len(rows)} are no longer in the pool"
    _err(summary)
    return 0


def _preset_path(pool: str, name: str | None = None) -> str:
    suffix = "/presets" if name is None else f"/presets/{urllib.parse.quote(name, safe='')}"
    return _pool_path(pool, suffix)


def _read_validation(path: str) -> list[dict[str, Any]]:
    """Validation examples {input, output[, label]} from a JSONL file.

    Other keys (an exported row's id or metadata) are dropped, so a file written by
    `subsets export` and annotated can be used as it is.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise CliError(f"{path} is not UTF-8 text") from None
    examples: list[dict[str, Any]] = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise CliError(f"{path} line {number}: not valid JSON") from None
        if not isinstance(row, dict):
            raise CliError(f"{path} line {number}: expected a JSON object")
        for key in ("input", "output"):
            if not isinstance(row.get(key), str) or not row[key]:
                raise CliError(f"{path} line {number}: '{key}' must be a non-empty string")
        examples.append({k: row[k] for k in VALIDATION_KEYS if row.get(k) is not None})
    if not examples:
        raise CliError(f"no validation examples in {path}")
    return examples


def _score(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, int | float) else "-"


def _preset_listing(preset: dict[str, Any], *, full: bool) -> str:
    keys = ["pool", "name", "method", "k", "status", "score", "stale", "calls", "seconds"]
    if full:
        keys = ["pool", "name", "method", "k", "model", "status", "job", "score"]
        keys += ["instruction", "calls", "prompt_tokens", "completion_tokens", "pool_version"]
        keys += ["stale", "seconds", "validation", "budget", "params", "seed", "error"]
    pairs: list[tuple[str, Any]] = []
    for key in keys:
        if key == "seconds":
            pairs.append((key, _seconds(preset)))
        elif key == "stale":
            pairs.append((key, _yes_no(preset.get(key))))
        elif key == "score":
            pairs.append((key, _score(preset.get(key))))
        else:
            pairs.append((key, _cell(preset.get(key))))
    ids = preset.get("ids")
    if full and isinstance(ids, list):
        pairs.append(("ids", ", ".join(str(i) for i in ids) or "-"))
    return _listing(pairs)


def cmd_presets_create(args: argparse.Namespace) -> int:
    """Start a preset search, follow it (best score so far in the bar), print its summary."""
    params = _params(args.param)
    if args.validation_file is not None:
        if args.validation_limit is not None:
            raise CliError("--validation-limit goes with --validation-pool, not a file")
        validation: dict[str, Any] = {"examples": _read_validation(args.validation_file)}
    else:
        validation = {"pool": args.validation_pool or args.name}
        if args.validation_limit is not None:
            validation["limit"] = args.validation_limit
    body: dict[str, Any] = {
        "name": args.preset,
        "method": args.method,
        "model": args.model,
        "validation": validation,
    }
    optional = {
        "k": args.k,
        "budget": args.budget,
        "instructions": args.instruction,
        "seed": args.seed,
        "concurrency": args.concurrency,
        "subset": args.subset,
        "bank_size": args.bank_size,
        "max_tokens": args.max_tokens,
    }
    body.update({key: value for key, value in optional.items() if value is not None})
    if params:
        body["params"] = params
    return _submit_and_follow(
        args, what="preset", name=args.preset, body=body, path=_preset_path,
        listing=_preset_listing, unit="eval",
    )  # fmt: skip


def cmd_presets_list(args: argparse.Namespace) -> int:
    """Print a table of a pool's presets."""
    response = _client(args).call("GET", _preset_path(args.name))
    if args.json:
        _dump_json(response)
        return 0
    presets = _items(response, "presets")
    if not presets:
        _err(f"no presets in pool {args.name}")
        return 0
    headers = (
        "name", "method", "k", "status", "score", "stale", "pool_version", "calls", "seconds",
    )  # fmt: skip
    rows = [
        [
            p.get("name"),
            p.get("method"),
            p.get("k"),
            p.get("status"),
            _score(p.get("score")),
            _yes_no(p.get("stale")),
            p.get("pool_version"),
            p.get("calls"),
            _seconds(p),
        ]
        for p in presets
    ]
    _out(_table(headers, rows))
    return 0


def cmd_presets_show(args: argparse.Namespace) -> int:
    """Print one preset: summary, ids in prompt order, instruction, score, calls and tokens."""
    return _show_named(args, args.preset, _preset_path, _preset_listing)


def cmd_presets_delete(args: argparse.Namespace) -> int:
    """Delete a preset (its job is cancelled if still computing)."""
    return _delete_named(args, "preset", args.preset, _preset_path)


def cmd_select(args: argparse.Namespace) -> int:
    """Select demonstrations for a query and print them in prompt order."""
    body: dict[str, Any] = {"query": args.query}
    if args.k is not None:
        body["k"] = args.k
    selector: dict[str, Any] = {}
    if args.method is not None:
        selector["method"] = args.method
    if args.mmr_lambda is not None:
        selector["lambda"] = args.mmr_lambda
    if args.fetch_k is not None:
        selector["fetch_k"] = args.fetch_k
    if selector:
        # --lambda and --fetch-k belong to mmr alone, so they imply it.
        selector.setdefault("method", "mmr")
        body["selector"] = selector
    if args.order is not None:
        body["order"] = args.order
    if args.seed is not None:
        body["seed"] = args.seed
    if args.subset is not None:
        body["subset"] = args.subset
    response = _client(args).call("POST", _pool_path(args.name, "/select"), body=body)
    if args.json or not isinstance(response, dict):
        _dump_json(response)
        return 0
    demos = [d for d in response.get("demonstrations") or [] if isinstance(d, dict)]
    timing = response.get("timing_ms") or {}
    total_ms = timing.get("total") if isinstance(timing, dict) else None
    header = f"pool {response.get('pool', args.name)} version {_cell(response.get('version'))}"
    header += f", {len(demos)} demonstration{'s' if len(demos) != 1 else ''}"
    if isinstance(total_ms, int | float):
        header += f", {total_ms:.1f} ms"
    _out(header)
    if not demos:
        return 0
    with_external = any(d.get("external_id") is not None for d in demos)
    headers = ["#", "id", *(["external_id"] if with_external else []), "score", "label", "input"]
    rows = []
    for position, demo in enumerate(demos, start=1):
        score = demo.get("score")
        rows.append(
            [
                position,
                demo.get("id"),
                *([demo.get("external_id")] if with_external else []),
                f"{score:.3f}" if isinstance(score, int | float) else "-",
                demo.get("label"),
                _one_line(demo.get("input")),
            ]
        )
    _out(_table(headers, rows))
    return 0


# ----------------------------------------------------------------------------- parser


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0: {text!r}")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1: {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0: {text!r}")
    return value


def cmd_eval(args: argparse.Namespace) -> int:
    """Run the quality protocol (app/evaluation)."""
    from app.evaluation.command import run

    return run(args, ["iclserve", *sys.argv[1:]])


def _add_connection_options(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    # Accepted before the command (`iclserve --url U pools list`) and after it
    # (`iclserve pools list --url U`). After it, an absent option must not reset the value
    # given before it, hence SUPPRESS there.
    keep: dict[str, Any] = {} if defaults else {"default": argparse.SUPPRESS}
    # The key and URL defaults are resolved after parsing, so --help never shows the key.
    parser.add_argument(
        "--url", help=f"server base URL (default: $ICLSERVE_URL or {DEFAULT_URL})", **keep
    )
    parser.add_argument(
        "--key",
        help="API key, sent as 'Authorization: Bearer' (default: $ICLSERVE_API_KEY)",
        **keep,
    )
    parser.add_argument(
        "--timeout",
        type=_positive_float,
        help="seconds to wait for each response (default: 30)",
        **({"default": 30.0} if defaults else keep),
    )


def _add_command(
    group: Any,
    name: str,
    func: Callable[[argparse.Namespace], int],
    help_text: str,
    *,
    client: bool = True,
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = group.add_parser(name, help=help_text, description=help_text)
    if client:
        _add_connection_options(parser, defaults=False)
    parser.set_defaults(func=func)
    return parser


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for `iclserve` (exposed for docs and tests)."""
    parser = argparse.ArgumentParser(
        prog="iclserve",
        description="Demonstration selection for black-box LLMs: run the server, or manage "
        "pools and select demonstrations on a running one.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    _add_connection_options(parser, defaults=True)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = _add_command(
        commands,
        "serve",
        cmd_serve,
        "run the server (settings from ICLSERVE_* variables and .env)",
        client=False,
    )
    serve.add_argument("--host", help="bind address (ICLSERVE_HOST)")
    serve.add_argument("--port", type=int, help="port (ICLSERVE_PORT)")
    serve.add_argument("--data-dir", help="data directory (ICLSERVE_DATA_DIR)")

    evaluate = _add_command(
        commands,
        "eval",
        cmd_eval,
        "measure the accuracy each selector buys on a labeled dataset, through this "
        "service's /v1/chat/completions (see benchmarks/QUALITY.md)",
        client=False,
    )
    from app.evaluation.command import add_arguments as add_eval_arguments

    add_eval_arguments(evaluate)

    pools_parser = commands.add_parser("pools", help="manage example pools")
    pools = pools_parser.add_subparsers(dest="pools_command", metavar="COMMAND", required=True)
    upload = _add_command(
        pools,
        "upload",
        cmd_pools_upload,
        "upload examples (JSONL, CSV or JSON) and wait for them to be embedded",
    )
    upload.add_argument("name", metavar="NAME", help="pool name (created if missing)")
    upload.add_argument("file", metavar="FILE", help="examples file")
    upload.add_argument(
        "--mode",
        choices=("append", "replace"),
        default="append",
        help="add to the pool or replace its examples (default: append)",
    )
    upload.add_argument(
        "--format", choices=tuple(CONTENT_TYPES), help="file format (default: from the extension)"
    )
    upload.add_argument(
        "--no-wait",
        action="store_true",
        help="print the job id and return once the upload is accepted",
    )
    upload.add_argument(
        "--wait-timeout",
        type=_positive_float,
        default=3600.0,
        help="seconds to follow the job before giving up (default: 3600)",
    )
    upload.add_argument("--no-progress", action="store_true", help="no progress bars")

    _add_command(pools, "list", cmd_pools_list, "list pools").add_argument(
        "--json", action="store_true", help="print the raw JSON"
    )
    show = _add_command(pools, "show", cmd_pools_show, "show one pool")
    show.add_argument("name", metavar="NAME")
    show.add_argument("--json", action="store_true", help="print the raw JSON")
    delete = _add_command(pools, "delete", cmd_pools_delete, "delete a pool and its files")
    delete.add_argument("name", metavar="NAME")
    delete.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    annotate = _add_command(
        pools,
        "annotate",
        cmd_pools_annotate,
        "set outputs (and labels) from a JSONL file of {id, output[, label]} rows, such as "
        "a filled-in `subsets export`",
    )
    annotate.add_argument("name", metavar="NAME", help="pool name")
    annotate.add_argument("file", metavar="FILE", help="JSONL file, or - for stdin")

    subsets_parser = commands.add_parser(
        "subsets", help="compute and export pool-level subsets (vote-k, IDEAL, ...)"
    )
    subsets = subsets_parser.add_subparsers(
        dest="subsets_command", metavar="COMMAND", required=True
    )
    create = _add_command(
        subsets,
        "create",
        cmd_subsets_create,
        "compute a named subset of a pool and wait for it (resubmitting a name replaces it)",
    )
    create.add_argument("name", metavar="POOL", help="pool name")
    create.add_argument("subset", metavar="NAME", help="subset name")
    create.add_argument("--method", required=True, choices=SUBSET_METHODS, help="algorithm")
    create.add_argument(
        "--budget", required=True, type=positive_int, help="how many examples to choose"
    )
    create.add_argument(
        "--param",
        action="append",
        type=_param,
        metavar="KEY=VALUE",
        help="a method parameter, repeatable; VALUE is read as JSON when it parses "
        "(3, 0.5, true, '\"text\"'), else as a string",
    )
    create.add_argument("--seed", type=_non_negative_int, help="seed (default: the server's, 0)")
    create.add_argument(
        "--no-wait",
        action="store_true",
        help="print the job id and return once the job is accepted",
    )
    create.add_argument(
        "--wait-timeout",
        type=_positive_float,
        default=3600.0,
        help="seconds to follow the job before giving up (default: 3600)",
    )
    create.add_argument("--no-progress", action="store_true", help="no progress bar")
    subset_list = _add_command(subsets, "list", cmd_subsets_list, "list a pool's subsets")
    subset_list.add_argument("name", metavar="POOL", help="pool name")
    subset_list.add_argument("--json", action="store_true", help="print the raw JSON")
    subset_show = _add_command(subsets, "show", cmd_subsets_show, "show one subset")
    subset_show.add_argument("name", metavar="POOL", help="pool name")
    subset_show.add_argument("subset", metavar="NAME", help="subset name")
    subset_show.add_argument("--json", action="store_true", help="print the raw JSON (all ids)")
    subset_delete = _add_command(subsets, "delete", cmd_subsets_delete, "delete a subset")
    subset_delete.add_argument("name", metavar="POOL", help="pool name")
    subset_delete.add_argument("subset", metavar="NAME", help="subset name")
    subset_delete.add_argument(
        "--yes", "-y", action="store_true", help="do not ask for confirmation"
    )
    export = _add_command(
        subsets,
        "export",
        cmd_subsets_export,
        "write a subset's members as JSONL rows in subset order, to annotate and send back "
        "with `pools annotate`",
    )
    export.add_argument("name", metavar="POOL", help="pool name")
    export.add_argument("subset", metavar="NAME", help="subset name")
    export.add_argument(
        "--unlabeled", action="store_true", help="only the members that have no output yet"
    )
    export.add_argument("--output", "-o", metavar="FILE", help="write here (default: stdout)")

    presets_parser = commands.add_parser(
        "presets", help="search optimized ordered demonstration sets with the LLM (EASE)"
    )
    presets = presets_parser.add_subparsers(
        dest="presets_command", metavar="COMMAND", required=True
    )
    pcreate = _add_command(
        presets,
        "create",
        cmd_presets_create,
        "search a named preset of a pool with the upstream LLM and wait for it "
        "(resubmitting a name replaces it)",
    )
    pcreate.add_argument("name", metavar="POOL", help="pool name")
    pcreate.add_argument("preset", metavar="NAME", help="preset name")
    pcreate.add_argument(
        "--method", choices=PRESET_METHODS, default="ease", help="search (default: ease)"
    )
    pcreate.add_argument("--model", required=True, help="upstream model that answers")
    pcreate.add_argument("--k", type=positive_int, help="demonstrations (default: 5)")
    where = pcreate.add_mutually_exclusive_group()
    where.add_argument(
        "--validation-pool",
        metavar="P",
        help="draw labeled validation rows from this pool (default: POOL itself, whose "
        "validation rows are then kept out of the candidates)",
    )
    where.add_argument(
        "--validation-file",
        metavar="F",
        help="JSONL validation examples {input, output[, label]}",
    )
    pcreate.add_argument(
        "--validation-limit",
        type=positive_int,
        metavar="N",
        help="validation rows to draw from the pool (default: 20)",
    )
    pcreate.add_argument(
        "--budget",
        type=positive_int,
        help="most validation LLM calls (default: 165 evaluations of the validation set)",
    )
    pcreate.add_argument(
        "--instruction",
        action="append",
        metavar="TEXT",
        help="a candidate instruction (system message), repeatable; the search picks one",
    )
    pcreate.add_argument(
        "--param",
        action="append",
        type=_param,
        metavar="KEY=VALUE",
        help="an EASE parameter, repeatable; VALUE is read as JSON when it parses",
    )
    pcreate.add_argument("--seed", type=_non_negative_int, help="seed (default: 0)")
    pcreate.add_argument(
        "--concurrency", type=positive_int, help="LLM calls in flight (default: 4)"
    )
    pcreate.add_argument("--subset", help="take the candidates from this subset")
    pcreate.add_argument(
        "--bank-size", type=positive_int, help="most candidate examples (default: 100)"
    )
    pcreate.add_argument(
        "--max-tokens", type=positive_int, help="max_tokens of each answer (default: 64)"
    )
    pcreate.add_argument(
        "--no-wait",
        action="store_true",
        help="print the job id and return once the job is accepted",
    )
    pcreate.add_argument(
        "--wait-timeout",
        type=_positive_float,
        default=3600.0,
        help="seconds to follow the job before giving up (default: 3600)",
    )
    pcreate.add_argument("--no-progress", action="store_true", help="no progress bar")
    preset_list = _add_command(presets, "list", cmd_presets_list, "list a pool's presets")
    preset_list.add_argument("name", metavar="POOL", help="pool name")
    preset_list.add_argument("--json", action="store_true", help="print the raw JSON")
    preset_show = _add_command(presets, "show", cmd_presets_show, "show one preset")
    preset_show.add_argument("name", metavar="POOL", help="pool name")
    preset_show.add_argument("preset", metavar="NAME", help="preset name")
    preset_show.add_argument("--json", action="store_true", help="print the raw JSON")
    preset_delete = _add_command(presets, "delete", cmd_presets_delete, "delete a preset")
    preset_delete.add_argument("name", metavar="POOL", help="pool name")
    preset_delete.add_argument("preset", metavar="NAME", help="preset name")
    preset_delete.add_argument(
        "--yes", "-y", action="store_true", help="do not ask for confirmation"
    )

    jobs_parser = commands.add_parser("jobs", help="inspect background jobs")
    jobs = jobs_parser.add_subparsers(dest="jobs_command", metavar="COMMAND", required=True)
    job_show = _add_command(jobs, "show", cmd_jobs_show, "show one job")
    job_show.add_argument("id", metavar="ID")
    job_show.add_argument("--json", action="store_true", help="print the raw JSON")
    job_list = _add_command(jobs, "list", cmd_jobs_list, "list jobs")
    job_list.add_argument("--pool", help="only this pool's jobs")
    job_list.add_argument("--json", action="store_true", help="print the raw JSON")

    select = _add_command(
        commands,
        "select",
        cmd_select,
        "select demonstrations for a query (printed in prompt order)",
    )
    select.add_argument("name", metavar="NAME", help="pool name")
    select.add_argument("query", metavar="QUERY", help="the query text")
    select.add_argument("-k", type=positive_int, help="number of demonstrations")
    select.add_argument(
        "--method",
        choices=("knn", "mmr", "balanced", "random"),
        help="selector (default: the pool's)",
    )
    select.add_argument(
        "--lambda", dest="mmr_lambda", type=float, help="mmr: relevance/diversity trade-off"
    )
    select.add_argument("--fetch-k", type=positive_int, help="mmr: candidates to rerank")
    select.add_argument(
        "--order",
        choices=("nearest_last", "nearest_first", "random", "as_selected"),
        help="prompt order (default: the pool's, else nearest_last)",
    )
    select.add_argument("--seed", type=int, help="seed for random selection or order")
    select.add_argument("--subset", help="restrict candidates to this named subset")
    select.add_argument("--json", action="store_true", help="print the raw JSON response")
    return parser


def _report_api_error(exc: ApiError) -> None:
    _err(f"error ({exc.status}): {exc.message}")
    for row in exc.rows:
        if isinstance(row, dict):
            _err(f"  line {row.get('line', '?')}: {row.get('reason', '')}")
        else:
            _err(f"  {row}")
    if exc.bad_rows is not None and exc.bad_rows > len(exc.rows):
        _err(f"  ... {exc.bad_rows} bad rows in all, the first {len(exc.rows)} shown")
    if exc.status == 401:
        _err("hint: pass --key or set ICLSERVE_API_KEY")
    elif exc.status == 429 and exc.retry_after:
        _err(f"retry after {exc.retry_after} s")


def _exit_quietly_on_broken_pipe() -> NoReturn:
    # `iclserve pools list | head`: stop without a traceback, and keep Python from failing
    # again when it flushes stdout at exit.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    sys.exit(141)


def main(argv: list[str] | None = None) -> int:
    """Run the `iclserve` command line; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        _out(f"iclserve {_version()}")
        return 0
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return func(args)
    except CliError as exc:
        _err(f"error: {exc}")
        return 2
    except ApiError as exc:
        _report_api_error(exc)
        return 1
    except Unreachable as exc:
        _err(str(exc))
        return 1
    except KeyboardInterrupt:
        _err("\ninterrupted")
        return 130
    except BrokenPipeError:
        _exit_quietly_on_broken_pipe()


if __name__ == "__main__":
    sys.exit(main())
