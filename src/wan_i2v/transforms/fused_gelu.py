"""The FFN's tanh-GELU in its first matmul's epilogue on the GPU, applied from outside.

A DiT block's FFN widens each token to 13824 channels, applies the tanh GELU and narrows
back. Run as written, the GELU is a kernel of its own that reads and writes the wide
activations (1.8 GB per block at 480P, ~0.65 ms). cuBLASLt can apply it to the matmul's
fp32 accumulator before the bf16 rounding (``torch._addmm_activation``): that kernel
disappears (-16 ms per 480P forward, docs/benchmarks.md), and the GELU sees one bf16
rounding fewer than in the official model, so the error against fp32 drops slightly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LinearGELU(nn.Linear):
    """``gelu(x @ W^T + b, approximate="tanh")`` as one addmm with a GELU epilogue on the GPU."""

    def forward(self, x):
        if not x.is_cuda:  # on the CPU, torch's _addmm_activation applies the erf GELU, not the tanh one
            return F.gelu(super().forward(x), approximate="tanh")
        rows = x.flatten(0, -2)
        return torch._addmm_activation(self.bias, rows, self.weight.t(), use_gelu=True).unflatten(0, x.shape[:-1])


def apply_fused_gelu(model: nn.Module) -> nn.Module:
    """Each block's ``Linear -> tanh GELU`` becomes one LinearGELU over the same parameters (names
    unchanged). FFNs of another shape (an FP8 linear, say) are left as they are. Apply it before
    FSDP, which gathers the parameters of the modules it found when sharding; on the CPU the
    modules compute the plain Linear + GELU."""
    for block in model.block_stack():
        first, activation = block.ffn.up, block.ffn.activation
        if type(first) is not nn.Linear or first.bias is None:
            continue
        if not (isinstance(activation, nn.GELU) and activation.approximate == "tanh"):
            continue
        fused = LinearGELU(first.in_features, first.out_features, device="meta")
        fused.weight, fused.bias = first.weight, first.bias
        block.ffn.fuse_activation(fused)
    return model
