"""First and last frame, end to end: our pipeline against diffusers' WanImageToVideoPipeline on the
same tiny random checkpoint (converted to diffusers' layout), the same images, prompts and seed, on
the CPU in fp32.

    python bench/diffusers_first_last.py [--steps 8] [--seed 3]

Four diffusers runs take the causes of the difference apart; neither side is tuned (the official
schedule is swapped into diffusers' UniPC solver only to measure what the schedule accounts for):
- diffusers as users run it: its own image resizing (PIL, in its VideoProcessor) and its flow UniPC schedule;
- its resizing on the official sigma schedule: the resizing's share;
- our resized frames (as [-1, 1] tensors, which its VideoProcessor passes through) on its schedule: the schedule's share;
- our resized frames on the official schedule: what is left.
Each line: the largest and the mean absolute difference of the final latents and of the decoded
video in [-1, 1] (diffusers' own decode), and the video's PSNR against ours (a range of 2).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # diffusers' twins of our models

from diffusers_names import diffusers_i2v_pipeline  # noqa: E402

from wan_i2v import I2VPipeline  # noqa: E402
from wan_i2v.config import GenerationSettings  # noqa: E402
from wan_i2v.sampling.schedulers import official_schedule  # noqa: E402
from wan_i2v.tiny import write_tiny_checkpoint  # noqa: E402
from wan_i2v.video import demo_image, image_to_tensor  # noqa: E402

# Within the tiny text encoder's 32 tokens: the two sides' truncation of a longer prompt is not what is measured here.
PROMPT = "a small boat drifts on a calm lake"
NEGATIVE_PROMPT = "a grey sky"


def last_picture(width: int, height: int) -> Image.Image:
    """Another picture than the first, of the same aspect ratio: a diagonal gradient."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    pixels = np.stack([255 * x / width, 255 * y / height, 128 + 0 * x], axis=-1)
    return Image.fromarray(pixels.astype(np.uint8), mode="RGB")


def official_sigmas(scheduler_class, settings: GenerationSettings):
    """diffusers' UniPC solver on the official schedule (as tests/test_schedulers.py compares the solvers)."""

    class OnTheOfficialSchedule(scheduler_class):
        def set_timesteps(self, num_inference_steps=None, device=None, **kwargs):
            super().set_timesteps(num_inference_steps, device=device, **kwargs)
            schedule = official_schedule("unipc", settings.steps, settings.shift)
            self.sigmas, self.timesteps = schedule.sigmas.clone(), schedule.timesteps.clone()

    return OnTheOfficialSchedule


def difference(name: str, ours, theirs) -> str:
    latents = (ours.latents - theirs["latents"]).abs()
    video = (ours.video - theirs["video"]).abs()
    psnr = 10 * torch.log10(4 / video.square().mean()).item()
    return f"| {name} | {latents.max():.2e} | {latents.mean():.2e} | {video.max():.2e} | {video.mean():.2e} | {psnr:.1f} dB |"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as folder:
        ckpt = write_tiny_checkpoint(Path(folder) / "tiny")
        ours = I2VPipeline.from_pretrained(ckpt, device="cpu", dtype=torch.float32)
        settings = GenerationSettings.of(PROMPT, NEGATIVE_PROMPT, seed=args.seed, max_area=128 * 224, frame_num=17, steps=args.steps, shift=5.0, guide_scale=(3.0, 4.0))
        # Both pictures are downscaled (320x192 to 208x128): the resamplers' difference shows.
        first, last = demo_image(320, 192), last_picture(320, 192)
        result = ours.generate(first, settings=settings, last_image=last, progress=False)
        known = ours.known_frames(image_to_tensor(first), settings, last=image_to_tensor(last))
        height, width = known.frames.shape[2:]
        reference = diffusers_i2v_pipeline(ours, settings.shift)
        reference.set_progress_bar_config(disable=True)

        def run(images) -> dict:
            common = dict(prompt=settings.prompt, negative_prompt=settings.negative_prompt, height=height, width=width, num_frames=settings.frame_num,
                          num_inference_steps=settings.steps, guidance_scale=settings.guide_scale[1], guidance_scale_2=settings.guide_scale[0],
                          max_sequence_length=ours.text_len)  # fmt: skip
            final = {}

            def keep_latents(pipe, index, timestep, tensors):  # the last step's are the final latents
                final["latents"] = tensors["latents"][0].clone()
                return {}

            with torch.no_grad():
                video = reference(image=images[0], last_image=images[1], generator=torch.Generator().manual_seed(settings.seed), output_type="pt",
                                  callback_on_step_end=keep_latents, **common).frames  # fmt: skip
            return {**final, "video": video[0].permute(1, 0, 2, 3) * 2 - 1}

        ours_resized = [known.frames[:, 0][None], known.frames[:, 1][None]]
        theirs_resized = torch.cat([reference.video_processor.preprocess(image, height=height, width=width) for image in (first, last)])
        resizing = (theirs_resized - known.frames.transpose(0, 1)).abs()
        rows = [difference("as users run it: its resizing, its schedule", result, run([first, last]))]
        own_schedule = reference.scheduler
        reference.scheduler = official_sigmas(type(own_schedule), settings).from_config(own_schedule.config)
        rows.append(difference("its resizing, the official schedule", result, run([first, last])))
        reference.scheduler = own_schedule
        rows.append(difference("our resized frames, its schedule", result, run(ours_resized)))
        reference.scheduler = official_sigmas(type(own_schedule), settings).from_config(own_schedule.config)
        rows.append(difference("our resized frames, the official schedule", result, run(ours_resized)))

    print(f"tiny checkpoint, CPU fp32, {width}x{height}, {settings.frame_num} frames, {settings.steps} steps, shift {settings.shift}, "
          f"guide scales (low, high) {settings.guide_scale}, seed {settings.seed}, torch {torch.__version__}")  # fmt: skip
    print("| diffusers run | latents max abs | latents mean abs | video max abs | video mean abs | video PSNR |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"resized frames (first, last), diffusers' against ours in [-1, 1]: max abs {resizing.max():.3f}, mean abs {resizing.mean():.4f}")
    own_schedule.set_timesteps(settings.steps)
    print("diffusers' timesteps:", own_schedule.timesteps.tolist())
    print("official timesteps: ", official_schedule("unipc", settings.steps, settings.shift).timesteps.tolist())
    print("diffusers' sigmas:", [round(s, 4) for s in own_schedule.sigmas.tolist()])
    print("official sigmas:  ", [round(s, 4) for s in official_schedule("unipc", settings.steps, settings.shift).sigmas.tolist()])


if __name__ == "__main__":
    main()
