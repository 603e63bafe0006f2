"""`wan-i2v compare`: PSNR and SSIM of a video against a reference."""

from __future__ import annotations

from wan_i2v.compare import compare_videos, format_report


def run(args) -> int:
    print(format_report(compare_videos(args.reference, args.video)))
    return 0
