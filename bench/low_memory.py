"""480P on a GPU with 24 GB visible: one expert's forward with block offload, against the same
forward with the expert resident, in one run; and the VAE decode under the same cap.

    python bench/low_memory.py [--cap-gb 24]

The cap is simulated with torch.cuda.set_per_process_memory_fraction. The expert is
built with the default plan's transforms and timed resident first (above the cap), then
an expert of the same weights with the plan of ``--offload blocks`` (the same transforms,
then its blocks in pinned host memory) under the cap.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch
from common import GB, free, measure, random_model

from wan_i2v.execution import ExecutionPlan, Offload, apply_plan
from wan_i2v.models.dit import DiT, DiTConfig, keeps_fp32
from wan_i2v.models.vae import VAEConfig, WanVAE
from wan_i2v.pipeline import no_room_for_whole_frames

GRID = (21, 60, 104)  # 480P, 81 frames


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cap-gb", type=float, default=24.0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": datetime.date.today().isoformat(),
              "command": " ".join(sys.argv), "cap_gb": args.cap_gb}

    config = DiTConfig()
    plan = ExecutionPlan.for_device("cuda")
    expert = random_model(lambda: DiT(config), torch.bfloat16, keeps_fp32)
    apply_plan(expert, plan)
    g = torch.Generator(device="cuda").manual_seed(0)
    inputs = (torch.randn(1, 16, *GRID, generator=g, device="cuda"), torch.tensor([900.0], device="cuda"),
              torch.randn(1, 512, 4096, generator=g, device="cuda", dtype=torch.bfloat16),
              torch.randn(1, 20, *GRID, generator=g, device="cuda"))
    resident_seconds, _ = measure(lambda: expert(*inputs), 1, 2)
    with torch.no_grad():
        expected = expert(*inputs).float().cpu()
    print(f"resident expert: {resident_seconds:.3f} s/forward ({torch.cuda.memory_allocated() / GB:.1f} GiB allocated)", flush=True)

    del expert
    free()
    expert = random_model(lambda: DiT(config), torch.bfloat16, keeps_fp32)  # the same seed: the same weights
    apply_plan(expert, replace(plan, offload=Offload.BLOCKS))
    free()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(args.cap_gb * GB / total)
    torch.cuda.reset_peak_memory_stats()
    offload_seconds, _ = measure(lambda: expert(*inputs), 1, 2)
    with torch.no_grad():
        streamed = expert(*inputs).float().cpu()
    peak = torch.cuda.max_memory_allocated() / GB
    report["dit"] = {"resident_seconds": resident_seconds, "block_offload_seconds": offload_seconds,
                     "block_offload_peak_gb": peak, "outputs_equal": bool(torch.equal(streamed, expected))}
    print(f"block offload under a {args.cap_gb:.0f} GiB cap: {offload_seconds:.3f} s/forward "
          f"({offload_seconds / resident_seconds - 1:+.1%}), peak {peak:.1f} GiB, same output: {report['dit']['outputs_equal']}", flush=True)
    del expert
    free()

    latents = torch.randn(1, 16, *GRID, device="cuda")
    for dtype in (torch.float32, torch.bfloat16):
        vae = random_model(lambda: WanVAE(VAEConfig()), dtype)
        torch.cuda.reset_peak_memory_stats()
        seconds, _ = measure(lambda: vae.decode(latents, frame_by_frame=no_room_for_whole_frames(vae, latents)), 1, 1)  # as a run decides under the cap
        peak = torch.cuda.max_memory_allocated() / GB
        report[f"vae_decode_{str(dtype).removeprefix('torch.')}"] = {"seconds": seconds, "peak_gb": peak}
        print(f"VAE decode 480P {dtype}: {seconds:.2f} s, peak {peak:.1f} GiB (all allocations)", flush=True)
        del vae
        free()
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
