"""Run the service with uvicorn: one process, one worker (CPU work goes to threads)."""

from __future__ import annotations

import logging

import uvicorn

from app.main import create_app
from app.settings import Settings
from app.threads import configure_threads


def serve(settings: Settings) -> None:
    """Serve until interrupted. Refuses a public bind without keys."""
    settings.check_bind()
    configure_threads()
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    app = create_app(settings)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        workers=1,
        timeout_graceful_shutdown=30,
        access_log=False,
    )
