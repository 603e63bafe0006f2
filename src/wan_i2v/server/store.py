"""The server's job queue: a table of jobs plus a folder per job in the state directory. Every change
is one transaction, so a ``kill -9`` at any moment leaves either the state before it or the state
after it; files are written whole before the row that names them.

Several servers may share one queue: a job is claimed in one transaction, and a running job whose
server has died is taken over by the next claim (its saved denoising state lets the run go on from
its last step). The table lives in SQLite in the state directory (servers on one machine: SQLite's
locking does not hold on network file systems) or in PostgreSQL (``server.postgres``: servers on
several machines, whose state directory is then one shared folder).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import sqlite3
import stat
import time
import uuid
from collections.abc import Callable, Collection
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from wan_i2v import locks
from wan_i2v.errors import WanError, counted
from wan_i2v.server import memory_kills
from wan_i2v.server.postgres import PostgresQueue
from wan_i2v.server.queue import FOLDER_MARK, SQLITE_FILE, DuplicateKey, Queue, QueueUnreachable

log = logging.getLogger("wan_i2v.server")

MAX_RUNS = 3
SWEEP_AFTER_SECONDS = 600
STATUSES = ("queued", "in_progress", "completed", "failed", "cancelled")
FINISHED = ("completed", "failed", "cancelled")

# One schema for both databases; each names its own auto-increment key and 64-bit float.
SCHEMA = (
    """CREATE TABLE IF NOT EXISTS jobs (
    seq {serial},
    id TEXT NOT NULL UNIQUE,
    idempotency_key TEXT UNIQUE,
    status TEXT NOT NULL,
    settings TEXT NOT NULL,
    step INTEGER NOT NULL DEFAULT 0,
    seconds_per_step {real},
    error TEXT,
    owner TEXT,
    client TEXT,
    runs INTEGER NOT NULL DEFAULT 0,
    memory_kills_at_start TEXT,
    peak_memory_gb {real},
    created_at {real} NOT NULL,
    started_at {real},
    completed_at {real}
)""",
    "CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, seq)",
)
# Columns a queue made by an older version lacks, added at the start (its jobs have none: a job without a client is seen
# only by an admin, or by a server with one token or none).
ADDED_COLUMNS = {"client": "TEXT", "memory_kills_at_start": "TEXT"}


class DiskFull(Exception):
    """The state directory's disk has no room for a new job's files (nothing of the job is kept)."""


def exception_chain(exc: BaseException | None):
    """``exc`` and the exceptions it was raised from or while handling, innermost last."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def is_disk_full(exc: BaseException) -> bool:
    """A write refused for want of space, anywhere in ``exc``'s chain: by the file system (ENOSPC, or
    EDQUOT: a quota), or by SQLite (its queue file)."""
    return any(isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT)
               or isinstance(cause, sqlite3.Error) and getattr(cause, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
               for cause in exception_chain(exc))  # fmt: skip


@dataclass(frozen=True)
class Job:
    """One row of the queue."""

    seq: int
    id: str
    idempotency_key: str | None
    status: str
    settings: dict  # the checked request, with the seed drawn at submission
    step: int
    seconds_per_step: float | None
    error: str | None
    owner: str | None  # the server running it
    client: str | None  # the client that submitted it (--tokens' name; None: a server with one token or none)
    runs: int  # times a server started it (a resume counts)
    memory_kills_at_start: str | None  # the kernel's OOM kills when it last started (server.memory_kills)
    peak_memory_gb: float | None
    created_at: float
    started_at: float | None
    completed_at: float | None


class FileLiveness:
    """Whether the server that owns a job still runs: each server holds an exclusive lock on its own
    file in ``owners/`` for as long as its process lives (the kernel drops it when the process ends,
    however it ends), so a lock that can be taken is a server that is gone. Unlike host names and pids
    this survives a pod or container restart, whose host name and pids are new."""

    owner: str  # this server's name in the jobs it runs

    def __init__(self, directory: Path):
        self.directory = directory
        directory.mkdir(exist_ok=True)
        self.owner = uuid.uuid4().hex
        self._held = locks.hold(directory / f"{self.owner}.lock")  # kept open: the lock lives with the process

    def release(self) -> None:
        self._held.close()

    def others_alive(self) -> bool:
        """Whether another server of this folder runs now (one may be writing files in it)."""
        mine = f"{self.owner}.lock"
        return any(path.name != mine and locks.held(path) for path in self.directory.glob("*.lock"))

    def gone(self, owner: str, db) -> bool:
        path = self.directory / f"{owner}.lock"
        if locks.held(path):
            return False
        path.unlink(missing_ok=True)  # its server is gone: nobody needs the file any more
        return True


