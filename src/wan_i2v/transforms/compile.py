"""torch.compile applied from outside: one compiled region per transformer block.

Compiling block by block (as torchtitan does) fuses the fp32 norm, modulation,
RoPE and residual arithmetic around the matmuls and attention, keeps compile time
to one block's worth (all blocks share the code), and composes with FSDP, which
also works per block. Parameter names are unchanged (``Module.compile`` is in place).
"""

from __future__ import annotations

import torch
from torch import nn

# Compiled graphs kept per block code: two per video size (the first block takes the stream in the
# compute dtype, the others in fp32) and per precision mode. torch's default of 8 would, after four
# sizes in one process (a server), silently fall back to eager blocks at 1.3x the time.
RECOMPILE_LIMIT = 64


def apply_compile(model: nn.Module) -> nn.Module:
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # the name before torch 2.7
    setattr(config, name, max(getattr(config, name), RECOMPILE_LIMIT))
    for block in model.block_stack():
        block.compile(dynamic=False)
    return model
