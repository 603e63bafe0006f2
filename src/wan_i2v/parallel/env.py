"""What the launcher (torchrun, ``--gpus N``, a cluster's) says about this process, from the
environment alone: no torch, so that the cheap commands can ask it."""

from __future__ import annotations

import os


def env_world() -> int:
    """The launcher's WORLD_SIZE (1 outside a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def env_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def launched() -> bool:
    """True in a process started by torchrun, ``--gpus N`` or a cluster launcher (WORLD_SIZE > 1)."""
    return env_world() > 1
