"""Several GPUs for one video: CFG parallel x Ulysses sequence parallel, FSDP, a split VAE decode.

Applied from outside the models, each technique as its own function, in a fixed order
(torchtitan's shape): ``apply_ulysses`` (replaces the DiT's sequence and attention seams),
then compile, then ``apply_fsdp`` on the meta device, before the weights load (``execution.EXPERT_TRANSFORMS``
holds the order). The plan (``ParallelDims``) is pure data;
``ParallelGroups`` is the plan built into process groups for this rank.
"""

from __future__ import annotations

from wan_i2v.parallel.fsdp import apply_fsdp
from wan_i2v.parallel.groups import ParallelGroups, init_distributed, launched
from wan_i2v.parallel.plan import MemoryEstimate, ModelSizes, ParallelDims, choose_plan, estimate_memory
from wan_i2v.parallel.ulysses import apply_ulysses

__all__ = [
    "MemoryEstimate",
    "ModelSizes",
    "ParallelDims",
    "ParallelGroups",
    "apply_fsdp",
    "apply_ulysses",
    "choose_plan",
    "estimate_memory",
    "init_distributed",
    "launched",
]
