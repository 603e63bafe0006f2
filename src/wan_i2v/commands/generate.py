"""`wan-i2v generate`: a video from an image and a prompt, written as an mp4."""

from __future__ import annotations

import sys
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import torch

from wan_i2v import session as runs
from wan_i2v.cache.hub_files import is_hub_file
from wan_i2v.commands import is_main
from wan_i2v.commands.common import (
    check_fits, exclusive, fresh_output, generate_and_write, keep_compiled_code, loras_from, mp4_path, run_model, settings_from, tell,
)
from wan_i2v.disk import check_space
from wan_i2v.errors import WanError
from wan_i2v.loading import checkpoint as ckpt
from wan_i2v.loading.lora import read_lora
from wan_i2v.models.conditioning import describe_known
from wan_i2v.models.dit import DiT
from wan_i2v.options import Offload, options_from
from wan_i2v.parallel.plan import GiB
from wan_i2v.video import check_writable, load_image


def run(args) -> int:
    _official_meanings(args)
    # Everything the user typed is checked before minutes of model loading.
    options = options_from(args)
    spec = run_model(options)
    settings = settings_from(args, spec)
    loras = loras_from(options.loras, spec)
    if args.image is None and spec.conditioning.target.needs_image:
        raise WanError(f"{spec.name} makes a video from an image", "give one with --image")
    if args.image is None and args.last_image is not None:
        raise WanError("--last-image needs --image (the first frame)", "give both, or neither for text-to-video")
    image = None if args.image is None else load_image(args.image)
    last_image = None if args.last_image is None else load_image(args.last_image, flag="last_image")
    save_file = mp4_path(args.save_file, "--save-file") if args.save_file is not None else fresh_output(dry_run=args.dry_run)
    latents_file = Path(args.save_latents) if args.save_latents else save_file.with_suffix(".latents.pt")
    if args.save_latents and latents_file.resolve() == save_file.resolve():
        raise WanError(f"--save-latents {args.save_latents} is the --save-file too", "give the latents another name, such as out.latents.pt")
    if is_main():
        check_writable(save_file)
        check_writable(latents_file)
    height, width = settings.video_size(*(() if image is None else (image.height, image.width)), spec=spec)
    # A refused combination is one line, with no plan.
    session_plan = runs.plan(replace(options, loras=loras), height=height, width=width, frame_num=settings.frame_num, guided=settings.guided,
                             dry_run=args.dry_run)  # fmt: skip
    if args.dry_run:
        _check_loras(loras, session_plan.ckpt_dir, spec)
    tell(session_plan)
    if is_main() and not args.dry_run:
        check_space(save_file.parent, session_plan.output_bytes, "free some space or choose another --save-file")
    if args.dry_run:  # as the run would go (on the CPU without --fp8)
        _explain(session_plan.planned, (height, width, spec.dit_tokens(settings.frame_num, height, width)), settings.frame_num)
        given = () if image is None else (0,) if last_image is None else (0, settings.frame_num - 1)  # the frames the run gives (I2VPipeline.known_frames)
        print(f"conditioning: {describe_known(given, settings.frame_num) if given else 'text only'}")
    check_fits(session_plan)  # after the plan a dry run shows: the refusal the run would give
    if args.dry_run:
        return 0
    keep_compiled_code()
    loading_started = time.perf_counter()
    state_file = save_file.with_suffix(".state.pt")
    with (
        exclusive(save_file, state_file, latents_file) if is_main() else nullcontext(),
        runs.RunSession.open(session_plan, progress=not args.quiet) as session,
    ):  # fmt: skip
        plan = session.planned.plan  # the ranks' plan, for their GPUs' memory
        if (plan.offload is not Offload.parse(options.offload) or plan.fsdp != options.fsdp) and is_main():
            print(f"wan-i2v: {plan.placement.describe(plan.dims, plan.on_gpu, plan.model)}, to fit in memory ({_memory_needed(session.planned)})", file=sys.stderr)
        generate_and_write(session, image, settings, progress=not args.quiet, save_file=save_file, latents_file=latents_file,
                           keep_latents=bool(args.save_latents), loading_seconds=time.perf_counter() - loading_started,
                           state_file=state_file, last_image=last_image)  # fmt: skip
    return 0


def _official_meanings(args) -> None:
    """The official generate.py's options, set as the options of ours that mean the same."""
    if args.offload_model and args.offload is None:
        args.offload = "experts"  # (the official offload moves each model off the GPU after its use)
    if args.convert_model_dtype and args.dtype is None:
        args.dtype = "bf16"  # the official param_dtype


def _explain(planned, video, frame_num: int) -> None:
    height, width, tokens = video
    print(f"plan: {planned.plan.describe()}")
    if planned.plan.on_gpu:  # (on the CPU everything is in host memory: the line below)
        gpu_bytes = planned.gpu_bytes
        budget = f" (of {gpu_bytes / GiB:.1f} GiB)" if gpu_bytes is not None else " (no GPU memory given: --gpu-memory GiB plans for a card)"
        print(f"memory: {planned.estimate.describe()}{budget}")
    if planned.host is not None:
        host_budget = f" (of {planned.host_bytes / GiB:.1f} GiB)" if planned.host_bytes is not None else " (no host memory given: --host-memory GiB plans for a machine)"
        print(f"host memory: {planned.host.describe('on this machine')}{host_budget}")
    print(f"video: {width}x{height}, {frame_num} frames, {tokens} tokens per DiT forward")
    print(f"numerics: {planned.plan.describe_numerics()}")


def _memory_needed(planned) -> str:
    """The estimates a chosen placement answers: the GPUs' and the host's, or on the CPU the host's alone."""
    host = planned.host.describe("on this machine") if planned.host is not None else None
    if planned.plan.on_gpu:
        return planned.estimate.describe() + (f"; host: {host}" if host else "")
    return host or planned.estimate.describe("per process")


def _check_loras(loras, ckpt_dir: Path | None, model) -> None:
    """Read each LoRA against its expert as the run does (``read_lora``): a file that does not read,
    a key that matches no layer or a delta of the wrong shape is the run's own refusal, without
    loading the model. The experts' parameters come from the checkpoint's headers, else from the
    official model's shapes (a dry run without a checkpoint plans for it)."""
    for expert_spec in model.experts:
        specs = loras.for_expert(expert_spec.name)
        if not specs:
            continue
        if ckpt_dir is not None:
            expert = ckpt.safetensors_source(ckpt_dir / expert_spec.folder)
        else:
            with torch.device("meta"):
                shapes = {key: tuple(value.shape) for key, value in DiT(model.builders.dit_config()).state_dict().items()}
            expert = ckpt.TensorSource(dict.fromkeys(shapes), {}, {key: (lambda shape=shape: shape) for key, shape in shapes.items()})
        for spec in specs:
            if not is_hub_file(spec.path):  # (one not fetched yet: the plan's notes say the run fetches it)
                read_lora(spec, expert)
