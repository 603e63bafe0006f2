"""Wan2.2-TI2V-5B's pipeline on a tiny checkpoint in the official layout, against diffusers' Wan2.2
TI2V pipelines (``expand_timesteps=True``) run on the same weights, CPU fp32.

Where diffusers' pipeline differs from the official ``WanTI2V.generate``, and how the test deals with it:
- The image's latent: the official loop puts it back into the first latent frame after every solver
  step (``latent = (1 - mask2) * z + mask2 * latent``), as ours does; diffusers mixes it into the
  model's input each step and into the latents only at the end. The solvers' steps act element by
  element, so the other frames go the same way in both and the first ends as the image's latent:
  the same latents (compared here).
- The image's size: the official code scales the image to cover the video's size (Lanczos) and crops
  its centre; diffusers resizes it to the size. The test gives an image at the video's size, where
  both leave it as it is; the sizing rule is checked against the official ``best_output_size`` in
  test_ti2v.py.
- The schedule: diffusers makes its own sigmas; its solver is given the official ones, as in test_schedulers.py.
- Text-to-video: the official model is given t per token (all equal), ours one per sample: the same
  numbers, by other rounding (within 1e-5).
- The prompts go in as our text encoder's features (diffusers' encoder is transformers' umT5, which
  test_text_encoder.py compares with ours).
"""

import pytest
import torch
from diffusers_names import diffusers_transformer_kwargs
from test_schedulers import diffusers_reference
from test_ti2v_vae import diffusers_twin as diffusers_vae

from wan_i2v.config import GenerationSettings, SamplingDefaults
from wan_i2v.errors import WanError
from wan_i2v.loading.names import official_to_diffusers
from wan_i2v.models.spec import WAN22_TI2V_5B
from wan_i2v.sampling.schedulers import official_schedule
from wan_i2v.tiny import write_tiny_checkpoint
from wan_i2v.video import demo_image

SMALL = dict(max_area=64 * 96, frame_num=9, steps=5, seed=3)


@pytest.fixture(scope="module")
def ti2v(tmp_path_factory):
    from wan_i2v import I2VPipeline

    root = write_tiny_checkpoint(tmp_path_factory.mktemp("ti2v") / "tiny", spec="ti2v-5b")
    return I2VPipeline.from_pretrained(root, device="cpu", dtype=torch.float32, spec="ti2v-5b")


def diffusers_pipeline(pipe, with_image: bool, steps: int):
    """diffusers' pipeline over our tiny model's weights, its scheduler on the official schedule."""
    from diffusers import WanImageToVideoPipeline, WanPipeline, WanTransformer3DModel

    model = pipe.experts.models["dit"]
    transformer = WanTransformer3DModel(**diffusers_transformer_kwargs(model.config)).eval()
    transformer.load_state_dict({official_to_diffusers(k): v for k, v in model.state_dict().items()}, strict=True)
    schedule = official_schedule("unipc", steps, 5.0)
    scheduler = diffusers_reference("unipc", schedule)
    scheduler.set_timesteps = lambda *args, **kwargs: None  # keep the official schedule set above
    kind = WanImageToVideoPipeline if with_image else WanPipeline
    return kind(tokenizer=None, text_encoder=None, vae=diffusers_vae(pipe.vae), scheduler=scheduler, transformer=transformer, expand_timesteps=True)


def relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("with_image", [True, False], ids=["image-to-video", "text-to-video"])
def test_latents_and_video_equal_diffusers(ti2v, with_image):
    image = demo_image(96, 64) if with_image else None  # at the video's size: diffusers resizes otherwise (see below)
    settings = GenerationSettings.of("a boat", defaults=SamplingDefaults.official(WAN22_TI2V_5B), **SMALL)
    prepared = ti2v.prepare(image, settings)
    ours = ti2v.sample(prepared)
    video = ti2v.decode(ours)

    reference = diffusers_pipeline(ti2v, with_image, settings.steps)
    kwargs = dict(
        prompt_embeds=prepared.conditioning.context, negative_prompt_embeds=prepared.conditioning.context_null,
        height=64, width=96, num_frames=9, num_inference_steps=settings.steps, guidance_scale=5.0,
        latents=prepared.noise[None].clone(), output_type="latent", return_dict=False,
    )  # fmt: skip
    with torch.no_grad():
        theirs = reference(image=image, **kwargs)[0] if with_image else reference(**kwargs)[0]
        vae = reference.vae
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
        std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
        their_video = vae.decode(theirs * std + mean).sample.clamp(-1, 1)[0]
    assert ours.shape == (48, 3, 4, 6) and video.shape == (3, 9, 64, 96)
    assert relative_error(ours, theirs[0]) <= 1e-5
    assert relative_error(video, their_video) <= 1e-5
    if with_image:  # the image's latent is the first latent frame, as given
        assert torch.equal(ours[:, :1], prepared.conditioning.fixed.latents[0, :, :1])


def test_the_image_is_fitted_as_the_official_code_fits_it(ti2v):
    # 16:9 in the area of 64*96: the official best_output_size(160, 90, 32, 32, 6144) is 96 x 64 (width
    # first: 104.5 rounded down to 32s, then 6144 / 96 = 64); the image is scaled to cover it and cropped.
    settings = GenerationSettings.of("a boat", max_area=64 * 96, frame_num=9)
    assert ti2v.video_size(torch.zeros(3, 90, 160), settings) == (64, 96)
    condition = ti2v.encode_frames(ti2v.known_frames(torch.rand(3, 90, 160) * 2 - 1, settings), 9)
    assert condition.channels is None and condition.fixed.latents.shape == (1, 48, 3, 4, 6)
    assert condition.fixed.frames.tolist() == [True, False, False]


