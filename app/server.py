"""Run the service with uvicorn: one process, one worker (CPU work goes to threads)."""

from __future__ import annotations

import logging
import os

import uvicorn

from app.main import create_app
from app.settings import Settings


def configure_threads() -> None:
    # Two cores: one intra-op thread pool sized to them, not one per library per request.
    cores = str(len(os.sched_getaffinity(0)))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(var, cores)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


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
