"""The server's worker: one thread that opens the run session (the pipeline loaded once, on 1..N
GPUs) and runs the queue's jobs one after another, recording progress, results and errors."""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import replace

from wan_i2v.config import GenerationSettings
from wan_i2v.errors import WanError, first_line, is_out_of_memory
from wan_i2v.models.spec import spec_for
from wan_i2v.server.queue import QueueUnreachable
from wan_i2v.server.requests import MODEL
from wan_i2v.server.store import Job, JobStore, exception_chain, is_disk_full

log = logging.getLogger("wan_i2v.server")

# How often an idle runner looks for jobs other servers sharing the state directory took in.
POLL_SECONDS = 1.0
# How often a runner waiting for disk space looks at the free space.
DISK_POLL_SECONDS = 2.0
MiB = 2**20


class _JobWatch:
    """Between a run and the queue, in a thread of its own, so that the GPUs never wait on the database
    (which may be restarting): writes the run's latest progress, and notices when the job is no longer
    this server's to run (a DELETE, here or on another server; a take-over), once per step as the run
    reports it. It is the run's ``cancel``, read once per step: set then, or when the server is stopping."""

    def __init__(self, store: JobStore, job_id: str, stopping: threading.Event):
        self.store, self.job_id, self.stopping = store, job_id, stopping
        self.lost = threading.Event()
        self._latest: tuple[int, float | None] | None = None  # progress not written yet
        self._lock = threading.Lock()
        self._reported = threading.Event()
        self._ended = False
        self._thread = threading.Thread(target=self._watch, name="wan-i2v-job-watch", daemon=True)

    def __enter__(self) -> _JobWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._ended = True
        self._reported.set()
        self._thread.join()

    def report(self, step: int, seconds_per_step: float | None) -> None:
        with self._lock:
            self._latest = (step, seconds_per_step)
        self._reported.set()

    def is_set(self) -> bool:
        return self.stopping.is_set() or self.lost.is_set()

    def _watch(self) -> None:
        while True:
            self._reported.wait()
            self._reported.clear()
            ended = self._ended
            with self._lock:
                latest, self._latest = self._latest, None
            try:
                if latest is not None:
                    self.store.progress(self.job_id, *latest)
                if not ended and not self.store.still_mine(self.job_id):
                    self.lost.set()
            except QueueUnreachable:  # progress is shown, not needed: a later step's is written once it answers
                pass
            if ended:
                return


