"""The whole pipeline end to end at full size with random weights, through the real API.

    python bench/pipeline_e2e.py [--size 480P] [--steps 4] [--cap-gb 24] [--json FILE]

``I2VPipeline.from_pretrained`` runs as a user calls it, with only its three loaders
replaced by full-size models with random weights (no download; the tokenizer is a
stand-in). At 480P (or 720P), 81 frames, a few steps (both experts run), it times and compares:

- resident: both experts on the GPU (the default on an 80 GB card);
- ``offload="experts"``: one expert at a time, the arriving one streamed behind compute;
  its extra denoising time over the resident run is what the swaps cost;
- ``offload="blocks"`` under a simulated 24 GB card (``set_per_process_memory_fraction``
  after loading): text encoder, VAE and both experts, peak memory of the whole run;
- ``fp8=True``: the latents' and the video's relative error against the bf16 run.

Each configuration runs twice (the first run compiles) and the second is reported.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import GB, free, random_model

from wan_i2v import pipeline
from wan_i2v.models.spec import WAN22_I2V_A14B as A14B
from wan_i2v.models.dit import DiT, DiTConfig, keeps_fp32
from wan_i2v.models.text_encoder import T5Config, TextEncoder, build_umt5
from wan_i2v.tiny import write_tiny_tokenizer
from wan_i2v.models.vae import VAEConfig, WanVAE
from wan_i2v.video import demo_image

PROMPT = "A white cat wearing sunglasses sits on a surfboard, relaxed posture, slight head movements, beach, natural sunlight."


def random_loaders(tokenizer_dir: Path) -> None:
    """Point the pipeline's loaders at random full-size models, built on the GPU (fast) and moved
    where the pipeline asked; the same seed per expert in every configuration."""
    t5_config = T5Config()
    write_tiny_tokenizer(tokenizer_dir, t5_config.vocab_size)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)

    def load_dit(model_dir, *, device, dtype):
        seed = 0 if "high" in model_dir.name else 1
        return random_model(lambda: DiT(DiTConfig()), dtype, keeps_fp32, seed=seed).to(device)

    def load_text_encoder(t5_path, tokenizer_dir, *, text_len, device, dtype):
        return TextEncoder(random_model(lambda: build_umt5(t5_config), dtype, seed=2).to(device), tokenizer, text_len)

    def load_vae(path, *, device, dtype):
        return random_model(lambda: WanVAE(VAEConfig()), dtype, seed=3).to(device)

    pipeline.load_dit = load_dit
    pipeline.TextEncoder.load = staticmethod(load_text_encoder)
    pipeline.load_vae = load_vae


def relative_error(x: torch.Tensor, reference: torch.Tensor) -> float:
    return ((x.float() - reference.float()).norm() / reference.float().norm()).item()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="480P", choices=["480P", "720P"])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--cap-gb", type=float, default=24.0)
    parser.add_argument("--configs", nargs="+", default=["resident", "experts", "blocks", "fp8"])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": datetime.date.today().isoformat(),
              "command": " ".join(sys.argv), "size": args.size, "frames": 81, "steps": args.steps, "runs": {}}
    workdir = Path(tempfile.mkdtemp())
    random_loaders(workdir / "tokenizer")
    preset = A14B.presets[args.size]
    image = demo_image(*{"480P": (832, 480), "720P": (1280, 720)}[args.size])
    settings = dict(max_area=preset.max_area, frame_num=81, steps=args.steps, shift=preset.shift, seed=7, progress=False)
    options = {"resident": {}, "experts": {"offload": "experts"}, "blocks": {"offload": "blocks"}, "fp8": {"fp8": True}}
    results = {}
    for name in args.configs:
        free()
        started = time.perf_counter()
        pipe = pipeline.I2VPipeline.from_pretrained(workdir, device="cuda", **options[name])
        load_seconds = time.perf_counter() - started
        if name == "blocks":
            free()
            torch.cuda.set_per_process_memory_fraction(args.cap_gb * GB / torch.cuda.get_device_properties(0).total_memory)
        pipe.generate(image, PROMPT, **{**settings, "steps": 2})  # compiles both experts
        result = pipe.generate(image, PROMPT, **settings)
        torch.cuda.set_per_process_memory_fraction(1.0)
        results[name] = result
        run = {"seconds": dict(result.timings), "total_seconds": sum(result.timings.values()),
               "peak_gb": result.peak_memory_gb, "experts": result.experts_used, "setup_seconds": load_seconds}
        if name != "resident" and "resident" in results:
            reference = results["resident"]
            run["latents_relative_error_vs_resident"] = relative_error(result.latents, reference.latents)
            run["video_relative_error_vs_resident"] = relative_error(result.video, reference.video)
            run["denoising_seconds_over_resident"] = result.timings["denoising"] - reference.timings["denoising"]
        report["runs"][name] = run
        stages = ", ".join(f"{stage} {seconds:.2f} s" for stage, seconds in result.timings.items())
        extra = ""
        if "latents_relative_error_vs_resident" in run:
            extra = (f"; vs resident: latents {run['latents_relative_error_vs_resident']:.2e}, video "
                     f"{run['video_relative_error_vs_resident']:.2e}, denoising {run['denoising_seconds_over_resident']:+.2f} s")
        print(f"{name:>9}: {stages}; peak {result.peak_memory_gb:.1f} GiB; experts {result.experts_used}{extra}", flush=True)
        del pipe, result
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
