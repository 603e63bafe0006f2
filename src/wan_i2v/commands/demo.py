"""`wan-i2v demo`: the whole pipeline on a built-in tiny random model, on the CPU."""

from __future__ import annotations

import sys
import time

from wan_i2v.commands import DEMO_FILE, home
from wan_i2v.commands.common import fresh_output, generate_and_write, mp4_path, settings_from
from wan_i2v.models.spec import DEFAULT_SPEC, spec_for
from wan_i2v.options import RunOptions
from wan_i2v.session import RunSession
from wan_i2v.tiny import ensure_tiny_checkpoint
from wan_i2v.video import check_writable, demo_image


def run(args) -> int:
    spec = spec_for(args.model or DEFAULT_SPEC)
    settings = settings_from(args, spec, max_area=args.max_area, shift=3.0)  # checked before the model is made
    save_file = mp4_path(args.save_file, "--save-file") if args.save_file is not None else fresh_output(DEMO_FILE)
    check_writable(save_file)
    ckpt_dir = ensure_tiny_checkpoint(home() / ("tiny-checkpoint" if spec.name == DEFAULT_SPEC else f"tiny-checkpoint-{spec.aliases[0]}"), spec)
    print(f"demo: tiny random model in {ckpt_dir} (random weights: the video is noise-like, not a real video)", file=sys.stderr)
    loading_started = time.perf_counter()
    with RunSession.open(RunOptions(ckpt_dir=ckpt_dir, device="cpu", gpus=1, dtype="fp32"), progress=not args.quiet) as session:
        generate_and_write(session, demo_image(), settings, progress=not args.quiet, save_file=save_file, latents_file=None,
                           keep_latents=False, loading_seconds=time.perf_counter() - loading_started)  # fmt: skip
    return 0
