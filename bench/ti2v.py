"""Wan2.2-TI2V-5B on one GPU, random weights at full size (issue #24's figures), in one run:

    python bench/ti2v.py                        # forward, video, and the video under a 24 GiB cap
    python bench/ti2v.py --parts forward --layers 2 --frames 9   # smoke test

- forward: one DiT forward at 720P (1280*704, 121 frames: 31 x 44 x 80 latents, 27280 tokens),
  the image's latent frame at timestep 0: our default one-GPU plan (compiled) against diffusers'
  ``WanTransformer3DModel`` at the 5B config over the same weights (its per-token timesteps);
- video: a whole 50-step 720P video through ``I2VPipeline`` on a random checkpoint in the official
  layout written once to ``--checkpoint`` (bf16, ~21 GB): time per stage, GPU peak, host peak;
- capped: the same under a 24 GiB GPU cap (``set_per_process_memory_fraction`` before loading;
  the planner picks the placement for ``--gpu-memory 24``).

The arguments and the shapes are computed without CUDA (``parse_args``, ``forward_shapes``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from wan_i2v.models.spec import WAN22_TI2V_5B  # noqa: E402

PROMPT = "A white cat wearing sunglasses sits on a surfboard, relaxed posture, slight head movements, beach, natural sunlight."
HEIGHT, WIDTH = WAN22_TI2V_5B.defaults.text_to_video_shape  # 704 x 1280, the official 720P


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", nargs="+", default=["forward", "video", "capped"], choices=["forward", "video", "capped"])
    parser.add_argument("--frames", type=int, default=WAN22_TI2V_5B.defaults.frame_num, help="4n+1 (default 121)")
    parser.add_argument("--steps", type=int, default=WAN22_TI2V_5B.defaults.steps, help="of the whole video (default 50)")
    parser.add_argument("--layers", type=int, default=None, help="DiT layers (default the 5B's 30)")
    parser.add_argument("--repeats", type=int, default=3, help="forwards timed after the compiling one")
    parser.add_argument("--cap-gb", type=float, default=24.0)
    parser.add_argument("--checkpoint", type=Path, default=Path("/tmp/wan-ti2v-random"), help="the random checkpoint (written if missing)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if (args.frames - 1) % 4:
        parser.error(f"--frames {args.frames} is not of the form 4n+1")
    return args


def forward_shapes(frames: int) -> dict:
    """The latent grid and the DiT's sequence length of a 720P video of ``frames`` frames."""
    channels, latent_frames, height, width = WAN22_TI2V_5B.latent_shape(frames, HEIGHT, WIDTH)
    return {"latent": (1, channels, latent_frames, height, width), "tokens": WAN22_TI2V_5B.dit_tokens(frames, HEIGHT, WIDTH)}


def dit_config(layers: int | None):
    from dataclasses import replace

    from wan_i2v.models.dit import TI2V5BConfig

    return TI2V5BConfig() if layers is None else replace(TI2V5BConfig(), num_layers=layers)


def forward(args) -> dict:
    import torch
    from common import measure
    from dit_forward import build_diffusers, build_ours

    from wan_i2v.execution import ExecutionPlan, apply_plan

    config = dit_config(args.layers)
    shapes = forward_shapes(args.frames)
    ours = build_ours(config, torch.bfloat16)
    reference = build_diffusers(ours)  # shares the weights (bf16 copies of the fp32 islands)
    apply_plan(ours, ExecutionPlan.for_device("cuda"))
    g = torch.Generator(device="cuda").manual_seed(7)
    latent = torch.randn(*shapes["latent"], generator=g, device="cuda")
    context = torch.randn(1, config.text_len, config.text_dim, generator=g, device="cuda")
    context[:, 120:] = 0
    per_frame = torch.full((1, shapes["latent"][2]), 937.5, device="cuda")
    per_frame[:, 0] = 0  # the image's latent frame
    per_token = per_frame.repeat_interleave(shapes["tokens"] // shapes["latent"][2], dim=1)
    runs = {
        "ours (plan, compiled)": lambda: ours(latent, per_frame, context),
        "diffusers": lambda: reference(latent.to(torch.bfloat16), per_token, context.to(torch.bfloat16), return_dict=False)[0],
    }
    results = {}
    with torch.no_grad():
        outputs = {name: run().float() for name, run in runs.items()}  # (ours compiles here)
        for name, run in runs.items():
            seconds, peak = measure(run, warmup=1, repeats=args.repeats)
            results[name] = {"seconds": seconds, "activation_peak_gb": peak}
            print(f"forward {name}: {seconds:.3f} s, activations {peak:.1f} GiB", flush=True)
    ours_out, theirs = outputs.values()
    results["relative_difference"] = ((ours_out - theirs).norm() / theirs.norm()).item()
    results["speedup"] = results["diffusers"]["seconds"] / results["ours (plan, compiled)"]["seconds"]
    print(f"forward: ours {results['speedup']:.2f}x diffusers' speed (target >= 1.10), outputs differ by {results['relative_difference']:.2e}", flush=True)
    return {"tokens": shapes["tokens"], **results}


def write_random_checkpoint(root: Path, layers: int | None) -> Path:
    """A full-size TI2V-5B checkpoint of random bf16 weights in the official layout (once)."""
    import torch
    from common import random_model
    from safetensors.torch import save_file

    from wan_i2v.models.dit import DiT, keeps_fp32
    from wan_i2v.models.text_encoder import T5Config, build_umt5
    from wan_i2v.models.vae2_2 import VAE22Config
    from wan_i2v.tiny import save_text_encoder, write_tiny_tokenizer

    if (root / "config.json").is_file():
        return root
    root.mkdir(parents=True, exist_ok=True)
    files = WAN22_TI2V_5B.files
    dit = random_model(lambda: DiT(dit_config(layers)), torch.bfloat16, keeps_fp32, seed=0)
    save_file({k: v.contiguous().cpu() for k, v in dit.state_dict().items()}, str(root / "diffusion_pytorch_model.safetensors"))
    del dit
    vae = random_model(lambda: VAE22Config().build(), torch.float32, seed=1)
    torch.save({k: v.cpu() for k, v in vae.state_dict().items()}, root / files.vae)
    del vae
    save_text_encoder(random_model(lambda: build_umt5(T5Config()), torch.bfloat16, seed=2), root / files.text_encoder)
    write_tiny_tokenizer(root / files.tokenizer_dir, 256)  # a stand-in vocabulary (the weights are random anyway)
    config = {"_class_name": "WanModel", "model_type": WAN22_TI2V_5B.model_type, **dit_config(layers).__dict__}
    (root / "config.json").write_text(json.dumps(config, indent=2))
    torch.cuda.empty_cache()
    return root


def host_peak_kib() -> int:
    """This process's peak resident memory since the last reset (Linux's VmHWM)."""
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1])


