"""What the job store needs of the database that holds its queue's table, which SQLite
(``server.store``: the servers of one machine) and PostgreSQL (``server.postgres``: servers on several
machines) both provide, and what the two share. Both import this module, and neither the other."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Protocol

FOLDER_MARK = "queue-id"  # in the shared folder of a PostgreSQL queue
SQLITE_FILE = "queue.sqlite3"  # in the state directory of a SQLite queue


class QueueUnreachable(Exception):
    """The queue's database cannot be read or written for now (a full disk, a lost connection)."""


class DuplicateKey(Exception):
    """An insert clashed with a unique key (the same idempotency key, submitted twice at once)."""


class Liveness(Protocol):
    """Whether the servers that own jobs still run."""

    owner: str  # this server's name in the jobs it runs

    def others_alive(self) -> bool:
        """Whether another server of this queue may be writing in the state directory now."""

    def gone(self, owner: str, db) -> bool:
        """The server named ``owner`` has stopped (asked inside a writing transaction ``db``)."""

    def release(self) -> None:
        """Stop being alive (another server may then take over this one's jobs)."""


class Queue(Protocol):
    """A database holding the jobs table, with the SQL types its schema needs, spoken with SQLite's ``?``
    parameters and rows read by column name."""

    serial: str  # the auto-increment key's column type
    real: str  # a 64-bit float's column type
    liveness: Liveness

    def transaction(self, *, write: bool) -> AbstractContextManager[Any]:
        """One transaction (``write``: serialized with every other writer of the queue), committed
        when the block ends; QueueUnreachable when the database does not answer, DuplicateKey on a
        unique key's clash."""

    def describe(self) -> str:
        """The database, for messages (without a password)."""

    def close(self) -> None:
        """Let go of the database."""
