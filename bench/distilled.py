"""The 4-step distilled recipe at 720P, as users run it with Lightning LoRAs, on one GPU and on two.

    python bench/distilled.py [--ckpt /tmp/wanckpt] [--configs 1gpu 1gpu-bf16-vae 2gpu 2gpu-bf16-vae] [--json FILE]

A full-size random checkpoint (``multi_gpu.py``'s, written once) and a random rank-64 LoRA in
lightx2v's format on every linear layer of each expert's blocks (``--lora-rank``). Each config runs in
processes of its own, started and planned as ``wan-i2v generate --gpus N --distilled --lora-high ...
--lora-low ...`` plans them (no guidance: every GPU goes to Ulysses); each rank loads the pipeline
with the LoRAs merged (timed), switches the LoRAs off and on again on the loaded pipeline
(``set_loras``: each re-reads the changed weights from the page cache, the second also merges; their
difference is the merge, reported per expert), then runs 720P 81 frames, 4 euler steps
at guide scale 1, shift 5, twice: the second run is reported, stage by stage, with each stage's share.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
import time
from pathlib import Path

import torch
from multi_gpu import write_random_checkpoint

from wan_i2v.models.spec import WAN22_I2V_A14B as A14B
from wan_i2v.loading import checkpoint as ckpt
from wan_i2v.parallel.launch import launch
from wan_i2v.video import demo_image

PROMPT = "A white cat wearing sunglasses sits on a surfboard, relaxed posture, slight head movements, beach, natural sunlight."
# name -> (GPUs, the VAE's encode and decode dtype, FP8 linear layers, the encode split over the GPUs)
CONFIGS = {
    "1gpu": (1, "fp32", False, False), "1gpu-bf16-vae": (1, "bf16", False, False), "2gpu": (2, "fp32", False, False), "2gpu-bf16-vae": (2, "bf16", False, False),
    "1gpu-fp8-bf16-vae": (1, "bf16", True, False), "2gpu-fp8-bf16-vae": (2, "bf16", True, False), "2gpu-bf16-vae-split-encode": (2, "bf16", False, True),
    "2gpu-fp8-bf16-vae-split-encode": (2, "bf16", True, True),
}  # fmt: skip
LINEAR = re.compile(r"^blocks\.\d+\.((self|cross)_attn\.[qkvo]|ffn\.[02])\.weight$")


def write_random_lora(path: Path, ckpt_dir: Path, rank: int, seed: int) -> Path:
    """lightx2v's layout: diffusion_model.<module>.lora_down/lora_up.weight (bf16) and .alpha, on every linear layer of the blocks."""
    from safetensors.torch import save_file

    source = ckpt.safetensors_source(ckpt_dir / A14B.experts[0].folder)
    g = torch.Generator(device="cuda").manual_seed(seed)
    tensors = {}
    for name in sorted(key for key in source.keys() if LINEAR.match(key)):
        out_features, in_features = source.shape(name)
        module = f"diffusion_model.{name.removesuffix('.weight')}"
        tensors[f"{module}.lora_down.weight"] = (torch.randn(rank, in_features, generator=g, device="cuda") * 0.01).bfloat16().cpu()
        tensors[f"{module}.lora_up.weight"] = (torch.randn(out_features, rank, generator=g, device="cuda") * 0.01).bfloat16().cpu()
        tensors[f"{module}.alpha"] = torch.tensor(float(rank))
    save_file(tensors, str(path))
    return path


