"""`wan-i2v extend`: a video continued by new clips (``wan_i2v.extend``), written as one mp4 with the source's frames first."""

from __future__ import annotations

import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

from wan_i2v import session as runs
from wan_i2v.commands import is_main
from wan_i2v.commands.common import check_fits, exclusive, fresh_output, keep_compiled_code, loras_from, mp4_path, settings_from, tell
from wan_i2v.commands.generate import _check_loras, _explain, _memory_needed
from wan_i2v.disk import check_space
from wan_i2v.errors import WanError, counted
from wan_i2v.extend import check_extension, extend_video, read_source, segment_state_file, source_size
from wan_i2v.models.spec import spec_for
from wan_i2v.options import Offload, options_from
from wan_i2v.video import check_writable, write_mp4


def run(args) -> int:
    # Everything the user typed is checked before minutes of model loading.
    spec = spec_for()
    source = read_source(args.video, spec)
    settings = settings_from(args, size=source_size(source, spec))
    check_extension(source, args.context_frames, settings.frame_num, args.extend_times, spec)
    options = options_from(args)
    loras = loras_from(options.loras, spec)
    default = f"{Path(args.video).stem}-extended.mp4"
    save_file = mp4_path(args.save_file, "--save-file") if args.save_file is not None else fresh_output(default, dry_run=args.dry_run)
    if save_file.resolve() == Path(args.video).resolve():
        raise WanError(f"--save-file {save_file} is the video to extend", "give the longer video another name")
    if is_main():
        check_writable(save_file)
    height, width = source.frames.shape[2:]
    session_plan = runs.plan(replace(options, loras=loras), height=height, width=width, frame_num=settings.frame_num, guided=settings.guided,
                             dry_run=args.dry_run)  # fmt: skip
    if args.dry_run:
        _check_loras(loras, session_plan.ckpt_dir, spec)
    tell(session_plan)
    if is_main() and not args.dry_run:  # every clip's state is kept until the video is written
        check_space(save_file.parent, session_plan.output_bytes * args.extend_times + source.frames.numel(), "free some space or choose another --save-file")
    if args.dry_run:  # as the run would go
        _explain(session_plan.planned, (height, width, spec.dit_tokens(settings.frame_num, height, width)), settings.frame_num)
        print(f"conditioning: extending {counted(args.context_frames, 'frame')} of {args.video}")
    check_fits(session_plan)
    if args.dry_run:
        return 0
    keep_compiled_code()
    loading_started = time.perf_counter()
    states = save_file.with_suffix(".extend")
    state_files = [segment_state_file(states, index) for index in range(args.extend_times)]
    with exclusive(save_file, *state_files) if is_main() else nullcontext(), runs.RunSession.open(session_plan, progress=not args.quiet) as session:
        loading_seconds = time.perf_counter() - loading_started
        plan = session.planned.plan  # the ranks' plan, for their GPUs' memory
        if (plan.offload is not Offload.parse(options.offload) or plan.fsdp != options.fsdp) and is_main():
            print(f"wan-i2v: {plan.placement.describe(plan.dims, plan.on_gpu)}, to fit in memory ({_memory_needed(session.planned)})", file=sys.stderr)

        def clip(known, settings, state_file):
            return session.generate(known, settings=settings, state_file=state_file, progress=not args.quiet)

        try:
            result = extend_video(clip, source, settings, context_frames=args.context_frames, times=args.extend_times, spec=spec, state_dir=states)
        except BaseException:
            if is_main() and states.is_dir():
                print(f"wan-i2v: the denoising states are saved in {states}; the same command resumes from them", file=sys.stderr)
            raise
        if result.video is None:  # a rank other than 0 of a parallel run
            return 0
        write_mp4(result.video, save_file, fps=source.fps, metadata=result.metadata)
        shutil.rmtree(states)
    seconds = ", ".join(f"{sum(segment.timings.values()):.1f}s" for segment in result.segments)
    print(f"time: loading {loading_seconds:.1f}s; {counted(len(result.segments), 'clip')}: {seconds}", file=sys.stderr)
    print(f"seeds: {', '.join(str(segment.settings.seed) for segment in result.segments)}", file=sys.stderr)
    print(save_file)
    return 0
