"""The Wan2.2 VAE (Wan2.2-TI2V-5B's) against diffusers' AutoencoderKLWan configured as Wan2.2's."""

import re

import pytest
import torch
from diffusers_names import diffusers_vae_key as diffusers_key
from test_vae import random_video, relative_error

from wan_i2v.models.vae2_2 import LATENT_MEAN, LATENT_STD, VAE22Config, WanVAE22
from wan_i2v.tiny import randomize_

TINY = VAE22Config(dim=8, dec_dim=8, num_res_blocks=1)


def diffusers_key_22(key: str, config: VAE22Config) -> str:
    """Official Wan2.2 VAE parameter name -> diffusers' (``is_residual=True``): its stages' blocks
    first, then the names the two VAEs share (``diffusers_names.diffusers_vae_key``)."""
    key = re.sub(
        r"^encoder\.downsamples\.(\d+)\.downsamples\.(\d+)\.",
        lambda m: f"encoder.down_blocks.{m[1]}." + ("downsampler." if int(m[2]) == config.num_res_blocks else f"resnets.{m[2]}."),
        key,
    )
    key = re.sub(
        r"^decoder\.upsamples\.(\d+)\.upsamples\.(\d+)\.",
        lambda m: f"decoder.up_blocks.{m[1]}." + ("upsampler." if int(m[2]) == config.num_res_blocks + 1 else f"resnets.{m[2]}."),
        key,
    )
    return diffusers_key(key, config)


def tiny_vae22(seed: int = 0) -> WanVAE22:
    return randomize_(WanVAE22(TINY), seed=seed).eval()


def diffusers_twin(model: WanVAE22):
    from diffusers import AutoencoderKLWan

    config = model.config
    reference = AutoencoderKLWan(
        base_dim=config.dim, decoder_base_dim=config.dec_dim, z_dim=config.z_dim, dim_mult=list(config.dim_mult),
        num_res_blocks=config.num_res_blocks, temperal_downsample=list(config.temperal_downsample),
        is_residual=True, in_channels=12, out_channels=12, patch_size=2, scale_factor_spatial=16,
        latents_mean=list(LATENT_MEAN), latents_std=list(LATENT_STD),
    ).eval()  # fmt: skip
    reference.load_state_dict({diffusers_key_22(k, config): v for k, v in model.state_dict().items()}, strict=True)
    return reference


MEAN = torch.tensor(LATENT_MEAN).view(1, -1, 1, 1, 1)
INV_STD = 1.0 / torch.tensor(LATENT_STD).view(1, -1, 1, 1, 1)


@pytest.fixture(scope="module")
def pair():
    model = tiny_vae22()
    return model, diffusers_twin(model)


@torch.no_grad()
def test_encode_matches_diffusers(pair):
    model, reference = pair
    video = random_video(frames=9, size=32)
    latents = model.encode(video)
    expected = (reference.encode(video).latent_dist.mean - MEAN) * INV_STD  # diffusers leaves the normalization to its pipelines
    assert latents.shape == (1, 48, 3, 2, 2)
    assert relative_error(latents, expected) <= 1e-5


@torch.no_grad()
def test_decode_matches_diffusers_whole_and_frame_by_frame(pair):
    model, reference = pair
    latents = torch.randn(1, 48, 3, 2, 3, generator=torch.Generator().manual_seed(3))
    expected = reference.decode(latents / INV_STD + MEAN).sample.clamp(-1, 1)
    decoded = model.decode(latents)
    assert decoded.shape == (1, 3, 9, 32, 48) == model.video_shape(latents.shape)
    assert 0.05 < (decoded.abs() < 1).float().mean()  # not all clamped: the comparison means something
    assert relative_error(decoded, expected) <= 1e-5
    # Frame by frame the convolutions see other shapes, which take other vectorized paths on some CPUs:
    # fp32 rounding only (a frame decoded without its cache would differ by far more).
    assert relative_error(model.decode(latents, frame_by_frame=True), decoded) <= 1e-6


def test_loads_from_the_official_key_layout(tmp_path):
    import json
    from dataclasses import asdict

    from wan_i2v.models.vae import VAE_CONFIG_FILE
    from wan_i2v.models.vae2_2 import load_vae

    model = tiny_vae22(seed=4)
    assert "encoder.downsamples.1.downsamples.1.time_conv.weight" in model.state_dict()  # the official names
    assert "decoder.upsamples.0.upsamples.2.time_conv.weight" in model.state_dict()
    torch.save(model.state_dict(), tmp_path / "Wan2.2_VAE.pth")
    (tmp_path / VAE_CONFIG_FILE).write_text(json.dumps(asdict(TINY)))
    loaded = load_vae(tmp_path / "Wan2.2_VAE.pth", device="cpu", dtype=torch.float32)
    assert isinstance(loaded, WanVAE22) and loaded.config == TINY
    video = random_video(frames=5, size=32)
    assert torch.equal(loaded.encode(video), model.encode(video))
