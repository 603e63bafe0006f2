"""Jobs' changes pushed to their event streams (``GET /v1/videos/{id}/events``). The changes this
process writes (a submission, the runner's progress and end, a cancel) wake the streams at once;
those other servers of a shared queue write are read by one poll per server, while any stream is
open, rather than by every stream for itself."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

from starlette.concurrency import run_in_threadpool

from wan_i2v.server.queue import QueueUnreachable
from wan_i2v.server.store import Job, JobStore

# How often the queue is read for the changes of other servers sharing it, while streams are open.
POLL_SECONDS = 1.0


class JobWatch:
    """One stream's job: ``next()`` gives it each time its status or step changes (None once it is deleted)."""

    def __init__(self, job: Job):
        self.job_id = job.id
        self._seen: tuple[str, int] | None = (job.status, job.step)
        self._latest: Job | None = job
        self._changed = asyncio.Event()

    def offer(self, job: Job | None) -> None:
        seen = None if job is None else (job.status, job.step)
        if seen != self._seen:
            self._seen, self._latest = seen, job
            self._changed.set()

    async def next(self) -> Job | None:
        await self._changed.wait()
        self._changed.clear()
        return self._latest


class JobEvents:
    """Reads the watched jobs, all in one query, whenever this process writes to the queue (``store.on_write``)
    and every ``POLL_SECONDS`` meanwhile, and offers each stream its job. ``run()`` does it for as long
    as the app runs (its lifespan)."""

    def __init__(self, store: JobStore):
        self.store = store
        self._watches: set[JobWatch] = set()
        self._loop: asyncio.AbstractEventLoop | None = None  # with _wake: the running app's
        self._wake: asyncio.Event | None = None

    def changed(self) -> None:
        """The queue changed (called from any thread)."""
        loop, wake = self._loop, self._wake
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has closed meanwhile: no stream is left to tell
                loop.call_soon_threadsafe(wake.set)

    @contextlib.contextmanager
    def watching(self, job: Job) -> Iterator[JobWatch]:
        """Follow ``job`` from the state given (read again at once, in case it changed before the watch began)."""
        watch = JobWatch(job)
        self._watches.add(watch)
        self.changed()
        try:
            yield watch
        finally:
            self._watches.discard(watch)

    async def run(self) -> None:
        self._wake = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self.store.on_write.append(self.changed)
        try:
            while True:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), POLL_SECONDS if self._watches else None)
                self._wake.clear()
                if self._watches:
                    await self._offer()
        finally:
            self.store.on_write.remove(self.changed)
            self._loop = self._wake = None

    async def _offer(self) -> None:
        watches = list(self._watches)
        try:
            jobs = await run_in_threadpool(self.store.jobs, {watch.job_id for watch in watches})
        except QueueUnreachable:  # for a while (the store logs it): the next poll reads again
            return
        for watch in watches:
            watch.offer(jobs.get(watch.job_id))
