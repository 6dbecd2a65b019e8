"""Background jobs (admin)."""

from __future__ import annotations

from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Path, Query

from app.deps import AdminAuth, ServicesDep
from app.http import error_responses

router = APIRouter(prefix="/v1", tags=["jobs"], dependencies=[AdminAuth])

JobId = Annotated[str, Path(min_length=1, max_length=64, description="Job id.")]


@router.get("/jobs/{job_id}", responses=error_responses(404))
async def get_job(job_id: JobId, services: ServicesDep) -> Any:
    """A job's status and progress."""
    return await anyio.to_thread.run_sync(services.store.job, job_id)


@router.get("/jobs")
async def list_jobs(
    services: ServicesDep,
    pool: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> Any:
    """List jobs, newest first."""
    jobs = await anyio.to_thread.run_sync(lambda: services.store.list_jobs(pool, limit))
    return {"object": "list", "data": jobs}


@router.delete("/jobs/{job_id}", responses=error_responses(404, 409))
async def cancel_job(job_id: JobId, services: ServicesDep) -> Any:
    """Cancel a queued or running job."""
    return await anyio.to_thread.run_sync(services.store.cancel_job, job_id)
