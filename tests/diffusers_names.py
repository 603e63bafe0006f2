"""diffusers' ``WanTransformer3DModel`` arguments for our config: the reference the tests and benchmarks build."""


def diffusers_transformer_kwargs(config) -> dict:
    """``WanTransformer3DModel`` arguments for a :class:`~wan_i2v.models.dit.DiTConfig`."""
    return dict(
        patch_size=config.patch_size,
        num_attention_heads=config.num_heads,
        attention_head_dim=config.head_dim,
        in_channels=config.in_dim,
        out_channels=config.out_dim,
        text_dim=config.text_dim,
        freq_dim=config.freq_dim,
        ffn_dim=config.ffn_dim,
        num_layers=config.num_layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=config.eps,
    )
