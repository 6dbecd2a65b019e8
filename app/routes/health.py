"""Liveness, readiness and metrics (open: no key needed).

These three routes are public on purpose: container health checks and Prometheus scrapers
call them without a key. What they show is not secret: status, the embedder's name, and
request/job/pool counters (which name pools, never keys or example text).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from app.http import error_responses

router = APIRouter(tags=["operations"])


@router.get("/healthz")
async def healthz() -> Any:
    """The process is alive."""
    return {"status": "ok"}


@router.get("/readyz", responses=error_responses(503))
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


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(request: Request) -> Response:
    """Prometheus text format."""
    services = request.state.services
    return Response(services.metrics.render(), media_type=CONTENT_TYPE_LATEST)