class SQLiteQueue:
    """The queue in ``queue.sqlite3`` in the state directory, for the servers of one machine (WAL:
    readers and the writer never block each other; a writer takes the lock at once, so there are no
    upgrade deadlocks)."""

    serial, real = "INTEGER PRIMARY KEY AUTOINCREMENT", "REAL"
    liveness: FileLiveness

    def __init__(self, root: Path):
        if (root / FOLDER_MARK).exists():
            raise WanError(f"--state-dir {root} is the shared folder of a PostgreSQL queue", "give its --queue URL too, or another --state-dir")
        self.path = root / SQLITE_FILE
        try:
            root.mkdir(parents=True, exist_ok=True)
            # Open while the server runs: the last connection to close removes the -wal and -shm files,
            # and the next one, a mere read, could not make them again on a full disk.
            self._keeps_wal_files = sqlite3.connect(self.path, timeout=60, check_same_thread=False)
            self._keeps_wal_files.execute("PRAGMA journal_mode=WAL")  # kept by the file
            self._keeps_wal_files.execute("SELECT count(*) FROM sqlite_master").fetchall()  # (a read opens them)
        except (OSError, sqlite3.Error) as exc:
            raise WanError(f"cannot use state directory {root}: {exc}", "give a writable --state-dir") from None
        self.liveness = FileLiveness(root / "owners")

    @contextmanager
    def transaction(self, *, write: bool):
        try:
            db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        except sqlite3.Error as exc:
            raise QueueUnreachable(exc) from exc
        db.row_factory = sqlite3.Row
        try:
            db.execute("PRAGMA synchronous=FULL")  # an accepted job survives a power cut too
            db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        except sqlite3.IntegrityError as exc:
            raise DuplicateKey(exc) from exc
        except sqlite3.Error as exc:
            raise QueueUnreachable(exc) from exc
        finally:
            db.close()

    def describe(self) -> str:
        return str(self.path)

    def close(self) -> None:
        self._keeps_wal_files.close()
        self.liveness.release()


def _add_missing_columns(db) -> None:
    """Give a queue an older version made the columns it lacks (the one SQL both databases take)."""
    present = {column[0] for column in db.execute("SELECT * FROM jobs LIMIT 0").description}
    for name, kind in ADDED_COLUMNS.items():
        if name not in present:
            db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {kind}")


def _make_private(root: Path) -> None:
    """Take away other users' access to what a server of another umask (or an older version) left
    here: the prompts, images and videos are private. Only this user's own files (a shared folder
    may hold other users')."""
    for path in (root, *root.rglob("*")):
        try:
            info = path.lstat()
            if info.st_uid == os.getuid() and not stat.S_ISLNK(info.st_mode):
                os.chmod(path, 0o700 if stat.S_ISDIR(info.st_mode) else 0o600)
        except FileNotFoundError:  # removed by another server meanwhile
            pass


