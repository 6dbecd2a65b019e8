"""Liveness, readiness and metrics (open: no key needed)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

router = APIRouter(tags=["operations"])


@router.get("/healthz")
async def healthz() -> Any:
    """The process is alive."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request) -> Any:
    """The store is open and the embedder is loaded."""
    services = getattr(request.state, "services", None)
    if services is None:
        return JSONResponse(
            {
                "error": {
                    "message": "starting",
                    "type": "service_unavailable",
                    "param": None,
                    "code": "not_ready",
                }
            },
            status_code=503,
        )
    return {
        "status": "ready",
        "embedder": {"name": services.embedder.name, "dim": services.embedder.dim},
    }


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """Prometheus text format."""
    services = request.state.services
    return Response(services.metrics.render(), media_type=CONTENT_TYPE_LATEST)
