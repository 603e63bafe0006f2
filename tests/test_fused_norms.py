"""The fused norm kernels' own code, run by Triton's interpreter on the CPU, against the plain
modules they replace. Residual norms: sums, norms, per-sample modulation (batch 2, different
values), the affine norm and the rounding of a bf16 stream's norm. Query/key norms: the RMS norm
with its weight, RoPE by each token's own angles in each sample of a batch, and without RoPE.
On a GPU, bench/dit_forward.py checks them at full size."""

import importlib.util
import os
import subprocess
import sys

import pytest

CHECK = r"""
import torch
from wan_i2v.kernels import norms as fused_norms
from wan_i2v.models.dit import FP32LayerNorm, ResidualNorm

g = torch.Generator().manual_seed(0)
batch, tokens, channels = 2, 7, 96  # channels below the kernel's power-of-two block: masked lanes
def rand(*shape):
    return torch.randn(*shape, generator=g)
x, y = rand(batch, tokens, channels), rand(batch, tokens, channels).bfloat16()
gate, shift, scale = (rand(batch, 1, channels) for _ in range(3))
affine = FP32LayerNorm(channels, 1e-6, elementwise_affine=True)
affine.weight.data, affine.bias.data = rand(channels), rand(channels)
plain = FP32LayerNorm(channels, 1e-6, elementwise_affine=False)
uses = {
    "norm1 of a bf16 stream, modulated": (x.bfloat16(), None, None, plain, shift, scale),
    "gated add, affine norm3": (x, y, gate, affine, None, None),
    "gated add onto a bf16 stream (the first block's norm3)": (x.bfloat16(), y, gate, affine, None, None),
    "add, norm2 modulated": (x, y, None, plain, shift, scale),
}
for name, (stream, update, g8, norm, sh, sc) in uses.items():
    expected = ResidualNorm()(stream, update, g8, norm, sh, sc, torch.float32)
    if update is None:
        got = (stream, fused_norms.norm_modulate(stream, norm.weight, norm.bias, sh, sc, norm.eps, torch.float32))
    else:  # the sum is written over the stream, made fp32 first (as FusedResidualNorm does)
        total = stream.float().clone()
        got = (total, fused_norms.add_norm_modulate_(total, update, g8, norm.weight, norm.bias, sh, sc, norm.eps, torch.float32))
    for part, a, b in zip(("sum", "normed"), got, expected):
        assert a.dtype == b.dtype and a.shape == b.shape, (name, part, a.dtype, b.dtype)
        error = ((a - b).abs().max() / b.abs().max()).item()
        if stream.dtype == torch.bfloat16 and part == "normed":
            # The norm is rounded to bf16 before the modulation. Triton's interpreter truncates that
            # cast where a GPU rounds to nearest (as torch does; bench/dit_forward.py checks it there),
            # so here values may sit one bf16 step (2^-8 relative) apart.
            assert error < 2 ** -7, (name, part, error)
        else:
            assert error < 1e-5, (name, part, error)

# Query/key norms, batch 2 over a 2x2x3 token grid: 3 heads of 16 channels (24 pairs: tiles of 16
# and 8, every lane used) and 3 heads of 20 (30 pairs: tiles of 16 and 16, two lanes masked).
from wan_i2v.models.dit import NormRope, RMSNorm, rope_tables
heads, grid = 3, (2, 2, 3)
tokens = grid[0] * grid[1] * grid[2]
for channels in (48, 60):
    norm = RMSNorm(channels, 1e-6)
    # At 60 channels the weight is a view 4 bytes into its storage: the op reads an aligned copy.
    norm.weight.data = rand(channels) if channels == 48 else rand(channels + 1)[1:]
    rope = rope_tables(grid, channels // heads, "cpu")
    x = (rand(2, tokens, channels) * 3).bfloat16()
    for table in (rope, None):
        expected = NormRope()(x, norm, table, heads, torch.bfloat16)
        cos, sin = (None, None) if table is None else table
        got = fused_norms.rms_norm_rope(x, norm.weight, cos, sin, norm.eps).unflatten(-1, (heads, -1))
        assert got.dtype == expected.dtype and got.shape == expected.shape
        error = ((got.float() - expected.float()).abs().max() / expected.float().abs().max()).item()
        # The norm and the output are rounded to bf16; the interpreter truncates both (see above).
        assert error < 2 ** -6, (channels, table is None, error)
print("ok")
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton has no wheel for this platform")
def test_kernel_matches_the_plain_module_in_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
