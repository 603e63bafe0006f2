"""One-pass norms on the GPU: the row reductions of a DiT block, as Triton kernels and custom ops.

Each DiT block adds to its fp32 residual stream three times and normalizes the sum over
its 5120 channels right after; its query and key projections are RMS-normalized over the
same 5120 channels, then rotated (RoPE). torch.compile fuses each of these into one
kernel, but as a reduction that loops over a row twice, it reads the row twice and
reaches ~1.2-1.6 TB/s (profile in docs/benchmarks.md). Here one program holds one token's
row in registers: each input is read once and each output written once.

The numbers are the official ones up to fp32 summation order (and the fused multiply-adds
the compiler may contract the modulation and the rotation into). Residual norms: the sum
in fp32, the layer norm in fp32 (rounded to the stream's dtype when the stream is bf16, as
the official first block does), then ``* (1 + scale) + shift`` in fp32 and the cast.
Query/key norms: the RMS norm in fp32, rounded to the projection's dtype, times the fp32
weight, the rotation in fp32, then the cast. ``transforms/fused_norms.py`` swaps them into the blocks.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the plain path runs
    triton = None


if triton is not None:

    @triton.jit
    def _residual_norm_kernel(
        x_ptr, y_ptr, gate_ptr, weight_ptr, bias_ptr, shift_ptr, scale_ptr, out_ptr,
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
            tl.store(x_ptr + offsets, x, mask=mask)  # the sum over the old stream (fp32)
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

    @triton.jit
    def _normed_rotated_words(real, imag, inverse_rms, weight_pairs, cos_ptr, sin_ptr, token, pair, mask,
                              PAIRS_PER_HEAD: tl.constexpr, HAS_ROPE: tl.constexpr):  # fmt: skip
        weight = tl.load(weight_pairs + pair, mask=mask, other=0)  # two fp32 weights in one 64-bit word
        real = (real * inverse_rms).to(tl.bfloat16).to(tl.float32) * (weight & 0xFFFFFFFF).to(tl.uint32).to(tl.float32, bitcast=True)
        imag = (imag * inverse_rms).to(tl.bfloat16).to(tl.float32) * (weight >> 32).to(tl.uint32).to(tl.float32, bitcast=True)
        if HAS_ROPE:
            angle = token * PAIRS_PER_HEAD + pair % PAIRS_PER_HEAD
            cos = tl.load(cos_ptr + angle, mask=mask, other=0.0)
            sin = tl.load(sin_ptr + angle, mask=mask, other=0.0)
            real, imag = real * cos - imag * sin, real * sin + imag * cos
        low = real.to(tl.bfloat16).to(tl.uint16, bitcast=True).to(tl.uint32)
        high = imag.to(tl.bfloat16).to(tl.uint16, bitcast=True).to(tl.uint32)
        return low | (high << 16)

    @triton.jit
    def _rms_norm_rope_kernel(
        x_ptr, weight_ptr, cos_ptr, sin_ptr, out_ptr, tokens_per_sample, pairs, eps,
        PAIRS_PER_HEAD: tl.constexpr, HAS_ROPE: tl.constexpr, FIRST: tl.constexpr, SECOND: tl.constexpr,
    ):  # fmt: skip
        # A bf16 row read and written as 32-bit words, one (real, imag) pair each: a bf16 is the top
        # half of an fp32. The row is two power-of-two tiles (2048 + 512 words at 5120 channels)
        # rather than one padded to 4096, which left 3/8 of the lanes idle and ran ~20% slower.
        row = tl.program_id(0)
        row_start = row.to(tl.int64) * pairs
        x_words, out_words = x_ptr.to(tl.pointer_type(tl.uint32)), out_ptr.to(tl.pointer_type(tl.uint32))
        weight_pairs = weight_ptr.to(tl.pointer_type(tl.uint64))
        token = (row % tokens_per_sample).to(tl.int64)
        first, second = tl.arange(0, FIRST), FIRST + tl.arange(0, SECOND)
        first_mask, second_mask = first < pairs, second < pairs
        first_words = tl.load(x_words + row_start + first, mask=first_mask, other=0)
        second_words = tl.load(x_words + row_start + second, mask=second_mask, other=0)
        first_real, first_imag = (first_words << 16).to(tl.float32, bitcast=True), (first_words & 0xFFFF0000).to(tl.float32, bitcast=True)
        second_real, second_imag = (second_words << 16).to(tl.float32, bitcast=True), (second_words & 0xFFFF0000).to(tl.float32, bitcast=True)
        squares = tl.sum(first_real * first_real + first_imag * first_imag) + tl.sum(second_real * second_real + second_imag * second_imag)
        inverse_rms = tl.rsqrt(squares / (2 * pairs) + eps)
        out = _normed_rotated_words(first_real, first_imag, inverse_rms, weight_pairs, cos_ptr, sin_ptr, token, first, first_mask, PAIRS_PER_HEAD, HAS_ROPE)
        tl.store(out_words + row_start + first, out, mask=first_mask)
        out = _normed_rotated_words(second_real, second_imag, inverse_rms, weight_pairs, cos_ptr, sin_ptr, token, second, second_mask, PAIRS_PER_HEAD, HAS_ROPE)
        tl.store(out_words + row_start + second, out, mask=second_mask)


def _launch(x, y, gate, weight, bias, shift, scale, eps, out) -> None:
    batch, tokens, channels = x.shape
    block = triton.next_power_of_2(channels)
    unused = x  # a valid pointer for the inputs a variant does not read
    _residual_norm_kernel[(batch * tokens,)](
        x, unused if y is None else y.contiguous(), unused if gate is None else gate.contiguous(),
        unused if weight is None else weight, unused if bias is None else bias,
        unused if shift is None else shift.contiguous(), unused if scale is None else scale.contiguous(),
        out, tokens, channels, eps,
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
    _launch(x.contiguous(), None, None, weight, bias, shift, scale, eps, out)
    return out


@norm_modulate.register_fake
def _(x, weight, bias, shift, scale, eps, dtype):
    return x.new_empty(x.shape, dtype=dtype)


@torch.library.custom_op("wan_i2v::rms_norm_rope", mutates_args=())
def rms_norm_rope(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None, eps: float) -> torch.Tensor:
    """x [B, L, C] bf16 -> RMS norm (rounded to bf16) * weight [C] fp32, rotated by cos, sin
    [L, pairs per head] fp32 when given, in bf16."""
    x = x.contiguous()
    if weight.data_ptr() % 8 or not weight.is_contiguous():  # read as 64-bit pairs: an aligned copy
        weight = weight.clone(memory_format=torch.contiguous_format)
    out = x.new_empty(x.shape)
    batch, tokens, channels = x.shape
    pairs = channels // 2
    first = 1 << (pairs.bit_length() - 1)  # the largest power of two in the row's pairs
    _rms_norm_rope_kernel[(batch * tokens,)](
        x, weight, x if cos is None else cos.contiguous(), x if sin is None else sin.contiguous(), out,
        tokens, pairs, eps, PAIRS_PER_HEAD=1 if cos is None else cos.shape[1], HAS_ROPE=cos is not None,
        FIRST=first, SECOND=triton.next_power_of_2(max(pairs - first, 1)), num_warps=4,
    )  # fmt: skip
    return out


@rms_norm_rope.register_fake
def _(x, weight, cos, sin, eps):
    return x.new_empty(x.shape)


@torch.library.custom_op("wan_i2v::add_norm_modulate_", mutates_args=("x",))
def add_norm_modulate_(
    x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None, weight: torch.Tensor | None, bias: torch.Tensor | None,
    shift: torch.Tensor | None, scale: torch.Tensor | None, eps: float, dtype: torch.dtype,
) -> torch.Tensor:  # fmt: skip
    """x += y * gate (x fp32 and contiguous; gate [B, 1, C] fp32 or None), then returns norm(x)
    (* (1 + scale) + shift) in dtype."""
    if x.dtype != torch.float32 or not x.is_contiguous():
        raise ValueError("add_norm_modulate_ writes the sum over x: x must be fp32 and contiguous")
    out = x.new_empty(x.shape, dtype=dtype)
    _launch(x, y, gate, weight, bias, shift, scale, eps, out)
    return out


@add_norm_modulate_.register_fake
def _(x, y, gate, weight, bias, shift, scale, eps, dtype):
    return x.new_empty(x.shape, dtype=dtype)
