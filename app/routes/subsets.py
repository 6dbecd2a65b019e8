"""Pool-level subsets (vote-k, IDEAL, MFL, ...): admin computes, client reads."""

from __future__ import annotations

from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Path, Query
from fastapi.responses import JSONResponse

from app.deps import AdminAuth, ClientAuth, ServicesDep
from app.http import error_responses
from app.pipeline import POOL_NAME_PATTERN
from app.subsets import SubsetCreate
from selection.fixed import SET_NAME_PATTERN

router = APIRouter(prefix="/v1", tags=["subsets"])

PoolName = Annotated[str, Path(pattern=POOL_NAME_PATTERN, description="Pool name.")]
SubsetName = Annotated[str, Path(pattern=SET_NAME_PATTERN, description="Subset name.")]


@router.post(
    "/pools/{pool}/subsets",
    status_code=202,
    dependencies=[AdminAuth],
    responses=error_responses(404, 409),
)
async def create_subset(pool: PoolName, body: SubsetCreate, services: ServicesDep) -> Any:
    """Start a job that computes a subset; resubmitting a name replaces its subset."""
    subset = await anyio.to_thread.run_sync(services.subsets.create, pool, body)
    services.computations.submit(subset["job"])
    job = await anyio.to_thread.run_sync(services.store.job, subset["job"])
    subset.pop("ids", None)
    return JSONResponse({"job": job, "subset": subset}, status_code=202)


@router.get("/pools/{pool}/subsets", dependencies=[ClientAuth], responses=error_responses(404))
async def list_subsets(pool: PoolName, services: ServicesDep) -> Any:
    """List a pool's subsets (without their ids)."""
    return {"object": "list", "data": await anyio.to_thread.run_sync(services.subsets.list, pool)}


@router.get(
    "/pools/{pool}/subsets/{name}", dependencies=[ClientAuth], responses=error_responses(404, 409)
)
async def get_subset(
    pool: PoolName,
    name: SubsetName,
    services: ServicesDep,
    unlabeled: Annotated[
        bool, Query(description="Also return the members still to be labeled, as rows.")
    ] = False,
    rows: Annotated[bool, Query(description="Also return every member as a row.")] = False,
) -> Any:
    """A subset: ordered ids, method, params, pool version, timing, and whether it is stale."""

    def read() -> dict[str, Any]:
        subset = services.subsets.get(pool, name)
        if unlabeled or rows:
            version = services.store.pool_info(pool)["version"]
            members = services.store.examples_by_id(pool, version, subset["ids"], skip_missing=True)
            subset["examples"] = [m.as_dict() for m in members if rows or m.output is None]
        return subset

    return await anyio.to_thread.run_sync(read)


@router.delete(
    "/pools/{pool}/subsets/{name}", dependencies=[AdminAuth], responses=error_responses(404)
)
async def delete_subset(pool: PoolName, name: SubsetName, services: ServicesDep) -> Any:
    """Delete a subset (cancelling its job if it is still computing)."""
    await anyio.to_thread.run_sync(services.subsets.delete, pool, name)
    return {"pool": pool, "name": name, "deleted": True}
