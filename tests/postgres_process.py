"""A throwaway PostgreSQL server for the shared queue's tests: Debian's package, run from a folder of
its own on a unix socket (no port, no password), one database per test."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path


def binary(name: str) -> str | None:
    """Debian keeps the server's programs out of PATH, in /usr/lib/postgresql/VERSION/bin."""
    return shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)


class Postgres:
    def __init__(self):
        # A short path: a unix socket's name is limited to about 100 characters.
        self.directory = Path(tempfile.mkdtemp(prefix="wan-pg-"))
        self.data = self.directory / "data"
        self.log = self.directory / "server.log"
        # PostgreSQL refuses to run as root: the package's own user runs it then.
        self.user = "postgres" if os.geteuid() == 0 else None
        self.log.touch()
        if self.user:
            shutil.chown(self.directory, self.user)
            shutil.chown(self.log, self.user)
        self.process: subprocess.Popen | None = None
        self.databases = 0

    def start(self) -> Postgres:
        """Start the server: a new cluster the first time, the same one again after ``stop``."""
        if not (self.data / "PG_VERSION").exists():
            subprocess.run([binary("initdb"), "-D", str(self.data), "-U", "wan", "--auth=trust", "--no-sync", "-E", "UTF8"],
                           user=self.user, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
        with open(self.log, "a") as log:
            self.process = subprocess.Popen(
                [binary("postgres"), "-D", str(self.data), "-k", str(self.directory), "-c", "listen_addresses=",
                 "-c", "fsync=off", "-c", "max_connections=200"],
                user=self.user, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        import psycopg

        # The socket appears before the server takes connections ("the database system is starting up"
        # on a loaded machine): it has started once a connection is accepted.
        deadline = time.monotonic() + 60
        while True:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL did not start:\n{self.log.read_text()}")
            if (self.directory / ".s.PGSQL.5432").exists():
                try:
                    psycopg.connect(self.url(), connect_timeout=5).close()
                    return self
                except psycopg.OperationalError:
                    pass
            time.sleep(0.05)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://wan@/{database}?host={self.directory}"

    def new_database(self) -> str:
        import psycopg

        self.databases += 1
        name = f"queue{self.databases}"
        with psycopg.connect(self.url(), autocommit=True) as admin:
            admin.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self) -> None:
        """A fast shutdown: connected clients are cut, as in a database's restart or failover."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            self.process.wait(timeout=30)

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)
