"""torch.compile applied from outside: one compiled region per transformer block.

Compiling block by block (as torchtitan does) fuses the fp32 norm, modulation,
RoPE and residual arithmetic around the matmuls and attention, keeps compile time
to one block's worth (all blocks share the code), and composes with FSDP, which
also works per block. Parameter names are unchanged (``Module.compile`` is in place).
"""

from __future__ import annotations

from torch import nn


def apply_compile(model: nn.Module) -> nn.Module:
    for block in model.blocks:
        block.compile(dynamic=False)
    return model
