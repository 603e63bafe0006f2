import json
import re

import pytest
import torch

from wan_i2v.errors import WanError
from wan_i2v.models.vae import LATENT_MEAN, LATENT_STD, VAEConfig, WanVAE, load_vae
from wan_i2v.tiny import randomize_

from diffusers_names import diffusers_vae

TINY = VAEConfig(dim=8, dim_mult=(1, 2, 4, 4), num_res_blocks=1)


def tiny_vae(config: VAEConfig = TINY, seed: int = 0) -> WanVAE:
    torch.manual_seed(seed)
    model = WanVAE(config).eval()
    with torch.no_grad():  # norms' gammas are ones at init; make them matter
        for name, param in model.named_parameters():
            if name.endswith("gamma"):
                param.uniform_(0.5, 1.5)
    return model


def random_video(frames=9, size=32, seed=1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, frames, size, size, generator=generator) * 2 - 1


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours - reference).norm() / reference.norm()).item()


# diffusers leaves the latent normalization to its pipelines; the official code divides by 1/std
MEAN = torch.tensor(LATENT_MEAN).view(1, -1, 1, 1, 1)
INV_STD = 1.0 / torch.tensor(LATENT_STD).view(1, -1, 1, 1, 1)


@torch.no_grad()
def test_matches_diffusers_encode_and_decode():
    model = tiny_vae()
    reference = diffusers_vae(model)
    video = random_video()

    latents = model.encode(video)
    expected = (reference.encode(video).latent_dist.mean - MEAN) * INV_STD
    assert latents.shape == (1, 16, 3, 4, 4)
    assert relative_error(latents, expected) <= 1e-5

    decoded = model.decode(latents)
    expected = reference.decode(latents / INV_STD + MEAN).sample
    assert decoded.shape == (1, 3, 9, 32, 32) and decoded.dtype == torch.float32
    assert 0.05 < (decoded.abs() < 1).float().mean()  # not all clamped: the comparison means something
    assert relative_error(decoded, expected) <= 1e-5


def test_attention_at_attn_scales_sits_where_the_official_model_puts_it():
    # Neither the official forward nor diffusers' runs with attn_scales (both hand the feature
    # cache to the attention block), so there is no reference to compare numbers with; these
    # names come from the official WanVAE_ module tree for the same config.
    config = VAEConfig(dim=8, dim_mult=(1, 2, 2), num_res_blocks=1, attn_scales=(1.0, 0.5),
                       temperal_downsample=(True, True))  # fmt: skip
    model = tiny_vae(config)
    assert [k for k in model.state_dict() if k.endswith("to_qkv.weight")] == [
        "encoder.downsamples.1.to_qkv.weight", "encoder.downsamples.4.to_qkv.weight",
        "encoder.middle.1.to_qkv.weight", "decoder.middle.1.to_qkv.weight",
        "decoder.upsamples.1.to_qkv.weight", "decoder.upsamples.3.to_qkv.weight",
        "decoder.upsamples.6.to_qkv.weight", "decoder.upsamples.8.to_qkv.weight",
    ]  # fmt: skip
    latents = model.encode(random_video(frames=9, size=16))
    assert latents.shape == (1, 16, 3, 4, 4)
    assert model.decode(latents).shape == (1, 3, 9, 16, 16)


def test_encode_and_decode_are_causal():
    model = tiny_vae()
    video = random_video()
    latents = model.encode(video)
    torch.testing.assert_close(model.encode(video[:, :, :5]), latents[:, :, :2])
    torch.testing.assert_close(model.decode(latents[:, :, :2]), model.decode(latents)[:, :, :5])


def test_bfloat16_runs_close_to_float32():
    model = tiny_vae()
    video = random_video(frames=5, size=16)
    latents = model.encode(video)
    model_bf16 = tiny_vae().to(torch.bfloat16)
    latents_bf16 = model_bf16.encode(video)
    assert latents_bf16.dtype == torch.float32 and relative_error(latents_bf16, latents) < 0.05
    decoded = model_bf16.decode(latents)
    assert decoded.dtype == torch.float32 and relative_error(decoded, model.decode(latents)) < 0.05


def test_progress_is_called_once_per_latent_frame():
    model = tiny_vae()
    calls = []
    model.decode(torch.randn(1, 16, 3, 2, 2), progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 3), (2, 3), (3, 3)]


def test_encode_rejects_bad_frame_count():
    with pytest.raises(ValueError, match="4n\\+1"):
        tiny_vae().encode(random_video(frames=8))


@pytest.fixture
def saved(tmp_path):
    model = tiny_vae()
    (tmp_path / "vae_config.json").write_text(json.dumps({"dim": 8, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 1}))
    path = tmp_path / "Wan2.1_VAE.pth"

    def save(state=None):
        torch.save(model.state_dict() if state is None else state, path)
        return path

    return model, save


