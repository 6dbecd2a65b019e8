"""Presets (EASE-optimized ordered demonstration sets): admin computes, client reads."""

from __future__ import annotations

from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Path
from fastapi.responses import JSONResponse

from app.deps import AdminAuth, ClientAuth, ServicesDep
from app.http import error_responses
from app.pipeline import POOL_NAME_PATTERN
from app.presets import PresetCreate
from selection.fixed import SET_NAME_PATTERN

router = APIRouter(prefix="/v1", tags=["presets"])

PoolName = Annotated[str, Path(pattern=POOL_NAME_PATTERN, description="Pool name.")]
PresetName = Annotated[str, Path(pattern=SET_NAME_PATTERN, description="Preset name.")]


@router.post(
    "/pools/{pool}/presets",
    status_code=202,
    dependencies=[AdminAuth],
    responses=error_responses(404, 409),
)
async def create_preset(pool: PoolName, body: PresetCreate, services: ServicesDep) -> Any:
    """Start a job that searches a preset; resubmitting a name replaces its preset."""
    preset = await anyio.to_thread.run_sync(services.presets.create, pool, body)
    services.preset_jobs.submit(preset["job"])
    job = await anyio.to_thread.run_sync(services.store.job, preset["job"])
    preset.pop("ids", None)
    preset.pop("history", None)
    return JSONResponse({"job": job, "preset": preset}, status_code=202)


@router.get("/pools/{pool}/presets", dependencies=[ClientAuth], responses=error_responses(404))
async def list_presets(pool: PoolName, services: ServicesDep) -> Any:
    """List a pool's presets (without their ids and history)."""
    presets = await anyio.to_thread.run_sync(services.presets.list_presets, pool)
    return {"object": "list", "data": presets}


@router.get(
    "/pools/{pool}/presets/{name}", dependencies=[ClientAuth], responses=error_responses(404, 409)
)
async def get_preset(pool: PoolName, name: PresetName, services: ServicesDep) -> Any:
    """A preset: ordered ids, instruction, score, history, LLM calls and tokens, staleness."""
    return await anyio.to_thread.run_sync(services.presets.get, pool, name)


@router.delete(
    "/pools/{pool}/presets/{name}", dependencies=[AdminAuth], responses=error_responses(404)
)
async def delete_preset(pool: PoolName, name: PresetName, services: ServicesDep) -> Any:
    """Delete a preset (cancelling its job if it is still computing)."""
    await anyio.to_thread.run_sync(services.presets.delete, pool, name)
    return {"pool": pool, "name": name, "deleted": True}
