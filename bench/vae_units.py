"""The VAE decode's peak activations on the CPU, in the planner's units (``decode_units``), for the
Wan2.1 and the Wan2.2 VAE, whole chunks and frame by frame:

    python bench/vae_units.py [--height 128 --width 224]

Each decode runs in a process of its own (random weights at the official shapes, fp32, 3 latent
frames, one thread); its peak is the process's peak resident memory (VmHWM) during the decode, less
what it held before, in units of 4 output frames x the VAE's ``full_resolution_channels`` x fp32.
The CPU's kernels are not cuDNN's, so only the ratios are meant: the GPU's units are measured on the
GPU (docs/benchmarks.md); the Wan2.2 VAE's frame-by-frame units are its whole-chunk units scaled by
the ratio measured here.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def status_bytes(field: str) -> int:
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def measure(vae_name: str, frame_by_frame: bool, height: int, width: int) -> float:
    import torch

    from wan_i2v.models.vae import VAEConfig
    from wan_i2v.models.vae2_2 import VAE22Config

    torch.set_num_threads(1)
    config = {"wan2.1": VAEConfig, "wan2.2": VAE22Config}[vae_name]()
    vae = config.build().float().eval()
    with torch.no_grad():
        for parameter in vae.parameters():
            parameter.normal_(0, 0.02)
    side = config.pixels_per_latent
    latents = torch.randn(1, config.z_dim, 3, height // side, width // side)
    video = torch.zeros(vae.video_shape(latents.shape))
    Path("/proc/self/clear_refs").write_text("5")  # the peak resident size restarts from the current one
    before = status_bytes("VmRSS")
    vae.decode(latents, frame_by_frame=frame_by_frame, out=video)
    unit = 4 * config.full_resolution_channels * height * width * 4
    return (status_bytes("VmHWM") - before) / unit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--width", type=int, default=224)
    parser.add_argument("--one", nargs=2, metavar=("VAE", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(measure(args.one[0], args.one[1] == "frame", args.height, args.width))
        return
    units = {}
    for vae_name in ("wan2.1", "wan2.2"):
        for mode in ("whole", "frame"):
            command = [sys.executable, __file__, "--one", vae_name, mode, "--height", str(args.height), "--width", str(args.width)]
            units[vae_name, mode] = float(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
            print(f"{vae_name} {mode}: {units[vae_name, mode]:.2f} units", flush=True)
    for vae_name in ("wan2.1", "wan2.2"):
        print(f"{vae_name}: frame by frame / whole = {units[vae_name, 'frame'] / units[vae_name, 'whole']:.2f}")


if __name__ == "__main__":
    main()
