"""Pools and their examples: admin writes, client reads."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import anyio
from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import UploadFile

from app.deps import AdminAuth, ClientAuth, ServicesDep
from app.errors import InvalidRequest, NotFound, PayloadTooLarge
from app.http import error_responses, json_body, model_schema
from app.ingest import detect_format, parse_upload
from app.pipeline import POOL_NAME_PATTERN, SelectRequest
from app.store import PoolSettingsUpdate, parse_annotations

router = APIRouter(prefix="/v1", tags=["pools"])

PoolName = Annotated[str, Path(pattern=POOL_NAME_PATTERN, description="Pool name.")]


# The upload and annotation bodies are parsed by hand (app/ingest.py, parse_annotations), so
# these models only document them in the OpenAPI schema.


class UploadExample(BaseModel):
    """One example of an upload (API.md, Examples)."""

    model_config = ConfigDict(extra="forbid")

    input: str = Field(min_length=1, description="The text that is embedded and shown.")
    output: str | None = Field(None, description="The answer; null = unlabeled.")
    label: str | None = Field(None, description="Class name (classification pools).")
    id: str | int | None = Field(None, description="Your own id, unique within the pool.")
    metadata: dict[str, Any] | None = Field(None, description="Kept and returned as is.")


class UploadBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    examples: list[UploadExample]


class AnnotationItem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: int | str = Field(description="The server's integer id or your string id.")
    output: str | None = None
    label: str | None = None


class AnnotationBody(BaseModel):
    """Set outputs and/or labels of existing examples."""

    model_config = ConfigDict(extra="forbid")

    examples: list[AnnotationItem] = Field(min_length=1)


_EXAMPLES_ARRAY = {"type": "array", "items": model_schema(UploadExample)}
_UPLOAD_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "JSONL (one example object per line), CSV with a header row (columns "
        "other than input, output, label, id and metadata go into metadata), a JSON array "
        'or {"examples": [...]}, or a multipart file named *.jsonl, *.csv or *.json.',
        "content": {
            "application/x-ndjson": {"schema": _EXAMPLES_ARRAY},
            "text/csv": {"schema": {"type": "string"}},
            "application/json": {"schema": {"anyOf": [_EXAMPLES_ARRAY, model_schema(UploadBatch)]}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "string", "format": "binary"}},
                    "required": ["file"],
                }
            },
        },
    }
}


@router.put("/pools/{pool}", dependencies=[AdminAuth], responses=error_responses(409))
async def put_pool(pool: PoolName, body: PoolSettingsUpdate, services: ServicesDep) -> Any:
    """Create a pool or update its settings."""
    return await anyio.to_thread.run_sync(services.store.put_pool, pool, body)


@router.get("/pools", dependencies=[ClientAuth])
async def list_pools(services: ServicesDep) -> Any:
    """List pools."""
    return {"object": "list", "data": await anyio.to_thread.run_sync(services.store.list_pools)}


@router.get("/pools/{pool}", dependencies=[ClientAuth], responses=error_responses(404))
async def get_pool(pool: PoolName, services: ServicesDep) -> Any:
    """Describe a pool: version, size, labels, embedder, status."""
    return await anyio.to_thread.run_sync(services.store.pool_info, pool)


@router.delete("/pools/{pool}", dependencies=[AdminAuth], responses=error_responses(404))
async def delete_pool(pool: PoolName, services: ServicesDep) -> Any:
    """Delete a pool and its files."""
    await anyio.to_thread.run_sync(services.store.delete_pool, pool)
    return {"name": pool, "deleted": True}


async def _read_upload(
    request: Request, max_bytes: int
) -> tuple[bytes | bytearray, str | None, str | None]:
    content_type = request.headers.get("content-type")
    if content_type and content_type.split(";")[0].strip().lower() == "multipart/form-data":
        form = await request.form(max_files=1, max_fields=16, max_part_size=max_bytes)
        files = [v for v in form.values() if isinstance(v, UploadFile)]
        if not files:
            raise InvalidRequest("multipart upload has no file part", param="file")
        upload = files[0]
        data = await upload.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise PayloadTooLarge(f"file is larger than the limit of {max_bytes} bytes")
        return data, upload.content_type, upload.filename
    # One growing buffer: a list of chunks joined at the end would hold the body twice.
    body = bytearray()
    async for chunk in request.stream():
        if len(body) + len(chunk) > max_bytes:
            raise PayloadTooLarge(f"request body is larger than the limit of {max_bytes} bytes")
        body += chunk
    return body, content_type, None


@router.post(
    "/pools/{pool}/examples",
    status_code=202,
    dependencies=[AdminAuth],
    responses=error_responses(409, 422, 507),
    openapi_extra=_UPLOAD_BODY,
)
async def upload_examples(
    pool: PoolName,
    request: Request,
    services: ServicesDep,
    mode: Annotated[Literal["append", "replace"], Query()] = "append",
) -> Any:
    """Upload examples (JSONL, CSV, JSON or a multipart file) as a job that publishes them."""
    limits = services.settings.limits
    data, content_type, filename = await _read_upload(request, limits.max_body_bytes)
    fmt = detect_format(content_type, filename)
    store = services.store

    def stage() -> dict[str, Any]:
        try:
            classification = store.settings_of(pool).task == "classification"
        except NotFound:  # a new pool: the default task is classification
            classification = True
        records = parse_upload(data, fmt=fmt, limits=limits, label_from_output=classification)
        return store.stage_upload(pool, records, mode=mode, max_pool_rows=limits.max_pool_rows)

    job = await anyio.to_thread.run_sync(stage)
    services.uploads.submit(job["id"])
    return JSONResponse({"job": job}, status_code=202)


@router.get("/pools/{pool}/examples", dependencies=[ClientAuth], responses=error_responses(404))
async def page_examples(
    pool: PoolName,
    services: ServicesDep,
    # SQLite takes 64-bit integers: a larger offset would fail in the query, not page.
    offset: Annotated[int, Query(ge=0, le=2**63 - 1)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    labeled: Annotated[bool | None, Query()] = None,
) -> Any:
    """Page through the examples of the active version."""
    return await anyio.to_thread.run_sync(
        lambda: services.store.page_examples(pool, offset=offset, limit=limit, labeled=labeled)
    )


@router.patch(
    "/pools/{pool}/examples",
    dependencies=[AdminAuth],
    responses=error_responses(404, 409, 422),
    openapi_extra=json_body(AnnotationBody),
)
async def annotate_examples(pool: PoolName, request: Request, services: ServicesDep) -> Any:
    """Set outputs and labels (annotation); publishes a version without re-embedding."""
    try:
        body = await request.json()
    except ValueError as exc:
        raise InvalidRequest(f"body is not valid JSON: {exc}") from exc
    limits = services.settings.limits
    items = parse_annotations(
        body, max_items=limits.max_rows_per_upload, max_chars=limits.max_field_chars
    )
    return await anyio.to_thread.run_sync(services.store.annotate, pool, items)


@router.post("/pools/{pool}/select", dependencies=[ClientAuth], responses=error_responses(404, 409))
async def select(pool: PoolName, body: SelectRequest, services: ServicesDep) -> Any:
    """Dry run: the demonstrations, messages and text prompt a request would get."""
    if len(body.query) > services.settings.limits.max_field_chars:
        raise InvalidRequest(
            f"query is longer than {services.settings.limits.max_field_chars} characters",
            param="query",
        )
    selection = await services.pipeline.select(pool, body.query, body)
    # The header names the version every demonstration comes from, for clients that check
    # consistency without parsing the body (and for the reliability suite's readers).
    return JSONResponse(
        selection.select_response(body.query),
        headers={"X-Pool-Version": str(selection.version)},
    )
