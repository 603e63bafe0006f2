"""FP8 linear layers: quantization error, which layers are converted, and the DiT close to bf16."""

import pytest
import torch
from torch import nn

from wan_i2v.models.dit import DiT, DiTConfig
from wan_i2v.transforms.fp8 import FP8Linear, apply_fp8
from wan_i2v.tiny import randomize_


def relative_error(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_fp8_linear_is_close_but_quantized():
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    x = torch.randn(3, 10, 64)
    fp8 = FP8Linear(linear)
    assert fp8.weight.dtype == torch.float8_e4m3fn and fp8.weight_scale.shape == (1, 48)
    error = relative_error(fp8(x), linear(x))
    # e4m3 keeps 3 mantissa bits: about 2-4% per element, averaged down by the dot products.
    assert 1e-3 < error < 0.05


def test_fp8_handles_outlier_rows():
    linear = nn.Linear(32, 16)
    x = torch.randn(4, 32)
    x[0] *= 1e4  # per-token scales keep the other rows exact to fp8 precision
    out = FP8Linear(linear)(x)
    assert relative_error(out[1:], linear(x)[1:]) < 0.05


def test_apply_fp8_converts_only_block_linears_and_stays_close():
    config = DiTConfig(dim=64, ffn_dim=128, freq_dim=32, num_heads=4, num_layers=2, text_len=16, text_dim=24)
    model = randomize_(DiT(config), seed=0).eval()
    latent, condition = torch.randn(1, 16, 2, 8, 8), torch.randn(1, 20, 2, 8, 8)
    context, t = torch.randn(1, 16, 24), torch.tensor([900.0])
    with torch.no_grad():
        before = model(latent, t, context, condition)
        apply_fp8(model)
        after = model(latent, t, context, condition)
    converted = {n for n, m in model.named_modules() if isinstance(m, FP8Linear)}
    assert len(converted) == 2 * (4 + 4 + 2)  # per block: self q,k,v,o; cross q,k,v,o; ffn 0,2
    assert all(n.startswith("blocks.") for n in converted)
    assert isinstance(model.head.head, nn.Linear) and isinstance(model.time_projection[1], nn.Linear)
    assert 1e-3 < relative_error(after, before) < 0.1


def test_fp8_refuses_a_model_whose_gelu_is_already_fused():
    """FP8 replaces each Linear; a LinearGELU's GELU would go with it, so the order is FP8 first."""
    from wan_i2v.transforms.fused_gelu import apply_fused_gelu

    config = DiTConfig(dim=32, ffn_dim=64, freq_dim=16, num_heads=2, num_layers=1, text_len=8, text_dim=16)
    with pytest.raises(ValueError, match="FP8 before the fused GELU"):
        apply_fp8(apply_fused_gelu(DiT(config)))