def test_without_an_image_the_a14b_refuses_and_ti2v_makes_text_to_video(tiny_pipeline, ti2v):
    with pytest.raises(WanError, match="Wan2.2-I2V-A14B makes a video from an image"):
        tiny_pipeline.generate(None, "a boat", progress=False, **SMALL)
    condition = ti2v.encode_frames(None, 9)
    assert condition.channels is None and condition.fixed is None


def test_decode_takes_the_checkpoints_model(ti2v, tiny_checkpoint, tmp_path, capsys):
    import av

    from wan_i2v.cli import main
    from wan_i2v.session import LATENTS_FORMAT

    latents = tmp_path / "ti2v.latents.pt"
    torch.save({"format": LATENTS_FORMAT, "latents": torch.randn(48, 2, 4, 6, generator=torch.Generator().manual_seed(0))}, latents)
    out = tmp_path / "out.mp4"
    assert main(["decode", str(latents), "--save-file", str(out), "--ckpt-dir", str(ti2v.checkpoint), "--device", "cpu", "--quiet"]) == 0
    with av.open(str(out)) as container:
        stream = container.streams.video[0]
        assert (stream.average_rate, stream.frames, stream.width, stream.height) == (24, 5, 96, 64)  # TI2V's 24 fps, 16x the latents
    assert main(["decode", str(latents), "--save-file", str(tmp_path / "a14b.mp4"), "--ckpt-dir", str(tiny_checkpoint), "--device", "cpu"]) == 2
    assert capsys.readouterr().err.strip() == (f"wan-i2v: error: {latents} holds latents of another model than Wan2.2-I2V-A14B's in {tiny_checkpoint} "
                                               "(give --ckpt-dir the checkpoint that made them)")


def test_streamed_blocks_and_fp8_make_ti2vs_video(ti2v):
    """With an image (a timestep per latent frame): blocks streamed from the checkpoint's files give the
    resident model's latents to the bit, FP8 gives finite latents near them, and FP8 blocks streamed
    (from a converted copy of the DiT at the checkpoint's top) give resident FP8's to the bit."""
    from wan_i2v import I2VPipeline

    run = dict(max_area=64 * 96, frame_num=5, steps=2, seed=3, progress=False)

    def latents(**options):
        pipe = ti2v if not options else I2VPipeline.from_pretrained(ti2v.checkpoint, device="cpu", dtype=torch.float32, **options)
        return pipe.generate(demo_image(96, 64), "a boat", **run).latents

    resident, fp8 = latents(), latents(fp8=True)
    assert torch.equal(latents(offload="blocks"), resident)
    assert torch.isfinite(fp8).all()
    assert 1e-3 < relative_error(fp8, resident) < 0.1  # e4m3's 3 mantissa bits, averaged down by the dot products
    assert torch.equal(latents(fp8=True, offload="blocks"), fp8)


def test_an_interrupted_ti2v_run_resumes_where_it_stopped(ti2v, tmp_path):
    """With an image (its latent frame put back after every step): a run cut in its third step resumes
    from the saved state to the unbroken run's latents, to the bit (the same operations in the same order)."""
    from test_pipeline import Crash, crash_after

    state = tmp_path / "run.state.pt"
    run = dict(max_area=64 * 96, frame_num=5, steps=4, seed=3, progress=False)
    with crash_after(ti2v, 5), pytest.raises(Crash):  # two guided forwards a step: two steps saved
        ti2v.generate(demo_image(96, 64), "a boat", state_file=state, **run)
    assert torch.load(state, weights_only=True)["step"] == 2
    resumed = ti2v.generate(demo_image(96, 64), "a boat", state_file=state, **run)
    assert len(resumed.experts_used) == 4 - 2 and resumed.experts_used[0] == "dit"
    assert torch.equal(resumed.latents, ti2v.generate(demo_image(96, 64), "a boat", **run).latents)


def test_a_lora_on_ti2vs_one_expert_equals_its_weights_merged_by_hand(ti2v, tmp_path):
    """The spec names the dense DiT's one expert ``dit`` (its files at the checkpoint's top): a LoRA on
    it gives the video of the checkpoint with the LoRA merged into those files by hand."""
    from test_lora import expert_weights, lightx2v_lora, merge_by_hand

    from wan_i2v import I2VPipeline

    run = dict(max_area=64 * 96, frame_num=5, steps=2, seed=3, progress=False)
    path = tmp_path / "lora.safetensors"
    deltas = lightx2v_lora(path, expert_weights(ti2v.checkpoint, ""), seed=1)
    merged = merge_by_hand(ti2v.checkpoint, tmp_path / "merged", "", [(deltas, 0.7)])

    def latents(root, **options):
        pipe = I2VPipeline.from_pretrained(root, device="cpu", dtype=torch.float32, **options)
        return pipe.generate(demo_image(96, 64), "a boat", **run).latents

    with_lora = latents(ti2v.checkpoint, loras={"dit": [(path, 0.7)]})
    assert torch.equal(with_lora, latents(merged))
    assert not torch.equal(with_lora, ti2v.generate(demo_image(96, 64), "a boat", **run).latents)
