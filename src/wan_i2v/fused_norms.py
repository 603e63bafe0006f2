"""One-pass residual add + layer norm + modulation on the GPU, applied from outside.

Each DiT block adds to its fp32 residual stream three times and normalizes the sum over
its 5120 channels right after. torch.compile fuses each pair into one kernel, but as a
reduction that loops over a row twice, it reads the stream twice and reaches ~1.6 TB/s
(profile in docs/benchmarks.md). Here one program holds one token's row in registers:
the stream is read once and written once, and the normalized row (bf16) written once.

The numbers are the official ones up to fp32 summation order (and the fused multiply-add
the compiler may contract ``* (1 + scale) + shift`` into): the sum in fp32, the
layer norm in fp32 (rounded to the stream's dtype when the stream is bf16, as the
official first block does), then ``* (1 + scale) + shift`` in fp32 and the cast.
Off the GPU, or without Triton, the module is the plain one it replaces.
"""

from __future__ import annotations

import torch
from torch import nn

from wan_i2v.models.dit import ResidualNorm

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the plain path runs
    triton = None


if triton is not None:

    @triton.jit
    def _residual_norm_kernel(
        x_ptr, y_ptr, gate_ptr, weight_ptr, bias_ptr, shift_ptr, scale_ptr, sum_ptr, out_ptr,
        tokens_per_sample, channels, eps,
        HAS_Y: tl.constexpr, HAS_GATE: tl.constexpr, HAS_AFFINE: tl.constexpr, HAS_MODULATION: tl.constexpr,
        ROUND_NORM: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0)
        sample = row // tokens_per_sample
        cols = tl.arange(0, BLOCK)
        mask = cols < channels
        offsets = row.to(tl.int64) * channels + cols
        per_sample = sample * channels + cols
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        if HAS_Y:
            y = tl.load(y_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            if HAS_GATE:
                y = y * tl.load(gate_ptr + per_sample, mask=mask, other=0.0)
            x = x + y
            tl.store(sum_ptr + offsets, x, mask=mask)
        mean = tl.sum(x, axis=0) / channels
        centered = tl.where(mask, x - mean, 0.0)
        variance = tl.sum(centered * centered, axis=0) / channels
        normed = centered * tl.rsqrt(variance + eps)
        if HAS_AFFINE:
            weight = tl.load(weight_ptr + cols, mask=mask).to(tl.float32)
            normed = normed * weight + tl.load(bias_ptr + cols, mask=mask).to(tl.float32)
        if ROUND_NORM:
            normed = normed.to(tl.bfloat16).to(tl.float32)
        if HAS_MODULATION:
            scale = tl.load(scale_ptr + per_sample, mask=mask, other=0.0)
            normed = normed * (1.0 + scale) + tl.load(shift_ptr + per_sample, mask=mask, other=0.0)
        tl.store(out_ptr + offsets, normed.to(out_ptr.dtype.element_ty), mask=mask)


def _launch(x, y, gate, weight, bias, shift, scale, eps, total, out) -> None:
    batch, tokens, channels = x.shape
    block = triton.next_power_of_2(channels)
    unused = x  # a valid pointer for the inputs a variant does not read
    _residual_norm_kernel[(batch * tokens,)](
        x.contiguous(), unused if y is None else y.contiguous(), unused if gate is None else gate.contiguous(),
        unused if weight is None else weight, unused if bias is None else bias,
        unused if shift is None else shift.contiguous(), unused if scale is None else scale.contiguous(),
        unused if total is None else total, out, tokens, channels, eps,
        HAS_Y=y is not None, HAS_GATE=gate is not None, HAS_AFFINE=weight is not None,
        HAS_MODULATION=scale is not None, ROUND_NORM=y is None and x.dtype == torch.bfloat16, BLOCK=block,
        num_warps=8 if block <= 8192 else 16,
    )  # fmt: skip


@torch.library.custom_op("wan_i2v::norm_modulate", mutates_args=())
def norm_modulate(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
    shift: torch.Tensor | None, scale: torch.Tensor | None, eps: float, dtype: torch.dtype,
) -> torch.Tensor:  # fmt: skip
    """x [B, L, C] -> norm(x) (* (1 + scale) + shift) in dtype; weight, bias [C]; shift, scale [B, 1, C] fp32."""
    out = x.new_empty(x.shape, dtype=dtype)
    _launch(x, None, None, weight, bias, shift, scale, eps, None, out)
    return out


@norm_modulate.register_fake
def _(x, weight, bias, shift, scale, eps, dtype):
    return x.new_empty(x.shape, dtype=dtype)


@torch.library.custom_op("wan_i2v::add_norm_modulate", mutates_args=())
def add_norm_modulate(
    x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None, weight: torch.Tensor | None, bias: torch.Tensor | None,
    shift: torch.Tensor | None, scale: torch.Tensor | None, eps: float, dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(x + y * gate in fp32, its norm_modulate in dtype); gate [B, 1, C] fp32 or None."""
    total = x.new_empty(x.shape, dtype=torch.float32)
    out = x.new_empty(x.shape, dtype=dtype)
    _launch(x, y, gate, weight, bias, shift, scale, eps, total, out)
    return total, out


@add_norm_modulate.register_fake
def _(x, y, gate, weight, bias, shift, scale, eps, dtype):
    return x.new_empty(x.shape, dtype=torch.float32), x.new_empty(x.shape, dtype=dtype)


class FusedResidualNorm(ResidualNorm):
    def forward(self, x, y, gate, norm, shift, scale, dtype):
        if not self._fits(x, y, gate, shift, scale):
            return super().forward(x, y, gate, norm, shift, scale, dtype)
        if y is None:
            return x, norm_modulate(x, norm.weight, norm.bias, shift, scale, norm.eps, dtype)
        return add_norm_modulate(x, y, gate, norm.weight, norm.bias, shift, scale, norm.eps, dtype)

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


def apply_fused_norms(model: nn.Module) -> nn.Module:
    """Every ResidualNorm of ``model`` becomes the one-pass kernel (on a GPU; elsewhere unchanged)."""
    for block in model.blocks:
        block.residual_norm = FusedResidualNorm()
    return model
