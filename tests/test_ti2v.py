"""Wan2.2-TI2V-5B through the model spec: its layout, defaults and sizes, and a checkpoint telling its spec."""

import json

import pytest

from wan_i2v.config import OFFICIAL, GenerationSettings, SamplingDefaults
from wan_i2v.errors import WanError
from wan_i2v.models.spec import WAN22_I2V_A14B, WAN22_TI2V_5B, spec_for, spec_of_checkpoint


def test_the_ti2v_spec_is_found_by_its_names_and_holds_the_official_layout(tmp_path):
    assert spec_for("ti2v-5b") is spec_for("ti2v-5B") is spec_for("Wan2.2-TI2V-5B") is WAN22_TI2V_5B  # ours, the official --task
    assert spec_for("i2v-a14b") is WAN22_I2V_A14B
    # The DiT's files at the top of the checkpoint, the Wan2.2 VAE, the same text encoder.
    assert WAN22_TI2V_5B.needed_files(tmp_path) == [
        "config.json",
        "diffusion_pytorch_model.safetensors.index.json",
        "Wan2.2_VAE.pth",
        "models_t5_umt5-xxl-enc-bf16.pth",
        "google/umt5-xxl/tokenizer_config.json",
        "google/umt5-xxl/tokenizer.json",
    ]
    assert WAN22_TI2V_5B.hub_patterns() == (
        "config.json", "diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model-*-of-*.safetensors",
        "Wan2.2_VAE.pth", "models_t5_umt5-xxl-enc-bf16.pth", "google/umt5-xxl/*",
    )  # fmt: skip
    assert WAN22_TI2V_5B.checkpoint_dir_of(tmp_path / "diffusion_pytorch_model-00001-of-00003.safetensors") == tmp_path
    assert WAN22_TI2V_5B.repo_folder == "models--Wan-AI--Wan2.2-TI2V-5B"


def test_a_checkpoint_tells_its_spec_by_its_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "WanModel", "model_type": "ti2v", "dim": 3072}))
    assert spec_of_checkpoint(tmp_path) is WAN22_TI2V_5B
    a14b = tmp_path / "a14b"
    (a14b / "high_noise_model").mkdir(parents=True)
    (a14b / "high_noise_model" / "config.json").write_text(json.dumps({"model_type": "i2v"}))
    assert spec_of_checkpoint(a14b) is WAN22_I2V_A14B
    assert spec_of_checkpoint(tmp_path / "nowhere") is WAN22_I2V_A14B  # the default: its loader says what is missing


def test_the_model_cards_defaults_come_from_the_spec():
    ti2v = GenerationSettings.of("a boat", defaults=SamplingDefaults.official("ti2v-5b"), seed=1)
    assert (ti2v.max_area, ti2v.frame_num, ti2v.steps, ti2v.shift, ti2v.guide_scale) == (1280 * 704, 121, 50, 5.0, (5.0, 5.0))
    assert WAN22_TI2V_5B.fps == 24 and WAN22_TI2V_5B.guide_scales(ti2v.guide_scale) == {"dit": 5.0}
    a14b = GenerationSettings.of("a boat", seed=1)  # the default model's, as before
    assert (a14b.max_area, a14b.frame_num, a14b.steps, a14b.shift, a14b.guide_scale) == (1280 * 720, 81, 40, 5.0, (3.5, 3.5))
    assert OFFICIAL == SamplingDefaults() == SamplingDefaults.official()
    # --distilled changes the sampling (lightx2v's 4 euler steps, no guidance), not the model's video:
    # a TI2V server once took the A14B's 81 frames and 1280x720 with it.
    fast = GenerationSettings.of("a boat", defaults=SamplingDefaults.recipe(True, "ti2v-5b"), seed=1)
    assert (fast.max_area, fast.frame_num, fast.steps, fast.shift, fast.guide_scale, fast.solver) == (1280 * 704, 121, 4, 5.0, (1.0, 1.0), "euler")
    assert SamplingDefaults.recipe(True) == SamplingDefaults(steps=4, guide_scale=(1.0, 1.0), shift=5.0, solver="euler")


@pytest.mark.parametrize("image,expected", [((704, 1280), (704, 1280)), ((720, 1280), (704, 1248)), ((1280, 720), (1248, 704)),
                                            ((600, 800), (800, 1088)), ((1000, 1000), (928, 960))])  # fmt: skip
def test_sizes_follow_the_official_best_output_size(image, expected):
    # The official wan.utils.utils.best_output_size(w, h, 32, 32, 1280*704)'s answers (width first or
    # height first, the closer aspect ratio: a 16:9 image is 1248*704, not 1280*704)
    assert WAN22_TI2V_5B.video_size(*image, 1280 * 704) == expected


