"""Whether the kernel's OOM killer struck while a job ran. A server it killed would be killed again by the
same job after every restart, so such a job fails at once instead of being retried; a server killed
otherwise (kill -9, a lost pod) has its job resumed as before.

Linux counts the processes its OOM killer has killed: since boot in ``/proc/vmstat`` (4.13 or newer),
and per cgroup in a cgroup v2's ``memory.events`` (the victims in it and below it). A job's start
records both with the boot's id; when its server is found dead, a count that went up in the same boot
means the kernel killed for lack of memory while the job ran. The server's own cgroup's count, when
the new server is in that same cgroup (a restart by hand, a CI job), tells only of its own processes;
in another cgroup (a restarted container gets a new one, whose count starts at 0) the machine's count
decides, which also counts processes killed elsewhere meanwhile.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def _system_root() -> Path:
    # $WAN_I2V_SYSTEM_ROOT: a folder standing for / where proc/ and sys/ are read (the tests' stand-in for the kernel)
    return Path(os.environ.get("WAN_I2V_SYSTEM_ROOT", "/"))


def _oom_kills(counters: Path) -> int | None:
    """The ``oom_kill`` line of a file of ``NAME VALUE`` lines (vmstat, memory.events)."""
    try:
        for line in counters.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == "oom_kill":
                return int(value)
    except (OSError, ValueError):
        pass
    return None


def _own_cgroup(root: Path) -> tuple[int, int] | None:
    """(the identity, the OOM kills) of this process's cgroup v2 (None: cgroup v1, or no memory controller)."""
    try:
        lines = (root / "proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("0::"):
            folder = root / "sys/fs/cgroup" / line[3:].lstrip("/")
            kills = _oom_kills(folder / "memory.events")
            try:
                return None if kills is None else (folder.stat().st_ino, kills)  # (a cgroup made again has a new inode)
            except OSError:  # gone meanwhile
                return None
    return None


def count_now() -> str | None:
    """The OOM kills now, with the boot they count from (to store; ``killed_since`` reads it back);
    None where the kernel does not say (not Linux, or older than 4.13)."""
    root = _system_root()
    try:
        boot = (root / "proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None
    machine = _oom_kills(root / "proc/vmstat")
    if machine is None:
        return None
    return json.dumps({"boot": boot, "machine": machine, "cgroup": _own_cgroup(root)})


def killed_since(at_start: str | None) -> bool:
    """The OOM killer has killed since ``at_start`` (``count_now()`` then), in the same boot: in this
    process's cgroup when it is the one counted then, else on the machine."""
    now = count_now()
    if at_start is None or now is None:
        return False
    then, now = json.loads(at_start), json.loads(now)
    if then["boot"] != now["boot"]:
        return False
    if then["cgroup"] and now["cgroup"] and then["cgroup"][0] == now["cgroup"][0]:
        return now["cgroup"][1] > then["cgroup"][1]
    return now["machine"] > then["machine"]
