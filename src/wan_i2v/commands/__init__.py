"""The commands of `wan-i2v`, a module each (``run(args) -> exit code``), imported only when the
command runs: they import torch, which --help and --version never do.

What the command line and the commands both need is here, torch-free. (The commands never import
``wan_i2v.cli``: run as ``python -m wan_i2v.cli`` it is ``__main__``, and would be imported twice.)"""

from __future__ import annotations

import os
import time
from pathlib import Path

from wan_i2v.parallel.env import env_rank

DEMO_FILE = "wan-i2v-demo.mp4"
DEFAULT_OUTPUT = "wan-i2v-output.mp4"

# When this process started: the summary says how long the first denoising step took to come.
STARTED = time.perf_counter()


def home() -> Path:
    return Path(os.environ.get("WAN_I2V_HOME") or Path.home() / ".cache" / "wan-i2v")


def is_main() -> bool:
    return env_rank() == 0
