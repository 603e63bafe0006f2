"""diffusers' twins of our models (``WanTransformer3DModel``'s arguments, ``AutoencoderKLWan`` with our weights): the reference the tests and benchmarks build."""

import re

from wan_i2v.loading.names import official_to_diffusers


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


def diffusers_transformer(model):
    """diffusers' ``WanTransformer3DModel`` with the config and weights of our ``DiT``."""
    from diffusers import WanTransformer3DModel

    reference = WanTransformer3DModel(**diffusers_transformer_kwargs(model.config))
    reference.load_state_dict({official_to_diffusers(k): v for k, v in model.state_dict().items()}, strict=True)
    return reference.eval()


def diffusers_vae_key(key: str, config) -> str:
    """Official parameter name -> diffusers' AutoencoderKLWan name."""
    blocks_per_stage = config.num_res_blocks + 2  # residual blocks + the upsampling

    def up_block(match: re.Match) -> str:
        stage, index = divmod(int(match[1]), blocks_per_stage)
        part = "upsamplers.0" if index == blocks_per_stage - 1 else f"resnets.{index}"
        return f"decoder.up_blocks.{stage}.{part}."

    for pattern, replacement in [
        (r"^conv1\.", "quant_conv."),
        (r"^conv2\.", "post_quant_conv."),
        (r"^(encoder|decoder)\.conv1\.", r"\1.conv_in."),
        (r"^(encoder|decoder)\.head\.0\.", r"\1.norm_out."),
        (r"^(encoder|decoder)\.head\.2\.", r"\1.conv_out."),
        (r"\.middle\.0\.", ".mid_block.resnets.0."),
        (r"\.middle\.1\.", ".mid_block.attentions.0."),
        (r"\.middle\.2\.", ".mid_block.resnets.1."),
        (r"^encoder\.downsamples\.", "encoder.down_blocks."),
        (r"^decoder\.upsamples\.(\d+)\.", up_block),
        (r"\.residual\.0\.", ".norm1."),
        (r"\.residual\.2\.", ".conv1."),
        (r"\.residual\.3\.", ".norm2."),
        (r"\.residual\.6\.", ".conv2."),
        (r"\.shortcut\.", ".conv_shortcut."),
    ]:
        key = re.sub(pattern, replacement, key)
    return key


def diffusers_vae(model):
    """diffusers' AutoencoderKLWan with the same config and weights."""
    from diffusers import AutoencoderKLWan

    config = model.config
    reference = AutoencoderKLWan(
        base_dim=config.dim,
        z_dim=config.z_dim,
        dim_mult=list(config.dim_mult),
        num_res_blocks=config.num_res_blocks,
        temperal_downsample=list(config.temperal_downsample),
    ).eval()
    reference.load_state_dict({diffusers_vae_key(k, config): v for k, v in model.state_dict().items()}, strict=True)
    return reference


def diffusers_i2v_pipeline(pipe, shift: float):
    """diffusers' ``WanImageToVideoPipeline`` (Wan2.2-I2V-A14B's form: two transformers, boundary 0.9,
    no image encoder) made of a loaded ``I2VPipeline``'s models, converted to diffusers' layout; its
    scheduler is diffusers' flow UniPC at ``shift``, as users configure it."""
    from diffusers import UniPCMultistepScheduler, WanImageToVideoPipeline

    scheduler = UniPCMultistepScheduler(num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift,
                                        solver_order=2, solver_type="bh2", predict_x0=True, lower_order_final=True, final_sigmas_type="zero")  # fmt: skip
    high, low = pipe.experts.models["high"], pipe.experts.models["low"]
    return WanImageToVideoPipeline(
        tokenizer=pipe.text_encoder.tokenizer, text_encoder=pipe.text_encoder.model, vae=diffusers_vae(pipe.vae).float(),
        scheduler=scheduler, transformer=diffusers_transformer(high), transformer_2=diffusers_transformer(low), boundary_ratio=0.9,
    )  # fmt: skip