class Runner:
    """Runs jobs from ``store`` on the session ``open_session()`` returns (of the model named ``model``,
    as the API names it), in a thread of its own."""

    def __init__(self, store: JobStore, open_session: Callable, *, on_failure: Callable[[BaseException], None] = lambda exc: None,
                 model: str = MODEL):  # fmt: skip
        self.store = store
        self.open_session = open_session
        self.model = model
        self.on_failure = on_failure  # the session could not be opened: the server cannot run anything
        self.status = "loading"  # then "ready", or "failed"
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._main, name="wan-i2v-runner", daemon=True)
        self._room_needed = 0  # bytes the state directory's disk must have free before the next job starts (after a full disk)

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
        if not self.stopping.is_set():  # (a stop asked for while it loaded: it closes at once, never ready for a job)
            log.info("ready")
        try:
            idle_since = time.monotonic()
            while not self.stopping.is_set():
                if not self._room_returned():
                    self.stopping.wait(DISK_POLL_SECONDS)
                    continue
                try:
                    job = self.store.claim()
                except QueueUnreachable:  # for a while (a full disk, a database restarting; the store logs it): keep trying
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
        """Run one job (its mp4 written as its frames are decoded) and record its end; returns the session to go on with."""
        from wan_i2v.sampling.loop import Cancelled

        if self.store.video_path(job.id).is_file():  # written before a kill, its completion not yet recorded
            self._recorded(lambda: self._record(job.id, "completed", error=None, peak_memory_gb=None))
            return session
        wanted = job.settings.get("model", MODEL)
        if wanted != self.model:  # taken in by a server of another model sharing the queue
            error = f"the job is for {wanted}, and the server that took it runs {self.model}: the servers sharing a queue must serve one model"
            self._recorded(lambda: self._record(job.id, "failed", error=error, peak_memory_gb=None))
            return session
        log.info("running %s (%s)", job.id, "resuming" if self.store.state_path(job.id).is_file() else "new")
        started = time.monotonic()
        waited = time.time() - job.created_at
        settings = job.settings
        last_step_at: list[float] = []

        def on_step(step) -> None:
            last_step_at.append(time.monotonic())
            # The mean over this run's steps; the first step after the start or a resume also carries
            # the preparation, so its time is not a step's.
            intervals = len(last_step_at) - 1
            watch.report(step.index + 1, (last_step_at[-1] - last_step_at[0]) / intervals if intervals else None)

        error = None
        try:
            with _JobWatch(self.store, job.id, self.stopping) as watch:
                result = session.generate(
                    None if settings.get("text_to_video") else self.store.image_path(job.id), settings=_generation_settings(settings), progress=False, state_file=self.store.state_path(job.id),
                    video_file=self.store.video_path(job.id), cancel=watch, on_step=on_step, step_cache=settings.get("step_cache"),
                    last_image=self.store.last_image_path(job.id) if settings.get("last_image_file_sha256") else None,
                )  # fmt: skip
            outcome = "generated"
        except Cancelled:
            outcome = "stopped"
        except Exception as exc:  # a rank's failure (a WanError) included
            outcome, error = "failed", str(exc) if isinstance(exc, WanError) else _one_line(exc)
            if self._short_of_room(exc, settings):  # the state, the mp4 (written as it decodes): the retry resumes from what was whole
                outcome = "no room"
            elif is_out_of_memory(exc):
                import torch

                torch.cuda.empty_cache()
            elif not isinstance(exc, WanError):
                log.exception("job %s failed", job.id)
        if outcome == "generated":
            generated = time.monotonic()
            try:
                self._recorded(lambda: self._record(job.id, "completed", error=None, peak_memory_gb=result.peak_memory_gb))
            except QueueUnreachable:  # stopping, the queue unreachable: the next start finds the mp4 and records it
                log.warning("%s: its end is not recorded yet", job.id)
                return session
            # Where a job's time went, from its submission to its end recorded (bench/serve_throughput.py reads it).
            stages = {"waiting": waited, **result.timings, "run": generated - started, "recording": time.monotonic() - generated}
            log.info("timings of %s: %s", job.id, ", ".join(f"{stage} {seconds:.3f} s" for stage, seconds in stages.items()))
        elif outcome == "no room":
            self._wait_for_room(job.id, settings)
        else:
            self._recorded(lambda: self._record(job.id, outcome, error=error, peak_memory_gb=None))
        if not session.alive:  # the job took the session's ranks down with it: the next job gets new ones
            log.warning("the session's ranks have exited: loading the pipeline again")
            session.close()
            session = self.open_session()
        return session

    def _short_of_room(self, exc: Exception, settings: dict) -> bool:
        """The job failed for want of disk space: ENOSPC or EDQUOT in its error's chain (the mp4 writer,
        Python's files), or the short write of torch's zip writer (``torch.save``: a full disk, but its
        error has lost the errno), which counts only while the disk has less room than the job's files take."""
        if is_disk_full(exc):
            return True
        short_write = any(isinstance(cause, RuntimeError) and "inline_container.cc" in str(cause) and "unexpected pos" in str(cause)
                          for cause in exception_chain(exc))  # fmt: skip
        return short_write and self._free_bytes() < files_estimate(settings)

    def _wait_for_room(self, job_id: str, settings: dict) -> None:
        """Put a job the disk had no room for back at the queue's head (its partial files are gone: each
        is written whole or not at all; its state as last saved whole is kept, and the retry resumes
        from it), and start no job until the disk has room for its files beyond what was free now
        (an estimate: polling, not retrying in a loop)."""
        free = self._free_bytes()
        self._room_needed = max(self._room_needed, free + files_estimate(settings))
        why = f"waiting: the disk is full ({free // MiB} MiB free); it resumes when {-(-self._room_needed // MiB)} MiB are free"
        log.warning("%s is %s", job_id, why)
        self._recorded(lambda: self.store.release(job_id, why))  # (a queue on the full disk takes it once space returns)

    def _room_returned(self) -> bool:
        """The disk has the room the last full disk asked for (or none was asked)."""
        if self._room_needed and self._free_bytes() < self._room_needed:
            return False
        if self._room_needed:
            log.info("the disk has room again: resuming")
            self._room_needed = 0
        return True

    def _free_bytes(self) -> int:
        """Free space on the disk of the jobs' files (which may be a volume of its own)."""
        return shutil.disk_usage(self.store.root / "jobs").free

    def _record(self, job_id: str, outcome: str, *, error: str | None, peak_memory_gb: float | None) -> None:
        """Write a run's end to the queue (``outcome``: completed, failed, or stopped by a cancel)."""
        if outcome == "stopped":
            if self.stopping.is_set():
                self.store.release(job_id)  # the next start resumes it from its saved state
            elif self.store.cancelled(job_id):
                self.store.state_path(job_id).unlink(missing_ok=True)
            else:  # another server took it over (this one had lost its lock): its saved state is that server's now
                log.warning("%s was taken over by another server", job_id)
        elif self.store.finish(job_id, outcome, error=error, peak_memory_gb=peak_memory_gb):
            if outcome == "completed":
                log.info("completed %s", job_id)
        elif self.store.cancelled(job_id):  # as its last step ended
            self.store.video_path(job_id).unlink(missing_ok=True)

    def _recorded(self, write: Callable[[], None]) -> None:
        """Do ``write``, waiting out a queue that is unreachable for a while (a database restarting): the
        job's end must be recorded before the next job, or nobody would run it again while this server lives."""
        while True:
            try:
                return write()
            except QueueUnreachable:  # (the store has said so in the log)
                if self.stopping.is_set():
                    raise
                time.sleep(POLL_SECONDS)


def _generation_settings(stored: dict) -> GenerationSettings:
    """A job's settings as the queue stores them (its seed drawn at submission), for the session."""
    sampling = ("max_area", "frame_num", "steps", "shift", "guide_scale", "seed", "solver", "height", "width", "fps")
    settings = GenerationSettings.of(stored["prompt"], stored["negative_prompt"], **{name: stored.get(name) for name in sampling})  # (a job queued before a setting existed: its default)
    return replace(settings, text_to_video_shape=stored.get("text_to_video_shape"))


def files_estimate(settings: dict) -> int:
    """The most bytes a job's files take: its saved state (the latent and the solver's history: four
    float32 latents of 16 channels per 8x8 pixels, 1 byte a pixel for each latent frame) and its mp4
    (less than its frames as raw RGB)."""
    latent_frames = spec_for().latent_frames(settings["frame_num"])
    return settings["max_area"] * (4 * latent_frames + 3 * settings["frame_num"])


def _one_line(exc: Exception) -> str:
    if is_out_of_memory(exc):
        return "out of GPU memory (try a smaller size or fewer frames, or start the server with --offload)"
    return f"internal error: {type(exc).__name__}: {first_line(exc)}"
