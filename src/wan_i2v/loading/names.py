"""Official Wan parameter names and diffusers' ``WanTransformer3DModel`` names.

The correspondence diffusers' Wan conversion script encodes, for the I2V DiT: LoRA files made for
diffusers name the official parameters this way, and the tests compare with diffusers through it.
"""

import re

_RENAMES = [
    (r"^text_embedding\.0\.", "condition_embedder.text_embedder.linear_1."),
    (r"^text_embedding\.2\.", "condition_embedder.text_embedder.linear_2."),
    (r"^time_embedding\.0\.", "condition_embedder.time_embedder.linear_1."),
    (r"^time_embedding\.2\.", "condition_embedder.time_embedder.linear_2."),
    (r"^time_projection\.1\.", "condition_embedder.time_proj."),
    (r"\.self_attn\.", ".attn1."),
    (r"\.cross_attn\.", ".attn2."),
    (r"\.attn(\d)\.([qkv])\.", r".attn\1.to_\2."),
    (r"\.attn(\d)\.o\.", r".attn\1.to_out.0."),
    (r"^blocks\.(\d+)\.norm3\.", r"blocks.\1.norm2."),
    (r"^blocks\.(\d+)\.ffn\.0\.", r"blocks.\1.ffn.net.0.proj."),
    (r"^blocks\.(\d+)\.ffn\.2\.", r"blocks.\1.ffn.net.2."),
    (r"^blocks\.(\d+)\.modulation$", r"blocks.\1.scale_shift_table"),
    (r"^head\.head\.", "proj_out."),
    (r"^head\.modulation$", "scale_shift_table"),
]


def official_to_diffusers(name: str) -> str:
    for pattern, replacement in _RENAMES:
        name = re.sub(pattern, replacement, name)
    return name


def diffusers_to_official(names) -> dict[str, str]:
    """For the official parameter ``names``, each one's diffusers name -> the official name."""
    return {official_to_diffusers(name): name for name in names}
