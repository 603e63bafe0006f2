"""The one attention entry point of the DiT; the kernels it calls are in ``kernels/attention.py``.

Every attention in the DiT goes through :class:`Attention`, a module holding no
weights, so that sequence parallelism can wrap it from outside (the DiT does not
know) and the kernel can be chosen per machine. Tensors are ``[batch, tokens,
heads, head_dim]``, the layout the projections produce, so no kernel forces a copy.
"""

from __future__ import annotations

import torch
from torch import nn

from wan_i2v.errors import WanError
from wan_i2v.kernels.attention import KERNELS, available_kernels


class Attention(nn.Module):
    """Softmax attention with scale 1/sqrt(head_dim) over ``[B, L, H, D]`` tensors."""

    def __init__(self, kernel: str = "sdpa"):
        super().__init__()
        self.kernel = kernel

    @property
    def kernel(self) -> str:
        return self._kernel_name

    @kernel.setter
    def kernel(self, name: str) -> None:
        if name not in KERNELS:
            raise WanError(f"unknown attention kernel {name!r}", f"choose one of {', '.join(available_kernels())}")
        self._kernel_name = name
        self._kernel = KERNELS[name]

    def forward(self, q, k, v, key_mask: torch.Tensor | None = None):
        return self._kernel(q, k, v, key_mask)


def set_attention_kernel(model: nn.Module, name: str) -> None:
    """Use kernel ``name`` in every attention of ``model``."""
    for module in model.modules():
        if isinstance(module, Attention):
            module.kernel = name
