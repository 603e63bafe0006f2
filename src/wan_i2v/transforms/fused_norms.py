"""The DiT blocks' norms as one-pass GPU kernels (``kernels/norms.py``), swapped in from outside.

Off the GPU, or without Triton, or for a tensor the kernels do not take, the modules are the
plain ones they replace.
"""

from __future__ import annotations

import torch
from torch import nn

from wan_i2v.kernels.norms import add_norm_modulate_, norm_modulate, rms_norm_rope, triton
from wan_i2v.models.dit import NormRope, ResidualNorm


class FusedResidualNorm(ResidualNorm):
    def forward(self, x, y, gate, norm, shift, scale, dtype):
        if not self._fits(x, y, gate, shift, scale):
            return super().forward(x, y, gate, norm, shift, scale, dtype)
        if y is None:
            return x, norm_modulate(x, norm.weight, norm.bias, shift, scale, norm.eps, dtype)
        # The sum goes over the old stream, which no one reads again: the fp32 stream keeps one
        # buffer through the blocks. (Only the first block's stream is bf16 and is converted here.)
        x = x.to(torch.float32).contiguous()
        return x, add_norm_modulate_(x, y, gate, norm.weight, norm.bias, shift, scale, norm.eps, dtype)

    @staticmethod
    def _fits(x, y, gate, shift, scale) -> bool:
        """What the kernel assumes, as in the blocks: a GPU with Triton; x [B, L, C] and y alike; a sum
        that is fp32 (the kernel writes it so); gate, shift and scale fp32 [B, 1, C], shift with scale."""
        if triton is None or not x.is_cuda or x.dtype not in (torch.float32, torch.bfloat16) or x.dim() != 3:
            return False
        if (shift is None) != (scale is None) or (y is not None and y.shape != x.shape):
            return False
        per_sample = (x.shape[0], 1, x.shape[2])
        if any(t is not None and (t.dtype != torch.float32 or t.shape != per_sample) for t in (gate, shift, scale)):
            return False
        return y is None or torch.float32 in {t.dtype for t in (x, y, gate) if t is not None}


class FusedNormRope(NormRope):
    def forward(self, x, norm, rope, heads, dtype):
        if not self._fits(x, norm, rope, heads, dtype):
            return super().forward(x, norm, rope, heads, dtype)
        cos, sin = (None, None) if rope is None else rope
        return rms_norm_rope(x, norm.weight, cos, sin, norm.eps).unflatten(-1, (heads, -1))

    @staticmethod
    def _fits(x, norm, rope, heads, dtype) -> bool:
        """What the kernel assumes, as in the blocks: a GPU with Triton; x [B, L, C] bf16 and a bf16
        result; an even head size; an fp32 weight [C]; cos and sin fp32 [L, head size / 2]. Only
        what torch.compile can trace without a graph break: the weight's alignment (it is read in
        8-byte pairs) is seen to inside the op."""
        if triton is None or not x.is_cuda or x.dtype != torch.bfloat16 or dtype != torch.bfloat16 or x.dim() != 3:
            return False
        channels, weight = x.shape[2], norm.weight
        if channels % (2 * heads) or weight.dtype != torch.float32 or weight.shape != (channels,):
            return False
        table = (x.shape[1], channels // heads // 2)
        return rope is None or all(t.dtype == torch.float32 and t.shape == table for t in rope)


def apply_fused_norms(model: nn.Module) -> nn.Module:
    """Every ResidualNorm and NormRope of ``model`` becomes its one-pass kernel (on a GPU; elsewhere unchanged)."""
    fused = {ResidualNorm: FusedResidualNorm, NormRope: FusedNormRope}
    for block in model.block_stack():
        for owner in list(block.modules()):
            for name, child in list(owner.named_children()):
                if type(child) in fused:
                    setattr(owner, name, fused[type(child)]())
    return model
