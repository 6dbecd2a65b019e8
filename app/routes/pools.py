"""Pools and their examples: admin writes, client reads."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import anyio
from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile

from app.deps import AdminAuth, ClientAuth, ServicesDep
from app.errors import InvalidRequest, NotFound, PayloadTooLarge
from app.ingest import detect_format, parse_upload
from app.pipeline import POOL_NAME_PATTERN, SelectRequest
from app.store import PoolSettingsUpdate, parse_annotations

router = APIRouter(prefix="/v1", tags=["pools"])

PoolName = Annotated[str, Path(pattern=POOL_NAME_PATTERN, description="Pool name.")]


@router.put("/pools/{pool}", dependencies=[AdminAuth])
async def put_pool(pool: PoolName, body: PoolSettingsUpdate, services: ServicesDep) -> Any:
    """Create a pool or update its settings."""
    return await anyio.to_thread.run_sync(services.store.put_pool, pool, body)


@router.get("/pools", dependencies=[ClientAuth])
async def list_pools(services: ServicesDep) -> Any:
    """List pools."""
    return {"object": "list", "data": await anyio.to_thread.run_sync(services.store.list_pools)}


@router.get("/pools/{pool}", dependencies=[ClientAuth])
async def get_pool(pool: PoolName, services: ServicesDep) -> Any:
    """Describe a pool: version, size, labels, embedder, status."""
    return await anyio.to_thread.run_sync(services.store.pool_info, pool)


@router.delete("/pools/{pool}", dependencies=[AdminAuth])
async def delete_pool(pool: PoolName, services: ServicesDep) -> Any:
    """Delete a pool and its files."""
    await anyio.to_thread.run_sync(services.store.delete_pool, pool)
    return {"name": pool, "deleted": True}


async def _read_upload(request: Request, max_bytes: int) -> tuple[bytes, str | None, str | None]:
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
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise PayloadTooLarge(f"request body is larger than the limit of {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks), content_type, None


@router.post("/pools/{pool}/examples", status_code=202, dependencies=[AdminAuth])
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


@router.get("/pools/{pool}/examples", dependencies=[ClientAuth])
async def page_examples(
    pool: PoolName,
    services: ServicesDep,
    offset: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    labeled: Annotated[bool | None, Query()] = None,
) -> Any:
    """Page through the examples of the active version."""
    return await anyio.to_thread.run_sync(
        lambda: services.store.page_examples(pool, offset=offset, limit=limit, labeled=labeled)
    )


@router.patch("/pools/{pool}/examples", dependencies=[AdminAuth])
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


@router.post("/pools/{pool}/select", dependencies=[ClientAuth])
async def select(pool: PoolName, body: SelectRequest, services: ServicesDep) -> Any:
    """Dry run: the demonstrations, messages and text prompt a request would get."""
    if len(body.query) > services.settings.limits.max_field_chars:
        raise InvalidRequest(
            f"query is longer than {services.settings.limits.max_field_chars} characters",
            param="query",
        )
    selection = await services.pipeline.select(pool, body.query, body)
    return selection.select_response(body.query)
