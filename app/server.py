"""Run the service with uvicorn: one process, one worker (CPU work goes to threads)."""

from __future__ import annotations

import ctypes
import logging
import os

import uvicorn

from app.main import create_app
from app.settings import Settings
from app.threads import configure_threads

_M_MMAP_THRESHOLD = -3  # glibc's malloc.h


def keep_large_blocks_off_the_heap() -> None:
    """Fix glibc's mmap threshold at 1 MiB, so that freed upload buffers leave the process.

    By default glibc raises the threshold to the size of each large block freed (up to
    32 MiB); blocks below it then come from the worker threads' heaps, and once freed they
    stay in the process. A few refused 30-60 MB uploads left 60-90 MB of RSS behind that
    way (tests/reliability/test_hostile_uploads.py). An explicit threshold turns the
    adjustment off. With MALLOC_MMAP_THRESHOLD_ set, or without mallopt, nothing to do.
    """
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the interpreter runs on
    except (OSError, AttributeError):
        return
    mallopt(_M_MMAP_THRESHOLD, 1 << 20)


def quiet_http_client_logs() -> None:
    """Keep httpx's and httpcore's own records to warnings and above.

    At INFO, httpx logs a line per request with its full URL: an access log of the upstream
    calls that may carry credentials in the URL. The upstream client logs what matters itself
    (`iclserve.upstream`: name, status, timing), and failures at INFO.
    """
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)


def serve(settings: Settings) -> None:
    """Serve until interrupted. Refuses a public bind without keys."""
    settings.check_bind()
    configure_threads()
    keep_large_blocks_off_the_heap()
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    quiet_http_client_logs()
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
