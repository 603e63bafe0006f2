"""``--gpus N``: start N local processes through torch.distributed.run's API, as ``torchrun
--standalone`` would (rendezvous on a free port, so two runs side by side do not collide).

If one rank raises or dies, the launcher stops the others at once and reports the first
failure: each rank writes what it raised to a shared folder and the earliest record wins. A
rank whose collective broke because a peer vanished records that as secondary and lingers a
moment before exiting, so that the launcher sees the peer's death first. Ctrl-C stops every rank,
and so does SIGTERM (a pod stopping sends it to every process): each rank stops as after Ctrl-C.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import signal
import tempfile
import time
import traceback
import uuid
from pathlib import Path

from wan_i2v.errors import INTERRUPTED, TERMINATED, Terminated, WanError, command_line, is_out_of_memory, on_the_command_line, option, stop_on_sigterm
from wan_i2v.parallel.groups import env_rank


class RankFailed(WanError):
    """A rank of a multi-process run failed; ``message`` is what it raised."""

    def __init__(self, rank: int, message: str, hint: str | None = None):
        super().__init__(message, hint)
        self.rank = rank


def _lost_peer(exc: BaseException) -> bool:
    """A collective failed because another rank is gone (a consequence, not a cause)."""
    import torch.distributed as dist

    text = str(exc)
    return isinstance(exc, dist.DistError) or any(s in text for s in ("Connection closed by peer", "Connection reset", "NCCL", "gloo"))


def _record(error_dir: str, exc: BaseException) -> str:
    rank = env_rank()
    if isinstance(exc, Terminated):
        kind, message = "terminated", "stopped by SIGTERM"
    elif isinstance(exc, KeyboardInterrupt):
        kind, message = "interrupt", "interrupted"
    elif isinstance(exc, WanError):
        kind, message = "wan", str(exc)
    elif is_out_of_memory(exc):
        kind, message = "wan", f"rank {rank} ran out of GPU memory (try {option('offload')}, {option('fsdp')}, more GPUs or a smaller video)"
    elif _lost_peer(exc):
        kind, message = "peer", f"{type(exc).__name__}: {exc}"
    else:
        kind, message = "crash", f"{type(exc).__name__}: {exc}"
        traceback.print_exc()  # a crash keeps its traceback, once, from the rank that had it
    record = {"rank": rank, "time": time.time(), "kind": kind, "message": message}
    path = Path(error_dir) / f"rank{rank}.json"
    path.with_suffix(".tmp").write_text(json.dumps(record))
    path.with_suffix(".tmp").replace(path)
    return kind


def _worker(fn, args: tuple, error_dir: str, for_command_line: bool):
    stop_on_sigterm()
    try:
        with on_the_command_line() if for_command_line else contextlib.nullcontext():  # errors spelled as in the caller
            return fn(*args)
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):  # the launcher forwards Ctrl-C too: once is enough
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        if _record(error_dir, exc) == "peer":
            time.sleep(1)  # let the launcher (polling every 0.1 s) find the peer that died first
        raise SystemExit(TERMINATED if isinstance(exc, Terminated) else INTERRUPTED if isinstance(exc, KeyboardInterrupt) else 1) from None


# What a rank records when it fails because of another's failure: a collective broken by a peer that
# vanished, or the SIGTERM with which the launcher stops the other ranks once one has failed.
SECONDARY = ("peer", "terminated")


def _first_failure(error_dir: str, failed_rank: int) -> dict | None:
    """The earliest record of a rank's own failure; else None if ``failed_rank`` (the first the
    launcher saw exit) left no record, having died hard; else the earliest secondary record (every
    rank stopped by SIGTERM, as when a pod stops, is that)."""
    records = [json.loads(p.read_text()) for p in Path(error_dir).glob("rank*.json")]
    order = sorted(records, key=lambda r: (r["kind"] in SECONDARY, r["time"], r["rank"]))
    if order and order[0]["kind"] not in SECONDARY:
        return order[0]
    if all(r["rank"] != failed_rank for r in records):
        return None
    return order[0]


# Seconds a stopped rank gets before SIGKILL, where the launcher lets us say.
SHUTDOWN_TIMEOUT_S = 10
# Launcher options that older torch lacks, left out there: shutdown_timeout came in torch 2.12
# (before it, a stopped rank gets the launcher's own 30 s).
NEWER_LAUNCH_OPTIONS = {"shutdown_timeout"}


def launch_config(config_class, **options):
    """``config_class(**options)``, less the newer options that this torch's ``config_class`` lacks."""
    known = {field.name for field in dataclasses.fields(config_class)}
    return config_class(**{name: value for name, value in options.items() if name in known or name not in NEWER_LAUNCH_OPTIONS})


def launch(fn, args: tuple, nprocs: int) -> dict[int, object]:
    """Run ``fn(*args)`` in ``nprocs`` new processes that form one process group (WORLD_SIZE,
    RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT set, as torchrun sets them). Returns each
    rank's return value; raises ``RankFailed`` with the first rank's error, or KeyboardInterrupt."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    for name in ("torch.distributed.elastic", "torch.distributed.launcher", "torch.multiprocessing"):
        logging.getLogger(name).setLevel(logging.CRITICAL)  # failures are reported once, below
    with tempfile.TemporaryDirectory(prefix="wan-i2v-run-") as tmp:
        error_dir = Path(tmp, "errors")
        error_dir.mkdir()
        config = launch_config(
            LaunchConfig,
            min_nodes=1,
            max_nodes=1,
            nproc_per_node=nprocs,
            run_id=str(uuid.uuid4()),
            rdzv_backend="c10d",
            rdzv_endpoint="127.0.0.1:0",  # a free port
            max_restarts=0,
            monitor_interval=0.1,
            start_method="spawn",
            logs_specs=DefaultLogsSpecs(log_dir=str(Path(tmp, "logs"))),
            shutdown_timeout=SHUTDOWN_TIMEOUT_S,
        )
        try:
            return elastic_launch(config, _worker)(fn, args, str(error_dir), command_line())
        except ChildFailedError as exc:
            rank, failure = exc.get_first_failure()
            first = _first_failure(str(error_dir), rank)
            if first is None:
                raise RankFailed(rank, f"rank {rank} exited with code {failure.exitcode}", "was it killed, out of host memory?") from None
            if first["kind"] == "interrupt":
                raise KeyboardInterrupt from None
            if first["kind"] == "terminated":
                raise Terminated from None
            if first["kind"] == "wan":
                raise RankFailed(first["rank"], first["message"]) from None
            raise RankFailed(first["rank"], f"rank {first['rank']} failed: {first['message']}", "its traceback is above") from None
        except SignalException:
            raise KeyboardInterrupt from None
        except Exception as exc:  # the launcher itself failed (rendezvous, spawning): no rank ran
            raise WanError(
                f"could not start {nprocs} processes: {type(exc).__name__}: {exc}",
                "start them with torchrun instead (README: torchrun and clusters)",
            ) from None
