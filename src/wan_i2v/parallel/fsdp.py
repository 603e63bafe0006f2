"""FSDP2 applied from outside: one unit per transformer block, the rest in the root unit.

FSDP2 gathers a unit's parameters as one flat buffer, so a unit must hold one dtype. The DiT
keeps its norms, modulations and head in fp32 beside bf16 linear layers. A block is one unit of
its bf16 weights, its few fp32 ones (245 KB) kept whole on every rank: the unit's hooks then run
only where the block starts and ends, outside its compiled graph. On a torch whose FSDP cannot
leave parameters out (before 2.7), and at the root, a module becomes one unit per dtype instead.

Sharding happens on the meta device, before the weights exist (torchtitan's order): each rank
then reads only its own rows of each tensor from the memory-mapped checkpoint.
"""

from __future__ import annotations

import inspect
from collections import defaultdict

import torch
from torch import nn
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, fully_shard

from wan_i2v.models.dit import BlockStack
from wan_i2v.models.hooks import AgreeOver


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


def _policy(mesh, offload: bool) -> dict:
    kwargs = dict(mesh=mesh, reshard_after_forward=True)
    if offload:
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=mesh.device_type == "cuda")
    return kwargs


def shard_module(module: nn.Module, mesh, offload: bool = False) -> nn.Module:
    """``fully_shard`` ``module`` so that each unit holds one dtype: if it mixes dtypes, its largest
    one-dtype submodules of the dtypes its own parameters don't have become units of their own."""
    kwargs = _policy(mesh, offload)
    if len(_unsharded_dtypes(module)) > 1:
        own = {p.dtype for p in module.parameters(recurse=False)}
        for dtype, units in _uniform_subtrees(module).items():
            if dtype not in own:
                fully_shard(units, **kwargs)
    fully_shard(module, **kwargs)
    return module


CAN_LEAVE_OUT_PARAMETERS = "ignored_params" in inspect.signature(fully_shard).parameters


def _shard_block(block: nn.Module, mesh, offload: bool) -> None:
    """One unit of the block's main dtype, the parameters of other dtypes left whole (see above)."""
    sizes: dict[torch.dtype, int] = defaultdict(int)
    for param in block.parameters():
        sizes[param.dtype] += param.numel()
    if len(sizes) == 1 or not CAN_LEAVE_OUT_PARAMETERS:
        shard_module(block, mesh, offload)
        return
    main = max(sizes, key=sizes.get)
    fully_shard(block, ignored_params={p for p in block.parameters() if p.dtype != main}, **_policy(mesh, offload))


def apply_fsdp(model: nn.Module, blocks: nn.ModuleList, mesh, offload: bool = False) -> nn.Module:
    """Shard ``model`` over ``mesh``: each of ``blocks`` as its own unit, then the rest.

    Parameters stay sharded between forwards (``reshard_after_forward``): in inference nothing
    else needs them, and the gathered block is freed as soon as it has run. ``offload`` keeps the
    shards in pinned host memory and brings each block up as it runs (FSDP2's CPU offload).
    Applied to a model on the meta device, it then allocates this rank's storage: the shards
    on the GPU (in host memory with ``offload``), the parameters left whole where ``load_strict``
    will put them. The weights are loaded after (``checkpoint.load_strict`` reads each rank's rows).
    Hooks on a DiT's block stack then skip it on every rank of ``mesh`` or on none (the mesh holds
    every rank of the run, so this widens Ulysses' agreement, applied before).
    """
    for block in blocks:
        _shard_block(block, mesh, offload)
    shard_module(model, mesh, offload)
    if isinstance(blocks, BlockStack):  # every rank gathers each block's weights: all run it or none
        blocks.hooks.agree_to_skip = AgreeOver(mesh.get_group())
    if any(p.is_meta for p in model.parameters()):
        model.to_empty(device="cpu" if offload else mesh.device_type)
    return model