class JobStore:
    """The queue (``queue_url``: PostgreSQL, else SQLite in ``state_dir``) and ``state_dir/jobs/<id>/``
    (the image, the saved denoising state, the mp4)."""

    def __init__(self, state_dir: str | Path, *, max_queued: int = 1000, queue_url: str | None = None):
        self.root = Path(state_dir)
        self.database: Queue
        if queue_url is None:
            self.database = SQLiteQueue(self.root)
        else:
            self.database = PostgresQueue(queue_url, self.root)  # (the folder checked before anything is written there)
        try:
            (self.root / "jobs").mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise WanError(f"cannot use state directory {self.root}: {exc}", "give a writable --state-dir") from None
        _make_private(self.root)
        self.max_queued = max_queued
        self._reachable = True  # the queue answered last time (its outages are logged once, not at every call)
        self.on_write: list[Callable[[], None]] = []  # told after each write this process commits (server.events)
        self.liveness = self.database.liveness
        self.owner = self.liveness.owner  # this server's name in the jobs it runs
        try:
            with self._db(write=True) as db:
                for statement in SCHEMA:
                    db.execute(statement.format(serial=self.database.serial, real=self.database.real))
                _add_missing_columns(db)
                db.execute("CREATE INDEX IF NOT EXISTS jobs_by_client ON jobs (client, seq)")
        except QueueUnreachable as exc:
            raise WanError(f"cannot use the queue {self.database.describe()}: {exc}", "check that it is writable") from None
        self._sweep()

    @staticmethod
    def _only(client: str | None) -> tuple[str, tuple]:
        """The condition that keeps ``client``'s jobs (None: every job), to follow a WHERE clause."""
        return ("", ()) if client is None else (" AND client = ?", (client,))

    @staticmethod
    def _scoped_key(key: str, client: str | None) -> str:
        """An idempotency key is its client's: two clients' same key names two jobs. (An HTTP header
        holds no control character, so no key stored as it came equals a client's.)"""
        return key if client is None else f"{client}\x1f{key}"

    def close(self) -> None:
        """Let go of the database (another server may then take over this one's running job)."""
        self.database.close()

    def _sweep(self) -> None:
        """Remove what a kill left behind: a job's folder written before its row was (the row never
        came) and the temporary files of writes cut short. All of them when no other server runs;
        otherwise only old ones: that server may be writing a new one now."""
        with self._db() as db:
            known = {row["id"] for row in db.execute("SELECT id FROM jobs")}
        old = time.time() - (SWEEP_AFTER_SECONDS if self.liveness.others_alive() else 0)

        def is_old(path: Path) -> bool:
            try:
                return path.stat().st_mtime < old
            except FileNotFoundError:  # renamed or removed by another server meanwhile
                return False

        for folder in (self.root / "jobs").iterdir():
            if folder.name not in known and is_old(folder):
                shutil.rmtree(folder, ignore_errors=True)
            elif folder.is_dir():
                for partial in folder.glob(".*"):  # write_atomically's temporary names
                    if is_old(partial):
                        partial.unlink(missing_ok=True)

    @contextmanager
    def _db(self, *, write: bool = False):
        """One transaction; ``write`` serializes it with every other writer of the queue."""
        try:
            with self.database.transaction(write=write) as db:
                yield db
        except QueueUnreachable as exc:
            if self._reachable:
                self._reachable = False
                log.warning("the job queue is unreachable (%s); trying again", exc)
            raise
        if not self._reachable:
            self._reachable = True
            log.warning("the job queue answers again")
        if write:
            for listener in self.on_write:
                listener()

    def _gone(self, db, owner: str | None) -> bool:
        """The server that owned a job has stopped (its lock is free)."""
        return owner is None or self.liveness.gone(owner, db)

    def job_dir(self, job_id: str) -> Path:
        return self.root / "jobs" / job_id

    def image_path(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "input"

    def last_image_path(self, job_id: str) -> Path:
        """The job's last frame, when it was given one."""
        return self.job_dir(job_id) / "last-input"

    def video_path(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "video.mp4"

    def state_path(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "state.pt"

    @staticmethod
    def _job(row) -> Job | None:
        if row is None:
            return None
        values = dict(row)
        values["settings"] = json.loads(values["settings"])
        return Job(**values)

    def submit(self, image: bytes | None, settings: dict, idempotency_key: str | None = None, client: str | None = None,
               last_image: bytes | None = None) -> tuple[Job, bool]:  # fmt: skip
        """Queue ``client``'s job (its image if given, and its last frame's, written first); returns
        (job, created). A key that client used before returns that key's job instead; a full queue is refused."""
        if idempotency_key is not None and (known := self.by_key(idempotency_key, client)) is not None:
            return known, False
        from wan_i2v.video import write_atomically

        job_id = f"video_{uuid.uuid4().hex}"
        directory = self.job_dir(job_id)
        directory.mkdir()
        try:
            if image is not None:
                write_atomically(self.image_path(job_id), lambda tmp: tmp.write_bytes(image))
            if last_image is not None:
                write_atomically(self.last_image_path(job_id), lambda tmp: tmp.write_bytes(last_image))
            with self._db(write=True) as db:
                queued = db.execute("SELECT count(*) AS n FROM jobs WHERE status = 'queued'").fetchone()["n"]
                if queued >= self.max_queued:
                    raise QueueFull(queued)
                db.execute(
                    "INSERT INTO jobs (id, idempotency_key, status, settings, client, created_at) VALUES (?, ?, 'queued', ?, ?, ?)",
                    (job_id, None if idempotency_key is None else self._scoped_key(idempotency_key, client), json.dumps(settings), client, time.time()),
                )
        except DuplicateKey:  # the same key, submitted at the same moment by another request
            shutil.rmtree(directory, ignore_errors=True)
            return self.by_key(idempotency_key, client), False
        except BaseException as exc:
            shutil.rmtree(directory, ignore_errors=True)
            if is_disk_full(exc):
                raise DiskFull(f"disk full: no room in {self.root} for a new job") from None
            raise
        return self.get(job_id), True

    def by_key(self, key: str, client: str | None = None) -> Job | None:
        """The job ``client`` submitted with this idempotency key."""
        with self._db() as db:
            return self._job(db.execute("SELECT * FROM jobs WHERE idempotency_key = ?", (self._scoped_key(key, client),)).fetchone())

    def get(self, job_id: str, client: str | None = None) -> Job | None:
        """The job, if it is ``client``'s (None: anyone's)."""
        only, mine = self._only(client)
        with self._db() as db:
            return self._job(db.execute("SELECT * FROM jobs WHERE id = ?" + only, (job_id, *mine)).fetchone())

    def jobs(self, job_ids: Collection[str]) -> dict[str, Job]:
        """The jobs of these ids that exist, read in one query."""
        with self._db() as db:
            rows = db.execute(f"SELECT * FROM jobs WHERE id IN ({', '.join('?' * len(job_ids))})", tuple(job_ids)).fetchall()
        return {row["id"]: self._job(row) for row in rows}

    def list(self, *, limit: int = 20, after: str | None = None, client: str | None = None) -> tuple[list[Job], bool]:
        """Newest first, ``limit`` at a time, after the job ``after``; and whether more follow.
        ``client``: that client's jobs only (None: every job)."""
        only, mine = self._only(client)
        with self._db() as db:
            start = db.execute("SELECT seq FROM jobs WHERE id = ?" + only, (after, *mine)).fetchone() if after else None
            if after and start is None:
                raise KeyError(after)
            rows = db.execute(
                "SELECT * FROM jobs WHERE seq < ?" + only + " ORDER BY seq DESC LIMIT ?", (start["seq"] if start else 2**63 - 1, *mine, limit + 1)
            ).fetchall()
        return [self._job(row) for row in rows[:limit]], len(rows) > limit

    def latest_measures(self) -> tuple[float | None, float | None]:
        """(seconds per step, peak GPU memory in GiB) of the latest job that measured them."""
        with self._db() as db:
            speed = db.execute("SELECT seconds_per_step FROM jobs WHERE seconds_per_step IS NOT NULL"
                               " ORDER BY coalesce(completed_at, started_at) DESC LIMIT 1").fetchone()  # fmt: skip
            memory = db.execute("SELECT peak_memory_gb FROM jobs WHERE peak_memory_gb IS NOT NULL ORDER BY completed_at DESC LIMIT 1").fetchone()
        return (speed and speed["seconds_per_step"]), (memory and memory["peak_memory_gb"])

    def counts(self) -> dict[str, int]:
        with self._db() as db:
            found = {row["status"]: row["n"] for row in db.execute("SELECT status, count(*) AS n FROM jobs GROUP BY status")}
        return {status: found.get(status, 0) for status in STATUSES}

    def claim(self) -> Job | None:
        """The next job to run, now this process's: a running job whose server died (it resumes from
        its saved step), else the oldest queued one. A job whose server died while it ran fails
        instead of starving the queue (it may be what kills them): at once when the OOM killer struck
        meanwhile, else after ``MAX_RUNS`` deaths. A job of this server's own (one job at a time: it is
        not running it) is taken again, whatever its runs: a claim whose commit went through while
        its answer was lost on the way back, not a death."""
        kills_now = memory_kills.count_now()
        with self._db(write=True) as db:
            taken, now = None, time.time()
            for row in db.execute("SELECT * FROM jobs WHERE status = 'in_progress' ORDER BY seq").fetchall():
                if row["owner"] != self.owner:  # (its own: taken again)
                    if not self._gone(db, row["owner"]):
                        continue
                    if (death := self._death_to_fail(self._job(row))) is not None:
                        db.execute("UPDATE jobs SET status = 'failed', error = ?, completed_at = ?, owner = NULL WHERE id = ?", (death, now, row["id"]))
                        continue
                taken = row["id"]
                break
            if taken is None:
                row = db.execute("SELECT id FROM jobs WHERE status = 'queued' ORDER BY seq LIMIT 1").fetchone()
                taken = None if row is None else row["id"]
            if taken is None:
                return None
            db.execute("UPDATE jobs SET status = 'in_progress', owner = ?, runs = runs + 1, started_at = coalesce(started_at, ?),"
                       " memory_kills_at_start = ?, error = NULL WHERE id = ?", (self.owner, now, kills_now, taken))  # fmt: skip
            return self._job(db.execute("SELECT * FROM jobs WHERE id = ?", (taken,)).fetchone())

    def _death_to_fail(self, job: Job) -> str | None:
        """Why a job whose server died while running it fails rather than runs again (None: it runs again)."""
        if self.video_path(job.id).is_file():  # its video was made before the death: only its end is to record
            return None
        if memory_kills.killed_since(job.memory_kills_at_start):
            return (f"the server was killed for lack of memory while this job ran (size {job.settings['size']}, frame_num "
                    f"{job.settings['frame_num']}); try a smaller size or fewer frames, or give the server more memory")  # fmt: skip
        if job.runs >= MAX_RUNS:
            return f"the server stopped {job.runs} times while running this job (a crash, or out of host memory?)"
        return None

    def cancelled(self, job_id: str) -> bool:
        """Someone cancelled or deleted the job (rather than another server taking it over)."""
        job = self.get(job_id)
        return job is None or job.status == "cancelled"

    def still_mine(self, job_id: str) -> bool:
        """The job is running here and nobody has cancelled it."""
        with self._db() as db:
            row = db.execute("SELECT status, owner FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return row is not None and row["status"] == "in_progress" and row["owner"] == self.owner

    def progress(self, job_id: str, step: int, seconds_per_step: float | None) -> None:
        with self._db(write=True) as db:
            db.execute("UPDATE jobs SET step = ?, seconds_per_step = coalesce(?, seconds_per_step) WHERE id = ? AND owner = ?",
                       (step, seconds_per_step, job_id, self.owner))  # fmt: skip

    def finish(self, job_id: str, status: str, *, error: str | None = None, peak_memory_gb: float | None = None) -> bool:
        """Record a running job's end; False if it was no longer this process's to finish (cancelled, or taken over)."""
        assert status in FINISHED
        with self._db(write=True) as db:
            changed = db.execute(
                "UPDATE jobs SET status = ?, error = ?, completed_at = ?, peak_memory_gb = ?, owner = NULL"
                " WHERE id = ? AND status = 'in_progress' AND owner = ?",
                (status, error, time.time(), peak_memory_gb, job_id, self.owner),
            ).rowcount
        if changed or self.cancelled(job_id):  # not when another server took it over: the state is its own now
            self.state_path(job_id).unlink(missing_ok=True)
        return bool(changed)

    def release(self, job_id: str, why: str | None = None) -> None:
        """Put a job this process stops running back at the queue's head: the server is shutting down,
        or the disk is full (``why`` tells its clients so until it runs again)."""
        with self._db(write=True) as db:
            db.execute("UPDATE jobs SET status = 'queued', owner = NULL, runs = runs - 1, error = ? WHERE id = ? AND status = 'in_progress' AND owner = ?",
                       (why, job_id, self.owner))  # fmt: skip (neither is a run that died)

    def cancel(self, job_id: str) -> Job | None:
        """Cancel a queued or running job (a running one stops at its next step: the runner sees it
        is no longer its own)."""
        with self._db(write=True) as db:
            db.execute(
                "UPDATE jobs SET status = 'cancelled', completed_at = ?, owner = NULL WHERE id = ? AND status IN ('queued', 'in_progress')",
                (time.time(), job_id),
            )
        return self.get(job_id)

    def delete(self, job_id: str) -> bool:
        """Remove a finished job: its row and its files."""
        with self._db(write=True) as db:
            gone = db.execute(f"DELETE FROM jobs WHERE id = ? AND status IN {FINISHED}", (job_id,)).rowcount
        if gone:
            shutil.rmtree(self.job_dir(job_id), ignore_errors=True)
        return bool(gone)


class QueueFull(Exception):
    def __init__(self, queued: int):
        super().__init__(f"the queue is full ({counted(queued, 'job')} waiting)")
