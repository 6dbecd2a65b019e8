"""Background jobs: a bounded worker pool per job kind, each job run in a thread.

Uploads (embed staged rows, then publish), pool-level computations (subsets) and preset
searches (which mostly wait on the LLM) have their own queues, so a long subset computation
does not hold up an upload, nor a preset a subset. Each kind has few workers (default one):
the machine has two cores and each job uses both. Progress is written to SQLite as the job
goes; a job cancelled meanwhile stops at its next progress report.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable

import anyio
import numpy as np

from app.errors import ICLServeError
from app.faults import fault_point
from app.store import PoolStore
from retrievers.base import Embedder

log = logging.getLogger("iclserve.jobs")

STOP_GRACE_S = 5.0
"""Seconds a stopping worker waits for its running jobs to notice `should_stop()`."""

Handler = Callable[[str, Callable[[], bool]], str]
"""Runs one job given its id and a `should_stop()` probe; returns the outcome."""


class JobCancelled(Exception):
    pass


class Worker:
    """Takes job ids of one kind from a queue and runs them with `handler` in threads."""

    def __init__(
        self,
        kind: str,
        handler: Handler,
        *,
        workers: int = 1,
        on_finished: Callable[[str, str, float], None] | None = None,
    ) -> None:
        self.kind = kind
        self.handler = handler
        self.workers = workers
        self.on_finished = on_finished
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = threading.Event()
        self._busy = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def start(self, resume: list[str]) -> None:
        for job_id in resume:
            self._queue.put_nowait(job_id)
        self._tasks = [asyncio.create_task(self._loop()) for _ in range(self.workers)]

    def submit(self, job_id: str) -> None:
        self._queue.put_nowait(job_id)

    async def stop(self, grace: float = STOP_GRACE_S) -> None:
        self._stopping.set()
        # A job thread that notices should_stop() soon ends cleanly; abandoned instead, it
        # may still be waiting on this event loop (an upstream call) while the loop closes.
        try:
            await asyncio.wait_for(self._idle.wait(), grace)
        except TimeoutError:
            log.warning("%s jobs still running after %gs; abandoning them", self.kind, grace)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass

    async def _loop(self) -> None:
        while not self._stopping.is_set():
            job_id = await self._queue.get()
            if self._stopping.is_set():
                return  # left queued: recovery decides about it on the next start
            self._busy += 1
            self._idle.clear()
            try:
                await anyio.to_thread.run_sync(self._run, job_id, abandon_on_cancel=True)
            except Exception:  # the handler records its own failures; keep the worker alive
                log.exception("%s job %s crashed", self.kind, job_id)
            finally:
                self._busy -= 1
                if self._busy == 0:
                    self._idle.set()

    def _run(self, job_id: str) -> None:
        started = time.monotonic()
        outcome = "failed"
        try:
            outcome = self.handler(job_id, self._stopping.is_set)
        finally:
            if self.on_finished is not None:
                self.on_finished(self.kind, outcome, time.monotonic() - started)


def upload_handler(store: PoolStore, embedder: Embedder, *, batch_size: int) -> Handler:
    """Embed an upload's staged rows in batches, then publish them as the next version."""

    def run(job_id: str, should_stop: Callable[[], bool]) -> str:
        if not store.start_job(job_id):
            return "cancelled"  # cancelled (or already taken) before it started
        started = time.monotonic()
        try:
            ids, texts = store.staged_rows(job_id)
            vectors = np.empty((len(texts), embedder.dim), dtype=np.float32)
            # Batches of similar length pad little: the whole upload is sorted by length
            # first, as sentence-transformers' encode does, not each batch on its own.
            by_length = np.argsort([len(t) for t in texts], kind="stable")
            for start in range(0, len(texts), batch_size):
                if should_stop():
                    # Left 'running': recovery requeues it on the next start.
                    raise JobCancelled("server is shutting down; the job resumes on restart")
                batch = by_length[start : start + batch_size]
                vectors[batch] = embedder.embed([texts[i] for i in batch])
                if not store.progress(job_id, start + len(batch)):
                    raise JobCancelled("cancelled")
            fault_point("embedded")
            store.publish_upload(job_id, ids, vectors, embedder_name=embedder.name)
            log.info(
                "job %s published %d rows in %.1fs", job_id, len(texts), time.monotonic() - started
            )
            return "succeeded"
        except JobCancelled as exc:
            log.info("job %s stopped: %s", job_id, exc)
            return "cancelled"
        except ICLServeError as exc:
            if exc.code == "job_cancelled":
                return "cancelled"
            _record_failure(store, job_id, exc.message)
            return "failed"
        except Exception as exc:
            log.exception("job %s failed", job_id)
            _record_failure(store, job_id, f"internal error while embedding: {type(exc).__name__}")
            return "failed"

    return run


def _record_failure(store: PoolStore, job_id: str, message: str) -> None:
    try:
        store.fail_job(job_id, message)
    except ICLServeError as exc:
        # Typically the disk is still full. The job stays 'running' with its rows staged,
        # and recovery retries it on the next start, when space may have been freed.
        log.error(
            "job %s failed (%s) and the failure could not be recorded: %s", job_id, message, exc
        )
