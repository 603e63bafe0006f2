"""Attention kernels, registered by name; ``models/attention.py`` is the entry point that calls them.

A kernel takes ``[batch, tokens, heads, head_dim]`` tensors, the layout the projections
produce, so no kernel forces a copy; one may name a requirement, checked before any weight loads.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from wan_i2v.errors import WanError, option

# kernel(q, k, v, key_mask) -> out; key_mask is None or a bool [batch, keys] tensor (True = attend).
AttentionKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]

KERNELS: dict[str, AttentionKernel] = {}
# name -> check(device) that raises WanError when the kernel cannot run there.
_REQUIREMENTS: dict[str, Callable[[torch.device], None]] = {}


def register_kernel(name: str, kernel: AttentionKernel, requirement: Callable[[torch.device], None] | None = None) -> None:
    KERNELS[name] = kernel
    if requirement is not None:
        _REQUIREMENTS[name] = requirement


def _sdpa(q, k, v, key_mask, backends=None):
    mask = None if key_mask is None else key_mask[:, None, None, :]
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    if backends is None:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    else:
        with sdpa_kernel(backends):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2)


def _cudnn(q, k, v, key_mask):
    # cuDNN is the fastest exact bf16 kernel on Hopper (see shared/ANCHORS.md); a
    # masked call falls back to the flash/efficient kernels, which accept masks.
    if q.dtype not in (torch.float16, torch.bfloat16):  # cuDNN has no fp32 kernel: let SDPA choose
        return _sdpa(q, k, v, key_mask)
    if key_mask is not None:
        return _sdpa(q, k, v, key_mask, [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH])
    # The token-major memory the projections produce is as fast as head-major for it
    # (bench/attention_kernels.py), so no copy is made.
    return _sdpa(q, k, v, None, [SDPBackend.CUDNN_ATTENTION])


@torch.compiler.disable  # Triton launches of its own: run eagerly between the compiled parts
def _sage(q, k, v, key_mask):
    # SageAttention 1: Q and K quantized to INT8 per block, P.V in 16 bits. Opt-in: not exact.
    if key_mask is not None or q.dtype not in (torch.float16, torch.bfloat16):
        return _sdpa(q, k, v, key_mask)
    from sageattention import sageattn

    return sageattn(q, k, v, tensor_layout="NHD", is_causal=False)


def _sage_requirement(device: torch.device) -> None:
    import importlib.util

    if device.type != "cuda":
        raise WanError("attention kernel 'sage' needs a CUDA GPU", f"leave out {option('attention', 'sage')} on this device")
    if importlib.util.find_spec("sageattention") is None:
        raise WanError("attention kernel 'sage' needs the SageAttention package", "pip install sageattention==1.0.6")


register_kernel("sdpa", _sdpa)
register_kernel("cudnn", _cudnn)
register_kernel("sage", _sage, _sage_requirement)


def available_kernels() -> list[str]:
    return sorted(KERNELS)


def check_kernel(name: str, device: torch.device) -> None:
    """Raise WanError, before anything is loaded, if kernel ``name`` is unknown or cannot run on ``device``."""
    if name not in KERNELS:
        raise WanError(f"unknown attention kernel {name!r}", f"choose one of {', '.join(available_kernels())}")
    if name in _REQUIREMENTS:
        _REQUIREMENTS[name](torch.device(device))


def default_kernel(device: torch.device) -> str:
    """cuDNN on Hopper and newer GPUs, plain SDPA elsewhere."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9:
        return "cudnn"
    return "sdpa"
