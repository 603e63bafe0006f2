"""Whether the kernel's OOM killer struck while a job ran. A server it killed would be killed again by the
same job after every restart, so such a job fails at once instead of being retried; a server killed
otherwise (kill -9, a lost pod) has its job resumed as before.

Linux (4.13 or newer) counts the processes its OOM killer has killed since boot: the ``oom_kill`` line
of ``/proc/vmstat``. A job's start records that count with the boot's id; when its server is found
dead, a count that went up in the same boot means the kernel killed for lack of memory while the job
ran. The count is the machine's (containers see the host's, which a restarted container's cgroup would
not keep): a process killed elsewhere at the moment the server died otherwise counts too.
"""

from __future__ import annotations

import os
from pathlib import Path

BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def _kernel_counters() -> Path:
    # $WAN_I2V_VMSTAT: a file of the same lines instead (the tests' stand-in for the OOM killer's count)
    return Path(os.environ.get("WAN_I2V_VMSTAT", "/proc/vmstat"))


def count_now() -> str | None:
    """The OOM kills since boot, with the boot they count from (``"BOOT_ID COUNT"``); None where the
    kernel does not say (not Linux, or older than 4.13)."""
    try:
        boot = BOOT_ID.read_text().strip()
        for line in _kernel_counters().read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == "oom_kill":
                return f"{boot} {int(value)}"
    except (OSError, ValueError):
        pass
    return None


def killed_since(at_start: str | None) -> bool:
    """The OOM killer has killed since ``at_start`` (``count_now()`` then), in the same boot."""
    now = count_now()
    if at_start is None or now is None:
        return False
    boot_then, _, kills_then = at_start.partition(" ")
    boot_now, _, kills_now = now.partition(" ")
    return boot_now == boot_then and int(kills_now) > int(kills_then)
