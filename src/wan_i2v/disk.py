"""Disk space: a write that cannot fit is refused before the work that leads to it (a download, a run)."""

from __future__ import annotations

import shutil
from pathlib import Path

from wan_i2v.errors import WanError


def human_size(n: float) -> str:
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    power = 0
    while n >= 1024 and power < len(units) - 1:
        n /= 1024
        power += 1
    return f"{n:.0f} B" if power == 0 else f"{n:.1f} {units[power]}"


def check_space(directory: Path, needed: int, hint: str) -> None:
    free = shutil.disk_usage(directory).free
    if needed > free:
        raise WanError(f"not enough disk space in {directory}: {human_size(needed)} to write, {human_size(free)} free", hint)
