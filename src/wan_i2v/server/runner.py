"""The server's worker: one thread that opens the run session (the pipeline loaded once, on 1..N
GPUs) and runs the queue's jobs one after another, recording progress, results and errors."""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable

from wan_i2v.errors import WanError, first_line, is_out_of_memory
from wan_i2v.server.store import Job, JobStore

log = logging.getLogger("wan_i2v.server")

# How often an idle runner looks for jobs other servers sharing the state directory took in.
POLL_SECONDS = 1.0


class _JobCancel:
    """The run's ``cancel``: set once the job is no longer this server's to run (a DELETE, here or on
    another server sharing the queue) or the server is stopping. Read once per step."""

    def __init__(self, store: JobStore, job_id: str, stopping: threading.Event):
        self.store, self.job_id, self.stopping = store, job_id, stopping

    def is_set(self) -> bool:
        try:
            return self.stopping.is_set() or not self.store.still_mine(self.job_id)
        except sqlite3.Error:  # the queue unreadable for a moment: go on, and ask again at the next step
            return False


class Runner:
    """Runs jobs from ``store`` on the session ``open_session()`` returns, in a thread of its own."""

    def __init__(self, store: JobStore, open_session: Callable, *, on_failure: Callable[[BaseException], None] = lambda exc: None):
        self.store = store
        self.open_session = open_session
        self.on_failure = on_failure  # the session could not be opened: the server cannot run anything
        self.status = "loading"  # then "ready", or "failed"
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._main, name="wan-i2v-runner", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def notify(self) -> None:
        """A job was queued: look now rather than at the next poll."""
        self.wake.set()

    def stop(self) -> None:
        """Stop after the running job's current step (its state saved; it goes back to the queue)."""
        self.stopping.set()
        self.wake.set()
        self.thread.join()

    def _main(self) -> None:
        from wan_i2v.session import IDLE_SECONDS

        try:
            session = self.open_session()
        except BaseException as exc:
            self.status = "failed"
            self.on_failure(exc)
            return
        self.status = "ready"
        log.info("ready")
        try:
            idle_since = time.monotonic()
            while not self.stopping.is_set():
                try:
                    job = self.store.claim()
                except sqlite3.Error:  # the state directory unreadable for a moment (a full disk): keep trying
                    log.exception("cannot read the queue")
                    job = None
                    time.sleep(POLL_SECONDS)
                if job is not None:
                    session = self._run(session, job)
                    idle_since = time.monotonic()
                    continue
                if self.wake.wait(POLL_SECONDS):
                    self.wake.clear()
                if time.monotonic() - idle_since > IDLE_SECONDS:
                    session.keep_alive()
                    idle_since = time.monotonic()
        except BaseException as exc:
            # The runner cannot go on (its ranks are gone and will not load again, the queue cannot be
            # written): the server says so and stops, so that a supervisor's restart takes over.
            log.exception("the runner stopped")
            self.status = "failed"
            self.on_failure(exc)
        finally:
            session.close()

    def _run(self, session, job: Job):
        """Run one job to its end, recorded in the store; returns the session to go on with."""
        from wan_i2v.config import FPS
        from wan_i2v.sampling.loop import Cancelled
        from wan_i2v.video import write_mp4

        video = self.store.video_path(job.id)
        if video.is_file():  # written before a kill, its completion not yet recorded
            if self.store.finish(job.id, "completed"):
                log.info("completed %s", job.id)
            return session
        log.info("running %s (%s)", job.id, "resuming" if self.store.state_path(job.id).is_file() else "new")
        settings = job.settings
        last_step_at: list[float] = []

        def on_step(step) -> None:
            last_step_at.append(time.monotonic())
            # The mean over this run's steps; the first step after the start or a resume also carries
            # the preparation, so its time is not a step's.
            intervals = len(last_step_at) - 1
            mean = (last_step_at[-1] - last_step_at[0]) / intervals if intervals else None
            self.store.progress(job.id, step.index + 1, mean)

        try:
            result = session.generate(
                self.store.image_path(job.id), settings["prompt"], negative_prompt=settings["negative_prompt"],
                max_area=settings["max_area"], frame_num=settings["frame_num"], steps=settings["steps"], shift=settings["shift"],
                guide_scale=tuple(settings["guide_scale"]), seed=settings["seed"], solver=settings["solver"], progress=False,
                state_file=self.store.state_path(job.id), cancel=_JobCancel(self.store, job.id, self.stopping), on_step=on_step,
            )  # fmt: skip
            write_mp4(result.video, video, fps=FPS, metadata=result.metadata)
            if self.store.finish(job.id, "completed", peak_memory_gb=result.peak_memory_gb):
                log.info("completed %s", job.id)
            else:
                video.unlink(missing_ok=True)  # cancelled as its last step ended
        except Cancelled:
            if self.stopping.is_set():
                self.store.release(job.id)  # the next start resumes it from its saved state
            else:
                self.store.state_path(job.id).unlink(missing_ok=True)
        except WanError as exc:  # a rank's failure included
            self.store.finish(job.id, "failed", error=str(exc))
        except Exception as exc:
            self.store.finish(job.id, "failed", error=_one_line(exc))
            if is_out_of_memory(exc):
                import torch

                torch.cuda.empty_cache()
            else:
                log.exception("job %s failed", job.id)
        if not session.alive:  # the job took the session's ranks down with it: the next job gets new ones
            log.warning("the session's ranks have exited: loading the pipeline again")
            session.close()
            session = self.open_session()
        return session


def _one_line(exc: Exception) -> str:
    if is_out_of_memory(exc):
        return "out of GPU memory (try a smaller size or fewer frames, or start the server with --offload)"
    return f"internal error: {type(exc).__name__}: {first_line(exc)}"
