"""How large the jump at an extension's seam is against the change from frame to frame within a clip.

    python bench/extend_seam.py [--ckpt /tmp/wanckpt] [--size 480P] [--frame-num 81] [--context-frames 5] [--times 1] [--json FILE]
    python bench/extend_seam.py --ckpt TINY_CHECKPOINT --device cpu --size 32*48 --frame-num 9   (the tiny checkpoint, on the CPU)

A clip from the demo image, then ``--times`` extensions of it (``I2VPipeline.extend``), sampled with the
4-step distilled recipe (euler, guide scale 1, shift 5). On a GPU the checkpoint is full size with
random weights (``multi_gpu.py``'s, written once where ``--ckpt`` has none). Each difference is the
mean absolute difference of two consecutive frames over their pixels and channels, in 8-bit levels
(0-255) as the mp4 stores them: the seam's is the first new frame against the last frame before it;
the within-clip ones are every other pair of consecutive frames of the same video. Random weights make
no picture worth looking at: this measures the join, not how it looks.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from wan_i2v import I2VPipeline  # noqa: E402
from wan_i2v.config import DISTILLED, GenerationSettings  # noqa: E402
from wan_i2v.models.spec import WAN22_I2V_A14B as A14B  # noqa: E402
from wan_i2v.video import demo_image, rgb24_frames  # noqa: E402

PROMPT = "A white cat wearing sunglasses sits on a surfboard, relaxed posture, slight head movements, beach, natural sunlight."


def frame_changes(video: torch.Tensor) -> torch.Tensor:
    """[F-1]: the mean absolute difference of each frame from the one before, in 8-bit levels."""
    frames = torch.from_numpy(rgb24_frames(video)).float()
    return (frames[1:] - frames[:-1]).abs().mean(dim=(1, 2, 3))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", type=Path, default=Path("/tmp/wanckpt"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", default="480P", help="480P, 720P or H*W")
    parser.add_argument("--frame-num", type=int, default=81)
    parser.add_argument("--context-frames", type=int, default=5)
    parser.add_argument("--times", type=int, default=1, help="extensions after the first clip")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if not (args.ckpt / A14B.files.tokenizer_dir).is_dir():
        from multi_gpu import write_random_checkpoint

        write_random_checkpoint(args.ckpt, 40)
    settings = GenerationSettings.of(PROMPT, defaults=DISTILLED, size=args.size, frame_num=args.frame_num, seed=args.seed)
    pipe = I2VPipeline.from_pretrained(args.ckpt, device=args.device, compile=False)  # (the seam does not depend on it; saves the compile)
    started = time.perf_counter()
    first = pipe.generate(demo_image(1280, 720), settings=settings, progress=False).video
    extended = pipe.extend(first, PROMPT, context_frames=args.context_frames, extend_times=args.times, settings=settings, progress=False)
    seconds = time.perf_counter() - started
    changes = frame_changes(extended.video)
    new = args.frame_num - args.context_frames
    seams = [first.shape[1] - 1 + index * new for index in range(args.times)]  # the pair (seam, seam + 1) joins two clips
    within = torch.cat([changes[: seams[0]], *(changes[seam + 1 : seam + new] for seam in seams)])
    report = {
        "date": datetime.date.today().isoformat(), "command": " ".join(sys.argv), "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu", "video": list(extended.video.shape),
        "seam_changes": [float(changes[seam]) for seam in seams], "within_clip_mean": float(within.mean()),
        "within_clip_median": float(within.median()), "within_clip_max": float(within.max()), "seconds": seconds,
    }  # fmt: skip
    ratios = ", ".join(f"{seam / report['within_clip_mean']:.2f}" for seam in report["seam_changes"])
    print(f"{report['device']}, {args.size}, {args.frame_num}-frame clips, {args.context_frames} context frames, {args.times} extension(s) "
          f"({seconds:.0f} s): seam {', '.join(f'{seam:.2f}' for seam in report['seam_changes'])} vs within a clip mean "
          f"{report['within_clip_mean']:.2f}, median {report['within_clip_median']:.2f}, max {report['within_clip_max']:.2f} "
          f"(8-bit levels; seam / mean {ratios})")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
