"""The process groups of one run: started from the launcher's environment, split as the plan says."""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from wan_i2v.parallel.env import env_rank, env_world, launched  # noqa: F401 (the process's place, as the groups' module gives it)
from wan_i2v.parallel.plan import ParallelDims

# A collective that waits longer than this (a rank died without its launcher noticing) ends the run.
TIMEOUT_ENV = "WAN_I2V_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 600


def agree(value, device: torch.device, group=None, src: int = 0):
    """Rank ``src``'s ``value`` (any picklable object) on every rank of ``group``."""
    box = [value]
    dist.broadcast_object_list(box, src=src, group=group, device=device)
    return box[0]


def init_distributed(device_type: str) -> torch.device:
    """Join the process group described by RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT,
    unless this process has joined it already (under a launcher, planning joins it before the
    session opens); the device this rank runs on. A group still joined at exit (a run refused
    after its planning) is left then: NCCL warns of a group never destroyed.

    CUDA ranks use NCCL on ``cuda:LOCAL_RANK``; CPU ranks use gloo. Collectives time out after
    ``$WAN_I2V_DIST_TIMEOUT`` seconds (default 600), so a lost rank ends the run rather than hanging it.
    """
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if device_type == "cuda" else torch.device("cpu")
    if dist.is_initialized():
        return device
    timeout = timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
    if device_type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=timeout, device_id=device)
    else:
        dist.init_process_group("gloo", timeout=timeout)
    atexit.register(_leave_at_exit)
    return device


def _leave_at_exit() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@dataclass
class ParallelGroups:
    """The built plan: this rank's place in it and the groups its collectives run over.

    ``rank`` counts within the run (0 writes the video). ``ulysses`` and ``cfg`` are None where
    that degree is 1; ``mesh`` is the 1-D mesh of all the run's ranks that FSDP shards over.
    """

    dims: ParallelDims
    device: torch.device
    rank: int
    group: dist.ProcessGroup
    ulysses: dist.ProcessGroup | None
    cfg: dist.ProcessGroup | None
    src: int  # the global rank of the run's rank 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def cfg_index(self) -> int:
        """0: this rank runs the conditional pass, 1: the unconditional one."""
        return self.rank // self.dims.ulysses

    @property
    def mesh(self):
        from torch.distributed.device_mesh import DeviceMesh

        return DeviceMesh.from_group(self.group, self.device.type)

    @classmethod
    def build(cls, dims: ParallelDims, device: torch.device, ranks: list[int] | None = None) -> "ParallelGroups | None":
        """Split ``ranks`` (default: all) as ``dims`` says. Every process of the default group must call
        this with the same arguments (group creation is collective); those outside ``ranks`` get None."""
        ranks = list(range(dist.get_world_size())) if ranks is None else list(ranks)
        if len(ranks) != dims.world:
            raise ValueError(f"{dims} needs {dims.world} ranks, got {len(ranks)}")
        me, u = dist.get_rank(), dims.ulysses

        def new_group(members):
            group = dist.new_group(members) if len(members) > 1 else None
            return group if me in members else None

        whole = len(ranks) == dist.get_world_size()
        group = dist.group.WORLD if whole else dist.new_group(ranks)
        ulysses = [new_group(ranks[c * u : (c + 1) * u]) for c in range(dims.cfg)]
        cfg = [new_group(ranks[s::u]) for s in range(u)] if dims.cfg > 1 else []
        if me not in ranks:
            return None
        return cls(
            dims,
            torch.device(device),
            ranks.index(me),
            group,
            next((g for g in ulysses if g is not None), None),
            next((g for g in cfg if g is not None), None),
            ranks[0],
        )

    def any(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is true on any rank of the run."""
        box = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(box, op=dist.ReduceOp.MAX, group=self.group)
        return bool(box.item())

    def agree(self, value):
        """The run's rank 0's ``value`` on every rank (a random seed must be the same everywhere)."""
        return agree(value, self.device, self.group, self.src)
