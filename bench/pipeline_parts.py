"""The whole 720P pipeline at full size with random weights, part by part, on one GPU.

    python bench/pipeline_parts.py [--size 720P] [--frames 81]

Times the text encoder (umT5-XXL, both prompts), the VAE encode of the first frame plus
black frames and the VAE decode of the latents (fp32 as the official code runs it, and
bf16), and one denoising step of each expert (two guided forwards, fused norms and GELU, compiled; also both
guidance branches as one batch). A full 40-step run is then the sum with the steps
extrapolated from the schedule (15 high-noise and 25 low-noise steps at shift 5): the
steps are measured, not all run, to fit one device call.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
from pathlib import Path

import torch
from common import GB, free, measure, random_model

from wan_i2v.models.spec import WAN22_I2V_A14B as A14B
from wan_i2v.execution import ExecutionPlan, apply_plan
from wan_i2v.models.dit import DiT, DiTConfig, keeps_fp32
from wan_i2v.models.text_encoder import T5Config, TextEncoder, build_umt5
from wan_i2v.models.vae import VAEConfig, WanVAE
from wan_i2v.sampling.guidance import ClassifierFreeGuidance, Conditioning
from wan_i2v.sampling.schedulers import official_schedule
from wan_i2v.tiny import write_tiny_tokenizer

PIXELS = {"720P": (720, 1280), "480P": (480, 832)}
PROMPT = "A white cat wearing sunglasses sits on a surfboard, relaxed posture, slight head movements, beach, natural sunlight. " * 3


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="720P", choices=list(PIXELS))
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--no-steps", action="store_true", help="only the text encoder and the VAE")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    height, width = PIXELS[args.size]
    latent_frames = (args.frames - 1) // 4 + 1
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": datetime.date.today().isoformat(),
              "command": " ".join(sys.argv), "size": args.size, "frames": args.frames, "parts": {}}
    parts = report["parts"]

    def record(name, seconds, peak, resident):
        parts[name] = {"seconds": seconds, "peak_above_resident_gb": peak, "resident_gb": resident}
        print(f"{name:>28}: {seconds:7.3f} s, peak {peak:5.1f} GiB above {resident:5.1f} GiB resident", flush=True)

    # Text encoder: umT5-XXL in bf16 (the tokenizer is a stand-in: the real one is a download away;
    # the encoder runs on all 512 positions either way).
    t5_config = T5Config()
    with tempfile.TemporaryDirectory() as tokenizer_dir:
        write_tiny_tokenizer(Path(tokenizer_dir), t5_config.vocab_size)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    encoder = TextEncoder(random_model(lambda: build_umt5(t5_config), torch.bfloat16), tokenizer, text_len=512)
    resident = torch.cuda.memory_allocated() / GB
    seconds, peak = measure(lambda: encoder.encode([PROMPT, "blurry, static"]), 1, 3)
    record("text encoder (2 prompts)", seconds, peak, resident)
    del encoder
    free()

    # VAE, fp32 as official, then the decoder in bf16; set up as the pipeline does on a GPU
    # (channels-last weights, the frames written to host memory as they are decoded).
    vae = random_model(lambda: WanVAE(VAEConfig()), torch.float32).to_channels_last()
    resident = torch.cuda.memory_allocated() / GB
    video = torch.zeros(1, 3, args.frames, height, width, device="cuda")
    video[:, :, 0].uniform_(-1, 1)
    seconds, peak = measure(lambda: vae.encode(video), 1, 1)
    record("VAE encode fp32", seconds, peak, resident)
    latents = torch.randn(1, 16, latent_frames, height // 8, width // 8, device="cuda")
    decoded = torch.empty(vae.video_shape(latents.shape))
    seconds, peak = measure(lambda: vae.decode(latents, out=decoded), 1, 1)
    record("VAE decode fp32", seconds, peak, resident)
    decoded_fp32 = decoded.clone()
    vae.decode_in(torch.bfloat16)
    resident = torch.cuda.memory_allocated() / GB
    seconds, peak = measure(lambda: vae.decode(latents, out=decoded), 1, 1)
    record("VAE decode bf16", seconds, peak, resident)
    decoded_bf16 = decoded
    report["vae_decode_bf16_relative_error"] = ((decoded_bf16 - decoded_fp32).norm() / decoded_fp32.norm()).item()
    report["vae_decode_fraction_clamped"] = (decoded_fp32.abs() >= 1).float().mean().item()
    print(f"VAE bf16 decode vs fp32: relative error {report['vae_decode_bf16_relative_error']:.2e} "
          f"({report['vae_decode_fraction_clamped']:.0%} of fp32 pixels at the clamp)", flush=True)
    del vae, video, latents, decoded_fp32, decoded_bf16
    free()

    if args.no_steps:
        if args.json:
            args.json.write_text(json.dumps(report, indent=2))
        return
    # The two experts as a one-GPU run sets them up: bf16 with the fp32 islands, then the default
    # plan's transforms (the fused GELU and norms, the device's attention kernel, compile).
    config = DiTConfig()
    plan = ExecutionPlan.for_device("cuda")
    report["plan"] = f"{plan.describe()}; {plan.describe_numerics()}"
    experts = {}
    for index, name in enumerate(("high", "low")):
        experts[name] = random_model(lambda: DiT(config), torch.bfloat16, keeps_fp32, seed=index)
        apply_plan(experts[name], plan)
    resident = torch.cuda.memory_allocated() / GB
    grid = (latent_frames, height // 8, width // 8)
    latent = torch.randn(1, 16, *grid, device="cuda")
    context = torch.randn(1, 512, 4096, device="cuda", dtype=torch.bfloat16)
    conditioning = Conditioning(torch.randn(1, 20, *grid, device="cuda"), context, torch.zeros_like(context))
    step_seconds = {}
    for batched in (False, True):
        guidance = ClassifierFreeGuidance(conditioning, batched=batched)
        for name, t in (("high", 950.0), ("low", 500.0)):
            if batched and name == "low":
                continue  # same cost as high
            timestep = torch.full((1,), t, device="cuda")
            call = lambda branch, *inputs: experts[name](*inputs)  # noqa: E731
            seconds, peak = measure(lambda: guidance(call, latent, timestep, 3.5), 1, 1)
            label = f"step {name}{' (batched CFG)' if batched else ''}"
            record(label, seconds, peak, resident)
            if not batched:
                step_seconds[name] = seconds

    timesteps = official_schedule("unipc", 40, 5.0).timesteps.tolist()
    high_steps = sum(t >= A14B.experts[0].boundary for t in timesteps)  # the high-noise expert's
    denoise = high_steps * step_seconds["high"] + (len(timesteps) - high_steps) * step_seconds["low"]
    total = (parts["text encoder (2 prompts)"]["seconds"] + parts["VAE encode fp32"]["seconds"] + denoise
             + parts["VAE decode fp32"]["seconds"])
    report["extrapolated"] = {"high_steps": high_steps, "denoise_seconds": denoise, "total_seconds": total}
    print(f"40 steps ({high_steps} high, {len(timesteps) - high_steps} low): {denoise:.1f} s; "
          f"whole {args.size} {args.frames}-frame run: {total:.1f} s (text + VAE encode + steps + fp32 decode)", flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
