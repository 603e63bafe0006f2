"""FP8 (e4m3) linear layers for the DiT blocks, applied from outside: the opt-in fast mode.

Weights are quantized once with one scale per output channel; activations are quantized
on the fly with one scale per token. On CUDA the product runs on the FP8 tensor cores
through ``torch._scaled_mm``; elsewhere the same quantized numbers are multiplied in
fp32, so CPU tests check exactly what the GPU computes, up to accumulation order.
Only the transformer blocks' projections and FFNs are converted: the embeddings, the
timestep modulation and the head stay as they are (the official fp32 islands).
"""

from __future__ import annotations

import torch
from torch import nn

from wan_i2v.transforms.fused_gelu import LinearGELU

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448


def _quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (fp8 [M, K], fp32 scale [M, 1]) with x ~= fp8 * scale."""
    scale = x.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
    return (x.float() / scale).to(FP8), scale


class FP8Linear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight, scale = _quantize_rows(linear.weight.detach())
        self.register_buffer("weight", weight)  # [out, in] fp8
        self.register_buffer("weight_scale", scale.t().contiguous())  # [1, out] fp32
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.out_dtype = linear.weight.dtype

    @staticmethod
    def stored_weight_names() -> tuple[str, str]:
        return ("weight", "weight_scale")

    def stored_weight(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """The tensors this layer keeps of a weight in the run dtype: the FP8 weight and its scales
        (a weight streamed in is quantized here, on its device, as at load time)."""
        quantized, scale = _quantize_rows(weight.to(self.out_dtype))
        return {"weight": quantized, "weight_scale": scale.t().contiguous()}

    @torch.no_grad()
    def load_weight_(self, weight: torch.Tensor) -> None:
        """Take a new weight (a LoRA switched on a loaded pipeline), rounded to the run's dtype and
        quantized as at load time, so that it equals a pipeline loaded with it."""
        for name, value in self.stored_weight(weight.to(self.weight.device)).items():
            getattr(self, name).copy_(value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        x_fp8, x_scale = _quantize_rows(rows)
        if x.is_cuda:
            out = torch._scaled_mm(x_fp8, self.weight.t(), scale_a=x_scale, scale_b=self.weight_scale, out_dtype=self.out_dtype)
        else:
            out = ((x_fp8.float() * x_scale) @ (self.weight.float() * self.weight_scale.t()).t()).to(self.out_dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)


def apply_fp8(model: nn.Module) -> nn.Module:
    """Replace every nn.Linear inside ``model``'s blocks with an FP8Linear (in place)."""
    for block in model.block_stack():
        for name, module in list(block.named_modules()):
            if isinstance(module, LinearGELU):  # its GELU would be lost with it
                raise ValueError("apply FP8 before the fused GELU (wan_i2v.fused_gelu), which leaves FP8 linears alone")
            if isinstance(module, nn.Linear):
                parent_name, _, child = name.rpartition(".")
                parent = block.get_submodule(parent_name) if parent_name else block
                setattr(parent, child, FP8Linear(module))
    return model
