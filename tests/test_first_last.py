"""First and last frame: the condition against diffusers', the sizes the frames are fitted to, the
run's identity and what the mp4 records."""

import hashlib
import json
import threading

import av
import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_names import diffusers_i2v_pipeline
from wan_i2v.config import GenerationSettings
from wan_i2v.errors import WanError
from wan_i2v.pipeline import Cancelled
from wan_i2v.video import demo_image

SMALL = dict(max_area=64 * 96, frame_num=9, steps=2, shift=3.0)
FAST = dict(SMALL, max_area=32 * 64, frame_num=5)  # (the runs that need no particular size)


def last_picture(width: int = 320, height: int = 192) -> Image.Image:
    """Another picture than the demo's: a horizontal gradient."""
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    pixels = np.broadcast_to(np.concatenate([x, 255 - x, np.full_like(x, 60)], axis=2), (height, width, 3))
    return Image.fromarray(pixels.astype(np.uint8), mode="RGB")


@torch.no_grad()
def test_the_first_and_last_frame_condition_equals_diffusers(tiny_pipeline):
    settings = GenerationSettings.of("a boat", **SMALL)
    pixels = [torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 127.5 - 1 for image in (demo_image(), last_picture())]
    known = tiny_pipeline.known_frames(pixels[0], settings, last=pixels[1])
    ours = tiny_pipeline.encode_frames(known, settings.frame_num).channels
    reference = diffusers_i2v_pipeline(tiny_pipeline, settings.shift)
    first, last = known.frames[:, 0], known.frames[:, 1]
    height, width = first.shape[1:]
    _, theirs = reference.prepare_latents(first[None], 1, 16, height, width, settings.frame_num, torch.float32, torch.device("cpu"),
                                          torch.Generator().manual_seed(0), last_image=last[None])  # fmt: skip
    assert ours.shape == theirs[0].shape == (20, 3, height // 8, width // 8)
    assert torch.equal(ours[:4], theirs[0, :4])  # the mask: exact
    assert (ours[4:] - theirs[0, 4:]).abs().max() <= 1e-5  # the VAE's latents: the same convolutions, fp32 rounding
    assert ours[4:, -1].abs().max() > 0.1  # the last latent frame holds the last image (black frames would not)


def test_the_last_image_conditions_the_video(tiny_pipeline):
    settings = GenerationSettings.of("a boat", seed=3, **FAST)
    first_only = tiny_pipeline.prepare(demo_image(), settings)
    with_last = tiny_pipeline.prepare(demo_image(), settings, last_image=last_picture())
    other_last = tiny_pipeline.prepare(demo_image(), settings, last_image=last_picture().transpose(Image.FLIP_LEFT_RIGHT))
    conditions = [prepared.conditioning.condition[0] for prepared in (first_only, with_last, other_last)]
    assert torch.equal(conditions[0][:, 0], conditions[1][:, 0])  # the first frame's latent frame: the same
    assert (conditions[1][:, -1] - conditions[0][:, -1]).abs().max() > 1e-2  # the last: given, not black
    assert (conditions[1][:, -1] - conditions[2][:, -1]).abs().max() > 1e-2
    assert first_only.given == {"conditioning": "first frame", "image_sha256": hashlib.sha256(np.asarray(demo_image()).tobytes()).hexdigest()}
    assert with_last.given["conditioning"] == "first and last frame"


def test_a_last_image_of_another_shape_is_center_cropped_to_the_video(tiny_pipeline):
    settings = GenerationSettings.of("a boat", **SMALL)
    first = torch.zeros(3, 192, 320)
    # Twice as wide: covering the 48x96 video keeps its middle half; the outer quarters (+-1) are cut off.
    wide = torch.zeros(3, 48, 192)
    wide[:, :, :48], wide[:, :, -48:] = 1.0, -1.0
    known = tiny_pipeline.known_frames(first, settings, last=wide)
    assert known.frames.shape == (3, 2, 48, 96) and known.positions == (0, 8)
    assert known.frames[:, 1].abs().max() == 0
    # Of the first image's shape, the last is resized as the first is: the official resize, no crop.
    same_shape = torch.rand(3, 192, 320) * 2 - 1
    resized = torch.nn.functional.interpolate(same_shape[None], size=(48, 96), mode="bicubic")[0]
    assert torch.equal(tiny_pipeline.known_frames(first, settings, last=same_shape).frames[:, 1], resized)


def test_an_exact_size_crops_the_image_to_it(tiny_pipeline):
    settings = GenerationSettings.of("a boat", height=64, width=64, frame_num=5, steps=1, shift=3.0)
    assert settings.max_area == 64 * 64 and settings.video_size(192, 320) == (64, 64)
    image = torch.zeros(3, 64, 128)
    image[:, :, :32], image[:, :, -32:] = 1.0, -1.0  # the outer quarters, cut off by the square crop
    known = tiny_pipeline.known_frames(image, settings)
    assert known.frames.shape == (3, 1, 64, 64) and known.frames.abs().max() == 0  # (a whole run at an exact size: tests/test_server.py)


@pytest.mark.parametrize("given,message", [
    (dict(height=64), "height and width go together"),
    (dict(height=64, width=72), "width=72 is not a multiple of 16"),
    (dict(height=64, width=64, size="480P"), "size and height/width both set the video's size"),
    (dict(fps=0), "fps 0 out of range"),
])  # fmt: skip
def test_exact_sizes_and_frame_rates_are_checked(given, message):
    with pytest.raises(WanError, match=message):
        GenerationSettings.of("a boat", **given)


def test_an_exact_size_is_checked_against_the_model_s_latent_patch():
    """TI2V-5B's patch is 32 pixels (VAE stride 16, patch 2), the A14B's 16: 48 pixels is one and a
    half of TI2V's patches, which once reached the sampler as a shape mismatch."""
    from wan_i2v.config import SamplingDefaults

    assert GenerationSettings.of("a boat", height=48, width=80).video_size() == (48, 80)
    ti2v = SamplingDefaults(model="Wan2.2-TI2V-5B")
    with pytest.raises(WanError, match="height.48 is not a multiple of 32 .*TI2V-5B"):
        GenerationSettings.of("a boat", defaults=ti2v, height=48, width=64)
    with pytest.raises(WanError, match="width.80 is not a multiple of 32"):  # settings made without the model, then used with it
        GenerationSettings.of("a boat", height=64, width=80).video_size(spec="ti2v-5b")
    assert GenerationSettings.of("a boat", defaults=ti2v, height=64, width=96).video_size(spec="ti2v-5b") == (64, 96)


def test_a_state_saved_with_another_last_image_is_not_resumed(tiny_pipeline, tmp_path):
    state = tmp_path / "run.state.pt"
    settings = dict(progress=False, seed=6, **FAST)
    cancel = threading.Event()
    with pytest.raises(Cancelled):
        tiny_pipeline.generate(demo_image(), "a boat", state_file=state, last_image=last_picture(), cancel=cancel,
                               callback_on_step_end=lambda *_: cancel.set() or {}, **settings)  # fmt: skip
    assert torch.load(state, weights_only=True)["step"] == 1
    other = last_picture().transpose(Image.FLIP_LEFT_RIGHT)
    with pytest.warns(UserWarning, match="of another run"):
        restarted = tiny_pipeline.generate(demo_image(), "a boat", state_file=state, last_image=other, **settings)
    assert len(restarted.experts_used) == FAST["steps"]
    assert torch.equal(restarted.latents, tiny_pipeline.generate(demo_image(), "a boat", last_image=other, **settings).latents)


def test_the_mp4_records_the_frames_given_and_its_frame_rate(tiny_pipeline, tmp_path):
    out = tmp_path / "out.mp4"
    tiny_pipeline.generate(demo_image(), "a boat", seed=2, progress=False, last_image=last_picture(), video_file=out, fps=8, **FAST)
    with av.open(str(out)) as container:
        metadata = json.loads(container.metadata["comment"])
        rate = container.streams.video[0].average_rate
    assert rate == 8 and metadata["fps"] == 8
    assert metadata["conditioning"] == "first and last frame"
    assert metadata["image_sha256"] == hashlib.sha256(np.asarray(demo_image()).tobytes()).hexdigest()
    assert metadata["last_image_sha256"] == hashlib.sha256(np.asarray(last_picture()).tobytes()).hexdigest()


def run_cli(*args) -> int:
    from wan_i2v.cli import main

    return main(["generate", "--prompt", "a boat", "--frame-num", "5", "--steps", "1", "--quiet", "--device", "cpu", *args])


def test_generate_with_a_last_image_and_a_frame_rate(tiny_checkpoint, tmp_path, capsys):
    first, last, out = tmp_path / "first.png", tmp_path / "last.png", tmp_path / "out.mp4"
    demo_image(96, 64).save(first)
    last_picture(96, 64).save(last)
    common = ["--ckpt-dir", str(tiny_checkpoint), "--image", str(first), "--size", "64*96"]
    assert run_cli(*common, "--last-image", str(last), "--dry-run") == 0
    assert "conditioning: first and last frame" in capsys.readouterr().out
    assert run_cli(*common, "--dry-run") == 0
    assert "conditioning: first frame" in capsys.readouterr().out
    assert run_cli(*common, "--last-image", str(last), "--fps", "12", "--save-file", str(out)) == 0
    with av.open(str(out)) as container:
        metadata = json.loads(container.metadata["comment"])
        assert container.streams.video[0].average_rate == 12
    assert metadata["conditioning"] == "first and last frame" and metadata["fps"] == 12
    assert metadata["last_image_sha256"] == hashlib.sha256(np.asarray(Image.open(last).convert("RGB")).tobytes()).hexdigest()


@pytest.mark.parametrize("flags,message", [
    (["--last-image", "nowhere.png"], "last image not found: nowhere.png (check the --last-image path)"),
    (["--height", "64"], "--height and --width go together"),
    (["--height", "64", "--width", "100"], "--width 100 is not a multiple of 16 of at least 32 (Wan2.2-I2V-A14B's VAE stride times its patch size) (use 96 or 112)"),
    (["--height", "64", "--width", "64", "--size", "480P"], "--size and --height/--width both set the video's size"),
    (["--fps", "0"], "--fps 0 out of range"),
])  # fmt: skip
def test_bad_frames_sizes_and_rates_are_one_line(tiny_checkpoint, tmp_path, capsys, flags, message):
    first = tmp_path / "first.png"
    demo_image(96, 64).save(first)
    assert run_cli("--ckpt-dir", str(tiny_checkpoint), "--image", str(first), *flags) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"wan-i2v: error: {message}") and err.count("\n") == 1
