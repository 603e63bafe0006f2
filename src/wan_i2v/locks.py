"""Exclusive locks on files that last as long as the process that holds them (``flock``: the kernel
drops a lock when its process ends, however it ends): which run writes an output, which servers of
a queue are alive."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO


def hold(path: Path) -> IO | None:
    """Lock ``path`` (created if missing) for this process: the lock lasts while the returned file
    stays open. None if another process holds it."""
    while True:
        handle = open(path, "a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return None
        # The holder before may have removed the file between our open and our lock: lock the one in place.
        try:
            if os.fstat(handle.fileno()).st_ino == os.stat(path).st_ino:
                return handle
        except FileNotFoundError:
            pass
        handle.close()


def held(path: Path) -> bool:
    """Another process (or another ``hold`` of this one) holds the lock on ``path`` now."""
    try:
        with open(path) as handle:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except FileNotFoundError:
        return False
    except BlockingIOError:
        return True
    return False