def video(args, cap_gb: float | None) -> dict:
    from dataclasses import replace

    import torch
    from common import GB, free

    from wan_i2v.config import GenerationSettings, SamplingDefaults
    from wan_i2v.options import RunOptions
    from wan_i2v.session import RunSession, plan
    from wan_i2v.video import demo_image

    root = write_random_checkpoint(args.checkpoint, args.layers)
    free()
    if cap_gb is not None:
        torch.cuda.set_per_process_memory_fraction(cap_gb * GB / torch.cuda.get_device_properties(0).total_memory)
    options = RunOptions(ckpt_dir=root, device="cuda", gpu_memory=cap_gb)
    session_plan = plan(options, height=HEIGHT, width=WIDTH, frame_num=args.frames)
    print(f"video plan{'' if cap_gb is None else f' under {cap_gb:g} GiB'}: {session_plan.planned.plan.describe()}", flush=True)
    settings = GenerationSettings.of(PROMPT, defaults=SamplingDefaults.official(WAN22_TI2V_5B), frame_num=args.frames, steps=args.steps, seed=7)
    image = demo_image(WIDTH, HEIGHT)
    with RunSession.open(session_plan) as session:
        session.generate(image, settings=replace(settings, steps=2), progress=False)  # compiles
        torch.cuda.reset_peak_memory_stats()
        Path("/proc/self/clear_refs").write_text("5")  # resets the peak resident size (VmHWM) to the current one
        started = time.perf_counter()
        result = session.generate(image, settings=settings, progress=False)
        seconds = time.perf_counter() - started
    torch.cuda.set_per_process_memory_fraction(1.0)
    host_peak_gb = host_peak_kib() / 2**20
    run = {"seconds": seconds, "stages": result.timings, "gpu_peak_gb": result.peak_memory_gb, "host_peak_gb": host_peak_gb,
           "plan": session_plan.planned.plan.describe()}  # fmt: skip
    print(f"video{'' if cap_gb is None else f' ({cap_gb:g} GiB cap)'}: {seconds:.1f} s ({', '.join(f'{k} {v:.1f} s' for k, v in result.timings.items())}); "
          f"GPU peak {result.peak_memory_gb:.1f} GiB, host peak {host_peak_gb:.1f} GiB", flush=True)  # fmt: skip
    return run


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": datetime.date.today().isoformat(),
              "command": " ".join(sys.argv), "frames": args.frames, "steps": args.steps, "tokens": forward_shapes(args.frames)["tokens"]}  # fmt: skip
    if args.json and args.json.is_file():  # a run split over several calls adds its parts
        earlier = json.loads(args.json.read_text())
        report = {**earlier, **{key: report[key] for key in ("date", "torch", "device")}, "command": f"{earlier['command']} ; {report['command']}"}
    runs = {"forward": lambda: forward(args), "video": lambda: video(args, None), "capped": lambda: video(args, args.cap_gb)}
    for part in args.parts:
        report[part] = runs[part]()
        if part == "capped" and "video" in report:
            report["capped_over_uncapped"] = report["capped"]["seconds"] / report["video"]["seconds"]
            print(f"under {args.cap_gb:g} GiB: {report['capped_over_uncapped']:.2f}x the uncapped time (target <= 1.15)", flush=True)
        if args.json:  # after each part: a call cut by its time limit keeps the parts it finished
            args.json.write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
