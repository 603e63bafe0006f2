"""VAE decode of 81 frames at 720P, random weights: time and peak memory of each way to run it.

    python bench/vae_decode.py [--size 720P] [--json FILE]

The frames go to a host-memory buffer as they are decoded, as the pipeline does. Ways:
fp32 (the official precision) or bf16 (``decode_dtype``); whole chunks (one latent
frame's 4 video frames at a time) or frame by frame after the last temporal
upsampling; contiguous (NCDHW) or channels-last (NDHWC, the pipeline's choice on a
GPU) memory. The first way, fp32 contiguous, is the reference the others are compared with.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch
from common import GB, free, measure, random_model

from wan_i2v.models.vae import VAEConfig, WanVAE

LATENTS = {"720P": (21, 90, 160), "480P": (21, 60, 104)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="720P", choices=list(LATENTS))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": datetime.date.today().isoformat(),
              "command": " ".join(sys.argv), "size": args.size, "runs": []}
    latents = torch.randn(1, 16, *LATENTS[args.size], device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    reference = None
    ways = [(torch.float32, False, False), (torch.float32, False, True), (torch.float32, True, True)] + [
        (torch.bfloat16, frame_by_frame, layout) for layout in (False, True) for frame_by_frame in (False, True)
    ]
    for dtype, frame_by_frame, layout in ways:
        vae = random_model(lambda: WanVAE(VAEConfig()), torch.float32, seed=3).decode_in(dtype)
        if layout:
            vae.to_channels_last()
        out = torch.empty(vae.video_shape(latents.shape))  # pageable host memory, as the pipeline uses
        seconds, peak = measure(lambda: vae.decode(latents.to(dtype), frame_by_frame=frame_by_frame, out=out), 1, 1)
        if reference is None:
            reference = out.clone()
        error = ((out - reference).norm() / reference.norm()).item()
        name = (f"{str(dtype).removeprefix('torch.')}, {'frame by frame' if frame_by_frame else 'whole chunks'}, "
                f"{'channels-last' if layout else 'contiguous'}")
        report["runs"].append({"way": name, "seconds": seconds, "peak_gb": peak, "relative_error_vs_fp32": error})
        print(f"{name:>44}: {seconds:5.2f} s, peak {peak:5.2f} GiB ({peak * GB / 1e9:5.2f} GB) above the weights, "
              f"error vs fp32 {error:.2e}", flush=True)
        del vae, out
        free()
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