def test_load_round_trip(saved):
    model, save = saved
    loaded = load_vae(save(), device="cpu", dtype=torch.float32)
    assert loaded.config == TINY
    video = random_video(frames=5, size=16)
    assert torch.equal(loaded.encode(video), model.encode(video))
    latents = torch.randn(1, 16, 2, 2, 2)
    assert torch.equal(loaded.decode(latents), model.decode(latents))


def test_load_rejects_missing_extra_and_misshapen_tensors(saved):
    model, save = saved
    key = "decoder.upsamples.0.residual.2.weight"
    state = model.state_dict()

    with pytest.raises(WanError, match=re.escape(key)):
        load_vae(save({k: v for k, v in state.items() if k != key}), device="cpu", dtype=torch.float32)
    with pytest.raises(WanError, match="extra.weight"):
        load_vae(save({**state, "extra.weight": torch.zeros(1)}), device="cpu", dtype=torch.float32)
    with pytest.raises(WanError, match=re.escape(key)):
        load_vae(save({**state, key: state[key][:1]}), device="cpu", dtype=torch.float32)


def test_load_missing_file_and_bad_config(tmp_path, saved):
    with pytest.raises(WanError, match="not found"):
        load_vae(tmp_path / "nowhere" / "Wan2.1_VAE.pth", device="cpu", dtype=torch.float32)
    _, save = saved
    path = save()
    (tmp_path / "vae_config.json").write_text(json.dumps({"dim": 8, "dims": 4}))
    with pytest.raises(WanError, match="'dims'"):
        load_vae(path, device="cpu", dtype=torch.float32)
    (tmp_path / "vae_config.json").write_text(json.dumps({"z_dim": 48}))
    with pytest.raises(WanError, match="z_dim"):
        load_vae(path, device="cpu", dtype=torch.float32)


def test_frame_by_frame_decode_is_the_same_video():
    from wan_i2v.tiny import randomize_

    vae = randomize_(WanVAE(VAEConfig(dim=16, num_res_blocks=1)), seed=0).eval()
    latents = torch.randn(1, 16, 3, 6, 8)
    whole = vae.decode(latents, frame_by_frame=False)
    assert torch.equal(vae.decode(latents, frame_by_frame=True), whole)
    assert whole.shape == (1, 3, 9, 48, 64) == vae.video_shape(latents.shape)
    # Frames written as they come into a buffer the caller owns (the pipeline's is in host memory).
    buffer = torch.full(whole.shape, float("nan"))
    assert vae.decode(latents, out=buffer) is buffer and torch.equal(buffer, whole)
    with pytest.raises(ValueError, match="want float32"):
        vae.decode(latents, out=torch.empty(1, 3, 8, 48, 64))


def test_bf16_decoder_leaves_the_encode_as_it_was():
    from wan_i2v.tiny import randomize_

    vae = randomize_(WanVAE(VAEConfig(dim=16, num_res_blocks=1)), seed=0).eval()
    video = torch.rand(1, 3, 5, 32, 32) * 2 - 1
    latents = torch.randn(1, 16, 2, 4, 4)
    encoded, decoded = vae.encode(video), vae.decode(latents)
    vae.decode_in(torch.bfloat16)
    assert torch.equal(vae.encode(video), encoded)
    assert vae.decoder.conv1.weight.dtype == torch.bfloat16
    bf16 = vae.decode(latents)
    assert bf16.dtype == torch.float32 and 0 < relative_error(bf16, decoded) < 0.05


def test_channels_last_decodes_the_same_video():
    from wan_i2v.models.vae import layout_of
    from wan_i2v.tiny import randomize_

    vae = randomize_(WanVAE(VAEConfig(dim=16, num_res_blocks=1)), seed=0).eval()
    latents = torch.randn(1, 16, 3, 6, 8)
    expected = vae.decode(latents)
    vae.to_channels_last()
    assert layout_of(vae.decoder_input(latents)) == torch.channels_last_3d
    torch.testing.assert_close(vae.decode(latents), expected, rtol=0, atol=1e-5)
    # cuDNN keeps the layout through the convolutions (the CPU's do not); the padded inputs and
    # the causal caches keep what they are given.
    conv = vae.decoder.head[2]
    cache = {}
    padded = conv.padded_input(torch.randn(1, 16, 2, 6, 8).contiguous(memory_format=torch.channels_last_3d), cache)
    assert layout_of(padded) == layout_of(cache[conv]) == torch.channels_last_3d


def test_encode_in_bf16_changes_only_the_encoder():
    vae = randomize_(WanVAE(VAEConfig(dim=8, num_res_blocks=1)), seed=0).eval()
    video = torch.rand(1, 3, 5, 32, 32) * 2 - 1
    exact = vae.encode(video)
    vae.encode_in(torch.bfloat16)
    assert vae.encoder.conv1.weight.dtype == torch.bfloat16 and vae.decoder.conv1.weight.dtype == torch.float32
    approx = vae.encode(video)
    assert approx.dtype == torch.float32 and 0 < ((approx - exact).norm() / exact.norm()) < 2e-2