def test_the_dit_takes_a_timestep_per_latent_frame_as_diffusers_takes_one_per_token():
    import torch
    from diffusers_names import diffusers_transformer_kwargs

    from wan_i2v.loading.names import official_to_diffusers
    from wan_i2v.models.dit import DiT, DiTConfig
    from wan_i2v.tiny import randomize_

    from diffusers import WanTransformer3DModel

    # TI2V's shape: as many channels in as out (no condition channels), 48 of them as the 5B's.
    config = DiTConfig(dim=48, ffn_dim=96, freq_dim=32, in_dim=48, out_dim=48, num_heads=4, num_layers=2, text_len=16, text_dim=24)
    model = randomize_(DiT(config), seed=1).eval()
    reference = WanTransformer3DModel(**diffusers_transformer_kwargs(config))
    reference.load_state_dict({official_to_diffusers(k): v for k, v in model.state_dict().items()}, strict=True)
    generator = torch.Generator().manual_seed(0)
    latent = torch.randn(2, 48, 3, 8, 12, generator=generator)
    context = torch.randn(2, config.text_len, config.text_dim, generator=generator)
    per_frame = torch.tensor([[0.0, 937.5, 937.5], [0.0, 400.0, 400.0]])  # the first (given) frame's is 0
    per_token = per_frame.repeat_interleave(4 * 6, dim=1)  # diffusers' expand_timesteps: [B, seq_len]
    with torch.no_grad():
        ours = model(latent, per_frame, context)
        theirs = reference(latent, per_token, context, return_dict=False)[0]
        uniform = model(latent, torch.tensor([937.5, 400.0]), context)
    assert ours.shape == latent.shape
    assert ((ours - theirs).norm() / theirs.norm()).item() <= 1e-5
    # The first frame's tokens see t = 0: the other frames' flow is not the one of a uniform timestep.
    assert (ours[:, :, 1:] - uniform[:, :, 1:]).abs().max() > 1e-3


@pytest.mark.parametrize("model", [["--model", "ti2v-5b"], ["--task", "ti2v-5B"]])
def test_the_planner_fits_720p_text_to_video_on_a_24_gib_card(model, tmp_path, capsys, monkeypatch):
    from wan_i2v.cli import main

    monkeypatch.setenv("WAN_I2V_HOME", str(tmp_path / "empty"))  # no checkpoint: the official model's shapes
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    assert main(["generate", *model, "--prompt", "a boat", "--gpu-memory", "24", "--host-memory", "64", "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    # The DiT (9.3 GiB) and the Wan2.2 VAE's 720P decode do not fit together in 24 GiB (an H200 capped
    # there ran out of memory in the decode with the DiT kept, docs/benchmarks.md): it leaves for the decode.
    assert out[0] == "plan: 1 GPU; the DiT on the GPU while it denoises, streamed in from the checkpoint; on a GPU"
    assert "video: 1280x704, 121 frames, 27280 tokens per DiT forward" in out  # the official 1280*704 (31 x 44 x 80 / 4 tokens)


def test_the_a14b_wants_an_image(tmp_path, capsys, monkeypatch):
    from wan_i2v.cli import main

    monkeypatch.setenv("WAN_I2V_HOME", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    assert main(["generate", "--prompt", "a boat", "--dry-run"]) == 2
    assert capsys.readouterr().err.strip() == "wan-i2v: error: Wan2.2-I2V-A14B makes a video from an image (give one with --image)"


def test_a_checkpoint_of_another_model_than_asked_is_refused(tiny_checkpoint, capsys):
    from wan_i2v.cli import main

    assert main(["generate", "--model", "ti2v-5b", "--ckpt-dir", str(tiny_checkpoint), "--prompt", "a boat", "--dry-run"]) == 2
    assert capsys.readouterr().err.strip() == (f"wan-i2v: error: the checkpoint in {tiny_checkpoint} is Wan2.2-I2V-A14B, not Wan2.2-TI2V-5B "
                                               "(give --ckpt-dir a Wan2.2-TI2V-5B checkpoint, or leave out --model)")


def test_generate_with_a_model_looks_for_that_models_checkpoint_in_the_cache(tmp_path):
    from wan_i2v.options import RunOptions
    from wan_i2v.session import checkpoint_dir

    with pytest.raises(WanError, match=r"no Wan-AI/Wan2.2-TI2V-5B checkpoint in .*cache quick --model ti2v-5b"):
        checkpoint_dir(RunOptions(model="ti2v-5b", cache_dir=str(tmp_path)))
    with pytest.raises(WanError, match=r"no Wan-AI/Wan2.2-I2V-A14B checkpoint in "):
        checkpoint_dir(RunOptions(cache_dir=str(tmp_path)))