def run_config(ckpt_dir: Path, world: int, vae_dtype: str, fp8: bool, split_encode: bool, loras: dict) -> dict:
    from dataclasses import replace

    from wan_i2v import I2VPipeline
    from wan_i2v.parallel import ParallelGroups, init_distributed
    from wan_i2v.session import RunOptions, plan_for

    device = init_distributed("cuda") if world > 1 else torch.device("cuda")
    image = demo_image(1280, 720)
    height, width = A14B.video_size(image.height, image.width, A14B.presets["720P"].max_area)
    options = RunOptions(ckpt_dir=ckpt_dir, device="cuda", gpus=world, decode_dtype=vae_dtype, encode_dtype=vae_dtype, fp8=fp8, split_encode=split_encode, loras=loras)
    planned = plan_for(options, height=height, width=width, frame_num=81, device="cuda", world=world, ckpt_dir=ckpt_dir, guided=False)
    groups = ParallelGroups.build(planned.plan.dims, device) if world > 1 else None
    torch.cuda.synchronize()
    started = time.perf_counter()
    pipe = I2VPipeline.load(ckpt_dir, replace(planned.plan, device=device), groups)
    torch.cuda.synchronize()
    load_seconds = time.perf_counter() - started
    switch_seconds = {}
    for name, value in (("to none", None), ("to the LoRAs", loras)):  # each re-reads the weights the LoRAs change (FP8: and quantizes them)
        started = time.perf_counter()
        pipe.set_loras(value)
        torch.cuda.synchronize()
        switch_seconds[name] = (time.perf_counter() - started) / 2
    settings = dict(max_area=A14B.presets["720P"].max_area, frame_num=81, steps=4, shift=5.0, guide_scale=1.0, solver="euler", seed=7, progress=False)
    pipe.generate(image, PROMPT, **settings)  # compiles; warms cuDNN and the allocator
    torch.cuda.synchronize()
    started = time.perf_counter()
    result = pipe.generate(image, PROMPT, **settings)
    total = time.perf_counter() - started
    if groups is not None:
        import torch.distributed as dist

        dist.destroy_process_group()
    return {
        "plan": f"{planned.plan.describe()}; {planned.plan.describe_numerics()}",
        "load_seconds_with_merge": load_seconds,
        "switch_seconds_per_expert": switch_seconds,
        "merge_seconds_per_expert": switch_seconds["to the LoRAs"] - switch_seconds["to none"],
        "seconds": result.timings,
        "total_seconds": total,
        "stage_peaks_gb": result.stage_peaks_gb,
        "latents": result.latents,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", type=Path, default=Path("/tmp/wanckpt"))
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--lora-rank", type=int, default=64)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    report = {"date": datetime.date.today().isoformat(), "command": " ".join(sys.argv), "torch": torch.__version__,
              "device": f"{torch.cuda.device_count()}x {torch.cuda.get_device_name()}", "runs": {}}  # fmt: skip
    print(report["device"], report["torch"], flush=True)
    if not (args.ckpt / A14B.files.tokenizer_dir).is_dir():
        write_random_checkpoint(args.ckpt, 40)
    started = time.perf_counter()
    loras = {name: [(str(write_random_lora(args.ckpt.parent / f"lora-{name}-r{args.lora_rank}.safetensors", args.ckpt, args.lora_rank, seed)), 1.0)]
             for seed, name in enumerate(("high", "low"))}  # fmt: skip
    print(f"two rank-{args.lora_rank} LoRAs written in {time.perf_counter() - started:.0f} s", flush=True)
    reference = None
    for name in args.configs:
        world, vae_dtype, fp8, split_encode = CONFIGS[name]
        row = launch(run_config, (args.ckpt, world, vae_dtype, fp8, split_encode, loras), world)[0]
        latents = row.pop("latents")
        if reference is None:
            reference = latents
        row["latents_vs_first"] = float((latents - reference).norm() / reference.norm())
        shares = ", ".join(f"{stage} {seconds:.2f} s ({seconds / row['total_seconds']:.0%})" for stage, seconds in row["seconds"].items())
        print(f"{name}: {row['plan']}: {row['total_seconds']:.2f} s in all ({shares}); load with the merge {row['load_seconds_with_merge']:.1f} s, "
              f"LoRA switch per expert: {row['switch_seconds_per_expert']}, the merge alone {row['merge_seconds_per_expert']:.2f} s; peak {max(row['stage_peaks_gb'].values()):.1f} GiB; "
              f"latents vs {args.configs[0]} {row['latents_vs_first']:.2e}", flush=True)  # fmt: skip
        report["runs"][name] = row
        if args.json:
            args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
