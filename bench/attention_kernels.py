"""Attention kernels at the DiT's shapes (40 heads of 128, bf16): self-attention over the video tokens
and cross-attention to the 512 text positions, for each SDPA backend and a plain matmul-softmax.

    python bench/attention_kernels.py
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from common import measure
from torch.nn.attention import SDPBackend, sdpa_kernel

TOKENS = {"480P": 32760, "720P": 75600}
HEADS, HEAD_DIM, TEXT_LEN = 40, 128, 512


def matmul_softmax(q, k, v):
    scores = torch.matmul(q, k.transpose(-1, -2)) * HEAD_DIM**-0.5
    return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype), v)


def main():
    print(torch.cuda.get_device_name(), torch.__version__)
    backends = {
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
    }
    for size, tokens in TOKENS.items():
        q = torch.randn(1, HEADS, tokens, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        for kind, keys in (("self", tokens), ("cross", TEXT_LEN)):
            k = torch.randn(1, HEADS, keys, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
            v = torch.randn_like(k)
            flops = 4 * tokens * keys * HEADS * HEAD_DIM
            reference = matmul_softmax(q[:, :, :4096], k, v).float() if kind == "cross" else None
            for name, backend in backends.items():
                with sdpa_kernel([backend]):
                    seconds, _ = measure(lambda: F.scaled_dot_product_attention(q, k, v), 2, 5)
                print(f"{size} {kind:5} {name:9}: {seconds * 1e3:8.2f} ms  {flops / seconds / 1e12:6.0f} TFLOP/s", flush=True)
            if kind == "self" and importlib.util.find_spec("sageattention"):
                from sageattention import sageattn

                seconds, _ = measure(lambda: sageattn(q, k, v, tensor_layout="HND"), 2, 5)
                with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                    exact = F.scaled_dot_product_attention(q, k, v).float()
                error = ((sageattn(q, k, v, tensor_layout="HND").float() - exact).norm() / exact.norm()).item()
                print(f"{size} {kind:5} {'sage (int8)':9}: {seconds * 1e3:8.2f} ms  {flops / seconds / 1e12:6.0f} TFLOP/s, "
                      f"relative difference from cuDNN {error:.1e}", flush=True)
            # The projections produce token-major [B, L, H, D] memory; cuDNN may prefer head-major.
            token_major = [x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v)]
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                seconds, _ = measure(lambda: F.scaled_dot_product_attention(*token_major), 2, 5)
            print(f"{size} {kind:5} cudnn on token-major memory: {seconds * 1e3:8.2f} ms  {flops / seconds / 1e12:6.0f} TFLOP/s", flush=True)
            if kind == "cross":
                seconds, _ = measure(lambda: matmul_softmax(q, k, v), 2, 5)
                print(f"{size} {kind:5} {'matmul':9}: {seconds * 1e3:8.2f} ms  {flops / seconds / 1e12:6.0f} TFLOP/s", flush=True)
                with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                    error = (F.scaled_dot_product_attention(q[:, :, :4096], k, v).float() - reference).norm() / reference.norm()
                print(f"{size} cross cudnn vs matmul-softmax relative difference {error.item():.1e}", flush=True)


if __name__ == "__main__":
    main()
