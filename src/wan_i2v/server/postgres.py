"""The job queue in PostgreSQL, for servers on several machines (``wan-i2v serve --queue URL``).

The jobs' files stay in the state directory, which every server then mounts from shared storage
(NFS, a cloud file share): the uploaded image one server took in is the one another server runs,
and any server answers for any job's video. The database checks that each server was given that
same folder.

A server is alive while it holds a session advisory lock named by its owner id, on a connection of
its own: PostgreSQL drops the lock when that connection ends, however the server ends (``kill -9``,
a lost machine once TCP keepalives notice, a pod restarted elsewhere). Writing transactions take
one transaction-level advisory lock, so that a claim sees every other claim whole, as SQLite's
single writer does; at one write per denoising step per server this is far from a bottleneck.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

from wan_i2v.errors import WanError, first_line
from wan_i2v.server.queue import FOLDER_MARK, SQLITE_FILE, DuplicateKey, QueueUnreachable

log = logging.getLogger("wan_i2v.server")

# The first key of the writers' lock (two 32-bit keys: apart from the owners' single 64-bit keys).
WRITERS_LOCK = (0x57414E, 1)  # "WAN"
# A machine that vanishes without closing its connection is noticed within about a minute.
KEEPALIVES = {"keepalives": 1, "keepalives_idle": 20, "keepalives_interval": 10, "keepalives_count": 3}
SERVER_KEEPALIVES = "SET tcp_keepalives_idle = 20; SET tcp_keepalives_interval = 10; SET tcp_keepalives_count = 3"
# The owner's thread takes its lock again this often, and another server takes over a job once its
# owner's lock has been free this long (a database restart frees every lock at once).
KEEP_EVERY_SECONDS = 1.0
TAKEOVER_GRACE_SECONDS = 10.0
POOL_SIZE = 4  # connections a server uses for the queue at most, besides its liveness connection
# How long a request waits for a connection before it is told the queue is unreachable (503); less
# while the last attempt failed.
POOL_WAIT_SECONDS = 5
POOL_WAIT_SECONDS_WHILE_DOWN = 0.5

FOLDER_TABLE = "CREATE TABLE IF NOT EXISTS shared_folder (id TEXT NOT NULL)"


def _psycopg():
    try:
        import psycopg
        import psycopg_pool
    except ImportError:
        raise WanError("a PostgreSQL --queue needs the psycopg package", "pip install 'wan-i2v[postgres]'") from None
    return psycopg, psycopg_pool


URL_OPTION = "--queue or WAN_I2V_QUEUE"
URL_HINT = "postgresql://USER:PASSWORD@HOST:PORT/DATABASE, with @ / # ? in the user or password written %40 %2F %23 %3F (or the password in PGPASSWORD or ~/.pgpass)"


def check_url(url: str) -> None:
    """Refuse a user or password that is not percent-encoded where it must be: the URL would then be
    read with a piece of the password as the host or the database, and messages would show it."""
    user_info = url.partition("://")[2].rpartition("@")[0]
    if any(character in user_info for character in "@/#?"):
        raise WanError(f"the user or password in the queue URL ({URL_OPTION}) has a character that must be percent-encoded "
                       "(the URL is not repeated here)", URL_HINT)  # fmt: skip


def describe(url: str) -> str:
    """The database a URL names, without its password (for messages and logs)."""
    psycopg, _ = _psycopg()
    try:
        parts = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "the PostgreSQL database given"
    host, database = parts.get("host") or "localhost", parts.get("dbname") or parts.get("user") or ""
    if host.startswith("/"):  # a unix socket's folder
        return f"postgresql:///{database}?host={host}"
    port = f":{parts['port']}" if parts.get("port") else ""
    return f"postgresql://{host}{port}/{database}"


class AdvisoryLockLiveness:
    """Whether the server that owns a job still runs. Each server holds a session advisory lock named by
    its id, on a connection of its own that a thread keeps (taken again within about a second when the
    connection was cut, or the database restarted: every lock is gone then, also the live servers').
    So a free lock is a server gone only once it has stayed free for ``TAKEOVER_GRACE_SECONDS``, as the
    server that would take over the job sees it."""

    owner: str  # this server's name in the jobs it runs

    def __init__(self, connect):
        self._connect = connect
        self.owner = uuid.uuid4().hex
        self._held = None
        self._free_since: dict[str, float] = {}  # owners whose lock this server saw free, since when
        if not self._take():
            raise QueueUnreachable("this server's new lock is held already")
        self._stopped = threading.Event()
        self._keeper = threading.Thread(target=self._keep, name="wan-i2v-liveness", daemon=True)
        self._keeper.start()

    @staticmethod
    def key(owner: str) -> int:
        return int(owner[:16], 16) >> 1  # 63 bits: a bigint

    def _take(self) -> bool:
        """Hold the lock (on a new connection if the last was lost); whether it is held now."""
        if self._held is None or self._held.closed or self._held.broken:
            connection = self._connect(autocommit=True, **KEEPALIVES)
            try:
                connection.execute(SERVER_KEEPALIVES)  # the database's side notices a vanished machine too
                # Timeouts a database may set for everyone would cut this idle connection, and the lock with it.
                connection.execute("SET statement_timeout = 0")
                if connection.info.server_version >= 140000:
                    connection.execute("SET idle_session_timeout = 0")
            except BaseException:
                connection.close()
                raise
            if self._held is not None:
                self._held.close()
            self._held = connection
        key = self.key(self.owner)
        # Not stacked when held already; a claim elsewhere may hold it for a moment (try again later).
        return self._held.execute(
            "SELECT CASE WHEN EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()"
            " AND objsubid = 1 AND classid = %s::bigint::oid AND objid = %s::bigint::oid) THEN true ELSE pg_try_advisory_lock(%s) END",
            (key >> 32, key & 0xFFFFFFFF, key),
        ).fetchone()[0]  # fmt: skip

    def _keep(self) -> None:
        psycopg, _ = _psycopg()
        while not self._stopped.wait(KEEP_EVERY_SECONDS):
            try:
                self._take()
            except psycopg.Error as exc:
                log.debug("the liveness lock's connection: %s", first_line(exc))
                if self._held is not None:
                    self._held.close()  # a new one next time

    def others_alive(self) -> bool:
        """Whether another server may be writing in the shared folder now: assumed so (servers on other
        machines come and go, and a lock seen free may be one being taken again), so what a kill left
        there is swept by age."""
        return True

    def release(self) -> None:
        self._stopped.set()
        self._keeper.join()
        if self._held is not None:
            self._held.close()

    def gone(self, owner: str, db) -> bool:
        # Taken for this transaction only, so it is never kept.
        free = db.execute("SELECT pg_try_advisory_xact_lock(?) AS free", (self.key(owner),)).fetchone()["free"]
        if not free:
            self._free_since.pop(owner, None)
            return False
        now = time.monotonic()
        return now - self._free_since.setdefault(owner, now) >= TAKEOVER_GRACE_SECONDS


class _Statements:
    """A connection that takes the queue's SQL as SQLite spells its parameters (``?``)."""

    def __init__(self, connection):
        self.connection = connection

    def execute(self, sql: str, parameters=()):
        return self.connection.execute(sql.replace("?", "%s"), parameters)


class PostgresQueue:
    """The queue in a PostgreSQL database, for servers on several machines."""

    serial, real = "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY", "DOUBLE PRECISION"
    liveness: AdvisoryLockLiveness

    def __init__(self, url: str, folder: Path):
        psycopg, psycopg_pool = _psycopg()
        self.url = url
        self._errors = (psycopg.Error, psycopg_pool.PoolTimeout)
        self._duplicate = psycopg.errors.UniqueViolation
        self._answered = True
        check_url(url)
        # Its reconnection attempts would fill the log during an outage, which the store reports once.
        logging.getLogger("psycopg.pool").setLevel(logging.ERROR)

        def connect(**options):
            return psycopg.connect(url, connect_timeout=10, **options)

        try:
            self.liveness = AdvisoryLockLiveness(connect)
        except psycopg.ProgrammingError:  # the URL does not parse: its text may hold the password
            raise WanError(f"the queue URL ({URL_OPTION}) does not parse (not repeated here: it may hold a password)", URL_HINT) from None
        except psycopg.Error as exc:
            raise WanError(f"cannot reach the queue database {describe(url)}: {first_line(exc)}",
                           f"check the queue URL ({URL_OPTION}) and that the database runs") from None  # fmt: skip

        def configure(connection) -> None:  # a database's default may be stricter: the writers' lock needs this one
            connection.isolation_level = psycopg.IsolationLevel.READ_COMMITTED

        self.pool = psycopg_pool.ConnectionPool(
            url, min_size=1, max_size=POOL_SIZE, open=True, check=psycopg_pool.ConnectionPool.check_connection, configure=configure,
            kwargs={"row_factory": psycopg.rows.dict_row, "connect_timeout": 10, **KEEPALIVES},
        )  # fmt: skip
        try:
            self._check_folder(folder)
        except BaseException:  # refused: its lock, its keeper thread and its pool go
            self.close()
            raise

    def describe(self) -> str:
        return describe(self.url)

    def close(self) -> None:
        self.pool.close()
        self.liveness.release()

    @contextmanager
    def transaction(self, *, write: bool):
        try:
            # While the database is known to be down, callers (a load balancer's health check) hear so at once.
            with self.pool.connection(timeout=POOL_WAIT_SECONDS if self._answered else POOL_WAIT_SECONDS_WHILE_DOWN) as connection:
                if write:
                    connection.execute("SELECT pg_advisory_xact_lock(%s, %s)", WRITERS_LOCK)
                yield _Statements(connection)  # committed at the end, rolled back on an error
        except self._duplicate as exc:
            raise DuplicateKey(exc) from exc
        except self._errors as exc:
            self._answered = False
            raise QueueUnreachable(first_line(exc)) from exc
        self._answered = True

    def _check_folder(self, folder: Path) -> None:
        """Every server of this queue must be given the same shared folder: the first one marks it, and
        the database keeps the mark."""
        from wan_i2v.video import write_atomically

        mark = folder / FOLDER_MARK
        try:
            with self.transaction(write=True) as db:
                db.execute(FOLDER_TABLE)
                known = db.execute("SELECT id FROM shared_folder").fetchone()
                found = mark.read_text().strip() if mark.is_file() else None
                if known is None:  # a new queue: its folder must be new too, or its jobs would be another queue's
                    if found is not None:
                        raise WanError(f"--state-dir {folder} is the shared folder of another PostgreSQL queue",
                                       f"give that queue's --queue URL, or another --state-dir (or remove {mark} if that queue is gone)")  # fmt: skip
                    if (folder / SQLITE_FILE).exists() or any((folder / "jobs").glob("*")):
                        raise WanError(f"--state-dir {folder} holds the jobs of a queue in SQLite", "give the PostgreSQL queue a folder of its own")
                    found = uuid.uuid4().hex
                    folder.mkdir(parents=True, exist_ok=True)
                    write_atomically(mark, lambda tmp: tmp.write_text(found + "\n"))
                    db.execute("INSERT INTO shared_folder (id) VALUES (?)", (found,))
                elif known["id"] != found:
                    raise WanError(f"--state-dir {folder} is not the folder the other servers of the queue {self.describe()} use",
                                   "mount the same shared folder on every server and give it as --state-dir")  # fmt: skip
        except QueueUnreachable as exc:
            raise WanError(f"cannot use the queue database {self.describe()}: {exc}", "check that its user may create tables") from None
