"""Background upload jobs: embed staged rows in batches, then publish the version.

A bounded number of workers (default one: the machine has two cores and embedding uses
both) take job ids from a queue and run each job in a thread. Progress is written to SQLite
after every batch; a job cancelled meanwhile stops at the next batch.
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


class JobCancelled(Exception):
    pass


class UploadWorker:
    def __init__(
        self,
        store: PoolStore,
        embedder: Embedder,
        *,
        batch_size: int,
        workers: int = 1,
        on_finished: Callable[[str, str, float], None] | None = None,
    ) -> None:
        self.store = store
        self.embedder = embedder
        self.batch_size = batch_size
        self.workers = workers
        self.on_finished = on_finished
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = threading.Event()

    def start(self, resume: list[str]) -> None:
        for job_id in resume:
            self._queue.put_nowait(job_id)
        self._tasks = [asyncio.create_task(self._loop()) for _ in range(self.workers)]

    def submit(self, job_id: str) -> None:
        self._queue.put_nowait(job_id)

    async def stop(self) -> None:
        self._stopping.set()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass

    async def _loop(self) -> None:
        while True:
            job_id = await self._queue.get()
            try:
                await anyio.to_thread.run_sync(self._run, job_id, abandon_on_cancel=True)
            except Exception:  # the job's own handler recorded it; keep the worker alive
                log.exception("upload job %s crashed", job_id)

    def _run(self, job_id: str) -> None:
        if not self.store.start_job(job_id):
            return  # cancelled (or already taken) before it started
        started = time.monotonic()
        outcome = "failed"
        try:
            ids, texts = self.store.staged_rows(job_id)
            vectors = np.empty((len(texts), self.embedder.dim), dtype=np.float32)
            for start in range(0, len(texts), self.batch_size):
                if self._stopping.is_set():
                    raise JobCancelled("server is shutting down; the job resumes on restart")
                batch = texts[start : start + self.batch_size]
                vectors[start : start + len(batch)] = self.embedder.embed(batch)
                if not self.store.progress(job_id, start + len(batch)):
                    raise JobCancelled("cancelled")
            fault_point("embedded")
            self.store.publish_upload(job_id, ids, vectors, embedder_name=self.embedder.name)
            outcome = "succeeded"
            log.info(
                "job %s published %d rows in %.1fs", job_id, len(texts), time.monotonic() - started
            )
        except JobCancelled as exc:
            outcome = "cancelled"
            log.info("job %s stopped: %s", job_id, exc)
        except ICLServeError as exc:
            outcome = "cancelled" if exc.code == "job_cancelled" else "failed"
            if outcome == "failed":
                self.store.fail_job(job_id, exc.message)
        except Exception as exc:
            log.exception("job %s failed", job_id)
            self.store.fail_job(job_id, f"internal error while embedding: {type(exc).__name__}")
        finally:
            if self.on_finished is not None:
                self.on_finished("upload", outcome, time.monotonic() - started)
