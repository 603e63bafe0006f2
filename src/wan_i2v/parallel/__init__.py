"""Several GPUs for one video: CFG parallel x Ulysses sequence parallel, FSDP, a split VAE decode.

Applied from outside the models, each technique as its own function, in a fixed order
(torchtitan's shape): ``apply_ulysses`` (replaces the DiT's sequence and attention seams),
then ``apply_fsdp``; ``parallelize_model`` applies a plan to each model as the pipeline loads
it. The plan (``ParallelDims``) is pure data; ``ParallelGroups`` is the plan built into process
groups for this rank.
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
    "decode",
    "estimate_memory",
    "guidance",
    "init_distributed",
    "launched",
    "parallelize_model",
]


def parallelize_model(model, kind: str, groups: ParallelGroups, offload: bool = False):
    """Apply ``groups``' plan to one loaded model of the pipeline: an ``"expert"`` (a DiT) gets
    Ulysses and, in an FSDP plan, FSDP; the ``"text encoder"`` is sharded in every multi-rank run
    unless it waits in host memory (``offload`` without FSDP). ``offload`` with FSDP keeps the
    shards in pinned host memory (FSDP2's CPU offload; on the CPU there is nothing to offload)."""
    dims = groups.dims
    if kind == "expert":
        if groups.ulysses is not None:
            apply_ulysses(model, groups.ulysses)
        if dims.fsdp:
            apply_fsdp(model, model.blocks, groups.mesh, offload=offload and groups.device.type == "cuda")
    elif kind == "text encoder":
        if groups.dims.shards_text_encoder(offload):
            apply_fsdp(model.model, model.model.encoder.block, groups.mesh)
    else:
        raise ValueError(f"unknown model kind {kind!r}")
    return model
