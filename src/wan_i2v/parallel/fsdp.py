"""FSDP2 applied from outside: one unit per transformer block, the rest in the root unit.

FSDP2 gathers a unit's parameters as one flat buffer, so a unit must hold one dtype. The DiT
keeps its norms, modulations and head in fp32 beside bf16 linear layers, so each block becomes
one unit per dtype: its compute-dtype layers as a group and the block itself holding the rest.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, fully_shard


def _unsharded_dtypes(module: nn.Module) -> set[torch.dtype]:
    """Dtypes of the parameters under ``module`` that no FSDP unit manages yet."""
    kinds = {p.dtype for p in module.parameters(recurse=False)}
    for child in module.children():
        if not isinstance(child, FSDPModule):
            kinds |= _unsharded_dtypes(child)
    return kinds


def _uniform_subtrees(module: nn.Module) -> dict[torch.dtype, list[nn.Module]]:
    """The largest submodules whose unsharded parameters share one dtype, by that dtype."""
    found: dict[torch.dtype, dict[int, nn.Module]] = defaultdict(dict)

    def visit(parent):
        for child in parent.children():
            if isinstance(child, FSDPModule):
                continue
            kinds = _unsharded_dtypes(child)
            if len(kinds) == 1:
                found[kinds.pop()][id(child)] = child  # by id: a shared module is listed once
            elif kinds:
                visit(child)  # mixed: its own parameters, if any, stay with ``module``'s unit

    visit(module)
    return {dtype: list(units.values()) for dtype, units in found.items()}


def shard_module(module: nn.Module, mesh, offload: bool = False) -> nn.Module:
    """``fully_shard`` ``module`` so that each unit holds one dtype: if it mixes dtypes, its largest
    one-dtype submodules of the dtypes its own parameters don't have become units of their own."""
    kwargs = dict(mesh=mesh, reshard_after_forward=True)
    if offload:
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=mesh.device_type == "cuda")
    if len(_unsharded_dtypes(module)) > 1:
        own = {p.dtype for p in module.parameters(recurse=False)}
        for dtype, units in _uniform_subtrees(module).items():
            if dtype not in own:
                fully_shard(units, **kwargs)
    fully_shard(module, **kwargs)
    return module


def apply_fsdp(model: nn.Module, blocks: nn.ModuleList, mesh, offload: bool = False) -> nn.Module:
    """Shard ``model`` over ``mesh``: each of ``blocks`` as its own unit(s), then the rest.

    Parameters stay sharded between forwards (``reshard_after_forward``): in inference nothing
    else needs them, and the gathered block is freed as soon as it has run. ``offload`` keeps the
    shards in pinned host memory and brings each block up as it runs (FSDP2's CPU offload).
    """
    for block in blocks:
        shard_module(block, mesh, offload)
    return shard_module(model, mesh, offload)
