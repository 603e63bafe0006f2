"""Several GPUs for one video: CFG parallel x Ulysses sequence parallel, FSDP, a split VAE decode.

Applied from outside the models, each technique as its own function, in a fixed order
(torchtitan's shape): ``apply_ulysses`` (replaces the DiT's sequence and attention seams),
then compile, then ``apply_fsdp`` on the meta device, before the weights load (``execution.EXPERT_TRANSFORMS``
holds the order). The plan (``ParallelDims``) is pure data;
``ParallelGroups`` is the plan built into process groups for this rank.
"""

from __future__ import annotations

import importlib

# Each name from its module when first asked for: ``wan_i2v.parallel.env`` and ``.plan`` are read by
# commands that must not wait for torch.
_HOMES = {
    "apply_fsdp": "fsdp", "ParallelGroups": "groups", "init_distributed": "groups", "launched": "env",
    "MemoryEstimate": "plan", "ModelSizes": "plan", "ParallelDims": "plan", "choose_plan": "plan", "estimate_memory": "plan",
    "apply_ulysses": "ulysses",
}  # fmt: skip


def __getattr__(name):
    if name in _HOMES:
        return getattr(importlib.import_module(f"wan_i2v.parallel.{_HOMES[name]}"), name)
    raise AttributeError(name)


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
