"""The `wan-i2v` command: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import atexit
import errno
import os
import signal
import sys
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

# The modules imported here are torch-free: --version, --help and `cache status` never import torch
# (the torch-heavy ones are imported by the commands that run models, in their functions).
from wan_i2v import locks
from wan_i2v.cache import add_cache_parser
from wan_i2v.config import DISTILLED, MAX_STEPS, OFFICIAL, SOLVERS, GenerationSettings, SamplingDefaults, check_frame_num, parse_size
from wan_i2v.disk import check_space
from wan_i2v.errors import INTERRUPTED, TERMINATED, Terminated, WanError, counted, is_out_of_memory, on_the_command_line, stop_on_sigterm
from wan_i2v.models.spec import spec_for
from wan_i2v.options import Offload, RunOptions, add_options, options_from
from wan_i2v.parallel.env import env_rank

DEMO_FILE = "wan-i2v-demo.mp4"
DEFAULT_OUTPUT = "wan-i2v-output.mp4"
OFFICIAL_TASK = "i2v-A14B"


def _home() -> Path:
    return Path(os.environ.get("WAN_I2V_HOME") or Path.home() / ".cache" / "wan-i2v")


def _print_summary(result, path: Path, loading_seconds: float, steps: "StepClock | None" = None) -> None:
    timings = {"loading": loading_seconds, **result.timings}
    stages = ", ".join(f"{stage} {seconds:.1f}s" for stage, seconds in timings.items())
    print(f"time: {stages}; total {sum(timings.values()):.1f}s", file=sys.stderr)
    if steps is not None and steps.ends:
        print(steps.describe(result.timings), file=sys.stderr)
    if result.peak_memory_gb is not None:
        stages = ", ".join(f"{stage} {peak:.1f}" for stage, peak in result.stage_peaks_gb.items())
        print(f"peak GPU memory: {result.peak_memory_gb:.1f} GiB ({stages} GiB)", file=sys.stderr)
    if result.step_cache is not None:
        print(_step_cache_line(result.step_cache["skipped"]), file=sys.stderr)
    print(f"seed: {result.settings.seed}", file=sys.stderr)
    print(path)


def _step_cache_line(skipped: dict) -> str:
    """The forwards the step cache skipped, in all and per expert."""
    skips, total = (sum(counts[i] for counts in skipped.values()) for i in (0, 1))
    return f"step cache: skipped {skips} of {total} forwards (" + ", ".join(f"{expert} {s} of {t}" for expert, (s, t) in skipped.items()) + ")"


# When this process started: the summary says how long the first denoising step took to come.
STARTED = time.perf_counter()


class StepClock:
    """When each denoising step ended: the time from the start to the first step, and the steps' pace
    (the first step also compiles the blocks)."""

    def __init__(self):
        self.started = time.perf_counter()
        self.ends: list[float] = []

    def __call__(self, step) -> None:
        self.ends.append(time.perf_counter())

    def describe(self, timings: dict) -> str:
        denoising = self.started + timings.get("text encoding", 0) + timings.get("image encoding", 0)
        text = f"steps: first step done {self.ends[0] - STARTED:.1f}s after start (first step {self.ends[0] - denoising:.1f}s"
        if len(self.ends) > 1:
            text += f", then {(self.ends[-1] - self.ends[0]) / (len(self.ends) - 1):.2f}s a step"
        return text + ")"


def _run(session, image, settings, *, progress: bool, save_file: Path, latents_file: Path | None, keep_latents: bool,
         loading_seconds: float, state_file: Path | None = None):
    """Generate, save the latents before decoding (a decode that dies loses nothing), write the mp4.
    With ``state_file`` the denoising state is saved after every step and the same command resumes
    a run that died. In a multi-process run only rank 0 writes and prints."""

    from wan_i2v.video import write_mp4

    started = time.time()
    clock = StepClock()
    try:
        result = session.generate(image, settings=settings, progress=progress, latents_file=latents_file, state_file=state_file, on_step=clock)
    except BaseException as exc:
        saved = latents_file is not None and latents_file.is_file() and latents_file.stat().st_mtime >= started
        if saved and session.is_main and not isinstance(exc, WanError):
            # (with every step in the state file, the same command goes straight to the decode too)
            again = "the same command finishes the video, as does " if state_file is not None and state_file.is_file() else "finish with: "
            print(f"wan-i2v: the latents are saved in {latents_file}; {again}wan-i2v decode {latents_file} --save-file {save_file}", file=sys.stderr)
        elif state_file is not None and session.is_main and state_file.is_file():
            print(f"wan-i2v: the denoising state is saved in {state_file}; the same command resumes from it", file=sys.stderr)
        raise
    if result.video is None:  # a rank other than 0 of a parallel run
        return result
    write_mp4(result.video, save_file, fps=spec_for().fps, metadata=result.metadata)
    if latents_file is not None and not keep_latents:
        latents_file.unlink(missing_ok=True)
    if state_file is not None:
        state_file.unlink(missing_ok=True)
    _print_summary(result, save_file, loading_seconds, clock)
    return result


def _settings(args, **fixed):
    """The video's settings from the sampling flags; those not given: the official defaults (the
    command's number of steps), or the distilled recipe. ``fixed``: settings the command has no flag for."""
    defaults = DISTILLED if args.distilled else OFFICIAL.given(steps=args.default_steps)
    given = dict(size=getattr(args, "size", None), frame_num=args.frame_num, steps=args.steps, shift=getattr(args, "shift", None),
                 guide_scale=args.guide_scale, seed=args.seed, solver=args.solver)  # fmt: skip
    return GenerationSettings.of(args.prompt, args.negative_prompt, defaults=defaults, **{**given, **fixed})


def _official_meanings(args) -> None:
    """The official generate.py's options, set as the options of ours that mean the same."""
    if args.offload_model and args.offload is None:
        args.offload = "experts"  # (the official offload moves each model off the GPU after its use)
    if args.convert_model_dtype and args.dtype is None:
        args.dtype = "bf16"  # the official param_dtype


def _is_main() -> bool:
    return env_rank() == 0


def _explain(planned, video, frame_num: int) -> None:
    from wan_i2v.parallel.plan import GiB

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


@contextmanager
def _one_line_warnings():
    """Warnings (a truncated prompt, ...) as one line each, like the errors, and only from rank 0
    of a multi-process run, which says each once."""
    with warnings.catch_warnings():
        warnings.showwarning = _warning_line
        if not _is_main():
            warnings.simplefilter("ignore")
        yield


def _warning_line(message, *_args, **_kwargs) -> None:
    print(f"wan-i2v: warning: {message}", file=sys.stderr)


def _fresh_output(default: str = DEFAULT_OUTPUT, *, dry_run: bool = False) -> Path:
    """The default output: wan-i2v-output.mp4 (or the demo's), else the first -N.mp4 free, so that runs
    never overwrite each other's videos; a name whose run was interrupted (its state file is there) is
    taken again, so that the same command resumes it."""
    stem, n = Path(default).stem, 0
    while True:
        path = Path(f"{stem}-{n}.mp4" if n else default)
        free = not path.exists() or path.with_suffix(".state.pt").is_file()
        if free and not locks.held(_lock_path(path)):  # (a state file with its lock held is a run in progress)
            if n and _is_main():
                print(f"wan-i2v: {'the run would write' if dry_run else 'writing'} {path} ({default} exists)", file=sys.stderr)
            return path
        n += 1


def _lock_path(save_file: Path) -> Path:
    return save_file.with_name(f".{save_file.name}.lock")


@contextmanager
def _exclusive(save_file: Path, *companions: Path):
    """Hold a lock on the output while the run writes it: two runs on one --save-file would share its
    state file and one video would be lost. The lock is released (and its file removed) at the end.
    Held, it makes the temporaries a run killed mid-write left of the output and its ``companions``
    (the state, the latents) this run's to remove: no other run writes them."""
    from wan_i2v.video import leftover_temporaries

    lock = _lock_path(save_file)
    handle = locks.hold(lock)
    if handle is None:
        raise WanError(f"another run is writing {save_file}", "wait for it to finish, or give another --save-file")
    try:
        for path in (save_file, *companions):
            for leftover in leftover_temporaries(path):
                leftover.unlink(missing_ok=True)
        yield
    finally:
        lock.unlink(missing_ok=True)
        handle.close()


def _mp4_path(text: str, option: str) -> Path:
    """An output video's path: a file name that ends in .mp4 (what is written there is an mp4)."""
    path = Path(text)
    if not text.strip():
        raise WanError(f"{option} is empty", "give a file name such as out.mp4")
    if text.endswith(("/", os.sep)) or path.is_dir():
        raise WanError(f"output path {text} is a directory", f"give a file name such as {path / 'out.mp4'}")
    if path.suffix.lower() != ".mp4":
        raise WanError(f"{option} {text} does not end in .mp4", f"the video is an mp4: use {path.with_suffix('.mp4')}")
    return path


def _loras(files: dict | None):
    """The LoRA files of each expert as the flags gave them (``RunOptions.loras``), each checked to exist before any loading."""
    from wan_i2v.loading.lora import Loras, LoraSpec

    by_expert = {expert: [LoraSpec.parse(text) for text in texts] for expert, texts in (files or {}).items()}
    for spec in {spec for specs in by_expert.values() for spec in specs}:
        if Path(spec.path).suffix != ".safetensors":
            raise WanError(f"LoRA file {spec.path} is not a .safetensors file", "only .safetensors LoRAs are read")
        if not Path(spec.path).is_file():
            raise WanError(f"LoRA file not found: {spec.path}", "give the path of a .safetensors LoRA")
    return Loras.of(by_expert)


def _check_loras(loras, ckpt_dir: Path | None) -> None:
    """Read each LoRA against its expert as the run does (``read_lora``): a file that does not read,
    a key that matches no layer or a delta of the wrong shape is the run's own refusal, without
    loading the model. The experts' parameters come from the checkpoint's headers, else from the
    official model's shapes (a dry run without a checkpoint plans for it)."""
    import torch

    from wan_i2v.loading import checkpoint as ckpt
    from wan_i2v.loading.lora import read_lora
    from wan_i2v.models.dit import DiT, DiTConfig

    for expert_spec in spec_for().experts:
        specs = loras.for_expert(expert_spec.name)
        if not specs:
            continue
        if ckpt_dir is not None:
            expert = ckpt.safetensors_source(ckpt_dir / expert_spec.folder)
        else:
            with torch.device("meta"):
                shapes = {key: tuple(value.shape) for key, value in DiT(DiTConfig()).state_dict().items()}
            expert = ckpt.TensorSource(dict.fromkeys(shapes), {}, {key: (lambda shape=shape: shape) for key, shape in shapes.items()})
        for spec in specs:
            read_lora(spec, expert)


def _tell(session_plan) -> None:
    """What the plan chose unasked (a line each, from rank 0) and dropped of what was asked (warnings)."""
    if _is_main():
        for note in session_plan.notes:
            print(f"wan-i2v: {note}", file=sys.stderr)
    for warning in session_plan.warnings:
        warnings.warn(warning)


def _check_fits(planned) -> None:
    refusal = planned.refusal()
    if refusal is not None:
        raise refusal


def _keep_compiled_code() -> None:
    """The compiled blocks' code is kept beside the model cache (a pod's persistent volume), not in
    /tmp, so that a new process, even after a restart, finds it instead of compiling for a minute."""
    compiled = _home() / "compiled"
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(compiled / "inductor"))
    os.environ.setdefault("TRITON_CACHE_DIR", str(compiled / "triton"))
    # Compiled in this process, without inductor's pool of one compiler process per core: on a
    # 16-core H200 machine the pool held 5.6 GiB of host memory for the whole run (11.4 GiB against
    # 5.8 without it, measured), memory a 32 GB machine needs for the page cache; the code it would
    # compile in parallel comes from the cache above after the first run. Set in inductor's config:
    # the environment variable is read when the config is imported, which the plan has done by now
    # (setting only the variable left the pool on: 11.6 GiB measured).
    if "TORCHINDUCTOR_COMPILE_THREADS" not in os.environ:
        import torch._inductor.config as inductor_config

        inductor_config.compile_threads = 1


def cmd_generate(args) -> int:
    from wan_i2v import session as runs
    from wan_i2v.video import check_writable, load_image

    _official_meanings(args)
    # Everything the user typed is checked before minutes of model loading.
    settings = _settings(args)
    options = options_from(args)
    loras = _loras(options.loras)
    image = load_image(args.image)
    save_file = _mp4_path(args.save_file, "--save-file") if args.save_file is not None else _fresh_output(dry_run=args.dry_run)
    latents_file = Path(args.save_latents) if args.save_latents else save_file.with_suffix(".latents.pt")
    if args.save_latents and latents_file.resolve() == save_file.resolve():
        raise WanError(f"--save-latents {args.save_latents} is the --save-file too", "give the latents another name, such as out.latents.pt")
    if _is_main():
        check_writable(save_file)
        check_writable(latents_file)
    height, width = spec_for().video_size(image.height, image.width, settings.max_area)
    # A refused combination is one line, with no plan.
    session_plan = runs.plan(replace(options, loras=loras), height=height, width=width, frame_num=settings.frame_num, guided=settings.guided,
                             dry_run=args.dry_run)  # fmt: skip
    if args.dry_run:
        _check_loras(loras, session_plan.ckpt_dir)
    _tell(session_plan)
    if _is_main() and not args.dry_run:
        check_space(save_file.parent, session_plan.output_bytes, "free some space or choose another --save-file")
    if args.dry_run:  # as the run would go (on the CPU without --fp8)
        _explain(session_plan.planned, (height, width, spec_for().dit_tokens(settings.frame_num, height, width)), settings.frame_num)
    _check_fits(session_plan)  # after the plan a dry run shows: the refusal the run would give
    if args.dry_run:
        return 0
    _keep_compiled_code()
    loading_started = time.perf_counter()
    state_file = save_file.with_suffix(".state.pt")
    with (
        _exclusive(save_file, state_file, latents_file) if _is_main() else nullcontext(),
        runs.RunSession.open(session_plan, progress=not args.quiet) as session,
    ):  # fmt: skip
        plan = session.planned.plan  # the ranks' plan, for their GPUs' memory
        if (plan.offload is not Offload.parse(options.offload) or plan.fsdp != options.fsdp) and _is_main():
            print(f"wan-i2v: {plan.placement.describe(plan.dims, plan.on_gpu)}, to fit in memory ({_memory_needed(session.planned)})", file=sys.stderr)
        _run(session, image, settings, progress=not args.quiet, save_file=save_file, latents_file=latents_file,
             keep_latents=bool(args.save_latents), loading_seconds=time.perf_counter() - loading_started, state_file=state_file)  # fmt: skip
    return 0


def cmd_extend(args) -> int:
    import shutil

    from wan_i2v import session as runs
    from wan_i2v.extend import check_extension, extend_video, read_source, segment_state_file, source_size
    from wan_i2v.video import check_writable, write_mp4

    # Everything the user typed is checked before minutes of model loading.
    spec = spec_for()
    source = read_source(args.video, spec)
    settings = _settings(args, size=source_size(source, spec))
    check_extension(source, args.context_frames, settings.frame_num, args.extend_times, spec)
    options = options_from(args)
    loras = _loras(options.loras)
    default = f"{Path(args.video).stem}-extended.mp4"
    save_file = _mp4_path(args.save_file, "--save-file") if args.save_file is not None else _fresh_output(default, dry_run=args.dry_run)
    if save_file.resolve() == Path(args.video).resolve():
        raise WanError(f"--save-file {save_file} is the video to extend", "give the longer video another name")
    if _is_main():
        check_writable(save_file)
    height, width = source.frames.shape[2:]
    session_plan = runs.plan(replace(options, loras=loras), height=height, width=width, frame_num=settings.frame_num, guided=settings.guided,
                             dry_run=args.dry_run)  # fmt: skip
    if args.dry_run:
        _check_loras(loras, session_plan.ckpt_dir)
    _tell(session_plan)
    if _is_main() and not args.dry_run:  # every clip's state is kept until the video is written
        check_space(save_file.parent, session_plan.output_bytes * args.extend_times + source.frames.numel(), "free some space or choose another --save-file")
    if args.dry_run:
        _explain(session_plan.planned, (height, width, spec.dit_tokens(settings.frame_num, height, width)), settings.frame_num)
        print(f"conditioning: extending {counted(args.context_frames, 'frame')} of {args.video}")
    _check_fits(session_plan)
    if args.dry_run:
        return 0
    _keep_compiled_code()
    loading_started = time.perf_counter()
    states = save_file.with_suffix(".extend")
    state_files = [segment_state_file(states, index) for index in range(args.extend_times)]
    with _exclusive(save_file, *state_files) if _is_main() else nullcontext(), runs.RunSession.open(session_plan, progress=not args.quiet) as session:
        loading_seconds = time.perf_counter() - loading_started

        def clip(known, settings, state_file):
            return session.generate(known, settings=settings, state_file=state_file, progress=not args.quiet)

        try:
            result = extend_video(clip, source, settings, context_frames=args.context_frames, times=args.extend_times, spec=spec, state_dir=states)
        except BaseException:
            if _is_main() and states.is_dir():
                print(f"wan-i2v: the denoising states are saved in {states}; the same command resumes from them", file=sys.stderr)
            raise
        if result.video is None:  # a rank other than 0 of a parallel run
            return 0
        write_mp4(result.video, save_file, fps=source.fps, metadata=result.metadata)
        shutil.rmtree(states)
    seconds = sum(sum(segment.timings.values()) for segment in result.segments)
    print(f"time: loading {loading_seconds:.1f}s, {counted(len(result.segments), 'clip')} {seconds:.1f}s", file=sys.stderr)
    print(f"seeds: {', '.join(str(segment.settings.seed) for segment in result.segments)}", file=sys.stderr)
    print(save_file)
    return 0


def cmd_serve(args) -> int:
    from wan_i2v import session as runs
    from wan_i2v.parallel.groups import launched
    from wan_i2v.server import check_binding, serve, server_tokens

    recipe = SamplingDefaults.recipe(args.distilled)
    defaults = recipe.given(size=args.size, frame_num=args.frame_num, steps=args.steps, guide_scale=args.guide_scale, shift=args.shift, solver=args.solver)
    max_area, _ = parse_size(defaults.size)
    check_frame_num(defaults.frame_num)
    tokens = server_tokens(args.token or _read_token_file(args.token_file) or os.environ.get("WAN_I2V_TOKEN") or None, args.tokens)
    queue = args.queue or os.environ.get("WAN_I2V_QUEUE") or None
    if _is_main():
        check_binding(args.host, args.port, tokens)
        if queue is not None and not queue.startswith(("postgresql://", "postgres://")):
            raise WanError("the queue URL (--queue or WAN_I2V_QUEUE) is not a PostgreSQL URL (postgresql://USER:PASSWORD@HOST:PORT/DATABASE)",
                           "leave it out for the queue in --state-dir (the servers of one machine)")  # fmt: skip
    options = options_from(args)
    height, width = spec_for().video_size(720, 1280, max_area)  # planned for landscape videos of the default size and length
    session_plan = runs.plan(replace(options, loras=_loras(options.loras)), height=height, width=width, frame_num=defaults.frame_num,
                             guided=any(scale != 1 for scale in defaults.guide_scale))  # fmt: skip
    _tell(session_plan)
    _check_fits(session_plan)
    _keep_compiled_code()
    options, planned = session_plan.options, session_plan.planned

    def open_session():
        return runs.RunSession.open(session_plan, progress=True)

    if not _is_main():  # under torchrun: rank 0 serves, the other ranks run its jobs
        with open_session() as session:
            session.follow()
        return 0
    from wan_i2v.execution import torch_dtype
    from wan_i2v.parallel.plan import model_sizes
    from wan_i2v.server.capacity import Capacity

    state_dir = Path(args.state_dir) if args.state_dir else _home() / "server"
    # (the sizes as plan_for read them: the requests are estimated on the plan it made)
    capacity = Capacity(planned, model_sizes(options.ckpt_dir if Path(options.ckpt_dir).is_dir() else None,
                                             torch_dtype(options.dtype, options.device).itemsize, fp8=planned.plan.fp8),
                        spawned=session_plan.world > 1 and not launched())  # fmt: skip
    return serve(open_session, state_dir=state_dir, host=args.host, port=args.port, tokens=tokens, defaults=defaults,
                 max_queued=args.max_queue, max_upload_mb=args.max_upload_mb, queue_url=queue, capacity=capacity,
                 allowed_hosts=tuple(args.allowed_hosts))  # fmt: skip


def _read_token_file(path: str | None) -> str | None:
    """--token-file's token: its first line (a token on the command line shows in ps)."""
    if path is None:
        return None
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise WanError(f"cannot read --token-file {path}: {getattr(exc, 'strerror', None) or exc}", "give a readable text file with the token on its first line") from None
    if not lines or not lines[0].strip():
        raise WanError(f"--token-file {path} has no token on its first line", "write the token there")
    return lines[0].strip()


def cmd_decode(args) -> int:
    import torch

    from wan_i2v import session as runs
    from wan_i2v.execution import torch_dtype
    from wan_i2v.video import check_writable, write_mp4

    source = Path(args.latents)
    if not source.is_file():
        raise WanError(f"latents file not found: {source}", "give the file written by --save-latents")
    try:
        saved = torch.load(source, map_location="cpu", weights_only=True)
    except Exception:
        # (torch's own message spans lines and suggests unpickling untrusted code: not for users)
        raise WanError(f"cannot read latents file {source}: not a wan-i2v latents file, or cut short", "give the file written by --save-latents, or generate again") from None
    latents = saved.get("latents") if isinstance(saved, dict) and saved.get("format") == runs.LATENTS_FORMAT else None
    if not isinstance(latents, torch.Tensor) or latents.ndim != 4 or latents.shape[0] != spec_for().latent_channels:
        raise WanError(f"{source} is not a wan-i2v latents file", "give the file written by --save-latents")
    save_file = _mp4_path(args.save_file, "--save-file")
    if save_file.exists() and not args.overwrite:
        raise WanError(f"{save_file} exists", "give another --save-file, or add --overwrite to replace it")
    check_writable(save_file)
    device = args.device or runs.default_device()
    runs.check_device(device)
    from wan_i2v.pipeline import decode_latents, load_vae_for

    ckpt_dir = runs.checkpoint_dir(options_from(args))
    vae = load_vae_for(ckpt_dir / spec_for().files.vae, torch.device(device), torch_dtype(args.decode_dtype, device))

    video = decode_latents(vae, latents, torch.device(device), progress=not args.quiet)
    write_mp4(video, save_file, fps=spec_for().fps, metadata=saved.get("settings"))
    print(save_file)
    return 0


def cmd_demo(args) -> int:
    from wan_i2v.session import RunSession
    from wan_i2v.tiny import ensure_tiny_checkpoint
    from wan_i2v.video import check_writable, demo_image

    settings = _settings(args, max_area=args.max_area, shift=3.0)  # checked before the model is made
    save_file = _mp4_path(args.save_file, "--save-file") if args.save_file is not None else _fresh_output(DEMO_FILE)
    check_writable(save_file)
    ckpt_dir = ensure_tiny_checkpoint(_home() / "tiny-checkpoint")
    print(f"demo: tiny random model in {ckpt_dir} (random weights: the video is noise-like, not a real video)", file=sys.stderr)
    loading_started = time.perf_counter()
    with RunSession.open(RunOptions(ckpt_dir=ckpt_dir, device="cpu", gpus=1, dtype="fp32"), progress=not args.quiet) as session:
        _run(session, demo_image(), settings, progress=not args.quiet, save_file=save_file, latents_file=None, keep_latents=False,
             loading_seconds=time.perf_counter() - loading_started)  # fmt: skip
    return 0


def cmd_compare(args) -> int:
    # (here: the metrics' library takes a second to import, which --help and the other commands need not pay)
    from wan_i2v.compare import compare_videos, format_report

    print(format_report(compare_videos(args.reference, args.video)))
    return 0


def cmd_make_tiny(args) -> int:
    from wan_i2v.tiny import write_tiny_checkpoint

    target = Path(args.directory)
    if target.exists():
        raise WanError(f"{target} already exists", "give a new directory")
    print(write_tiny_checkpoint(target, seed=args.seed))
    return 0


def _seed(text: str) -> int | None:
    """A seed; -1 means random, as in the official script."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    return None if value == -1 else value


def _guide_scale(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def _task(text: str) -> str:
    if text != OFFICIAL_TASK:
        raise argparse.ArgumentTypeError(f"task {text!r} is not run here: wan-i2v runs {OFFICIAL_TASK} only")
    return text


def _official_bool(text: str) -> bool:
    """True or False as the official script's str2bool reads them."""
    meaning = {"yes": True, "true": True, "t": True, "y": True, "1": True, "no": False, "false": False, "f": False, "n": False, "0": False}.get(text.lower())
    if meaning is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not True or False")
    return meaning


def _version() -> str:
    try:
        return version("wan-i2v")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown (not installed)"


class _Formatter(argparse.HelpFormatter):
    def _format_args(self, action, default_metavar):
        # One or two values (LOW [HIGH]), not argparse's "LOW [HIGH ...]" that suggests more.
        if action.nargs == "+" and isinstance(action.metavar, tuple) and len(action.metavar) == 2:
            return "%s [%s]" % action.metavar
        return super()._format_args(action, default_metavar)


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, formatter_class=_Formatter, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)

    def error(self, message):
        # The prefix of every other error, and the help of the command that was typed.
        self.exit(2, f"wan-i2v: error: {message} (see `{self.prog} --help`)\n")


def official_options(p) -> None:
    """The official generate.py's I2V options that ours do not already spell its way, so that its
    command lines run unchanged (README: The official command lines)."""
    off = p.add_argument_group("the official generate.py's options")
    off.add_argument("--task", type=_task, default=OFFICIAL_TASK, help=f"{OFFICIAL_TASK}, the only task run here")
    off.add_argument("--offload_model", type=_official_bool, default=None, metavar="True|False",
                     help="True: --offload experts; False: no offload asked (the plan still offloads what does not fit)")
    off.add_argument("--convert_model_dtype", action="store_true", help="--dtype bf16")
    off.add_argument("--t5_cpu", action="store_true", help="accepted; the plan places the text encoder (README: The official command lines)")
    off.add_argument("--t5_fsdp", "--dit_fsdp", dest="fsdp", action="store_true", help="--fsdp (it shards both)")
    off.add_argument("--ulysses_size", dest="ulysses", type=int, metavar="U", help="--ulysses")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="wan-i2v", description="Wan2.2-I2V-A14B image-to-video.")
    parser.add_argument("--version", action="version", version=f"wan-i2v {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    def sampling_options(p, *, frame_num, steps, prompt_required, seed=None):
        demo_prompt = "A small paper boat drifts on a calm pond."
        p.add_argument("--prompt", required=prompt_required, default=None if prompt_required else demo_prompt,
                       help="what happens in the video" if prompt_required else f"default: {demo_prompt!r}")
        p.add_argument("--negative-prompt", default=None, help="default: the official negative prompt")
        # The official script's spellings (--frame_num, --sample_steps, ...) are aliases: the same meaning.
        p.add_argument("--frame-num", "--frame_num", type=int, default=frame_num, help=f"a number of the form 4n+1 (default {frame_num})")
        p.add_argument("--steps", "--sample_steps", type=int, default=None, help=f"1 to {MAX_STEPS} (default {steps}; {DISTILLED.steps} with --distilled)")
        p.add_argument("--guide-scale", "--sample_guide_scale", type=_guide_scale, nargs="+", default=None, metavar=("LOW", "HIGH"),
                       help="one value for both experts, or the low-noise and high-noise expert's (default 3.5; 1 with --distilled: "
                            "no guidance, one forward per step)")
        p.add_argument("--seed", "--base_seed", type=_seed, default=seed,
                       help="default (or -1): random, printed and stored in the mp4" if seed is None else f"default {seed}: the same video each time (-1: random)")
        p.add_argument("--solver", "--sample_solver", choices=SOLVERS, default=None,
                       help="unipc (default, the official), dpm++, or euler (the distilled models' 4-step schedule; default with --distilled)")
        p.add_argument("--distilled", action="store_true",
                       help="sample as the 4-step distilled models (Lightning LoRAs, distilled checkpoints) are: "
                            "--solver euler --steps 4 --guide-scale 1 --shift 5, each overridable")
        p.set_defaults(default_steps=steps)
        p.add_argument("--quiet", action="store_true", help="no progress bars")

    gen = sub.add_parser("generate", help="make a video from an image and a prompt")
    gen.add_argument("--image", required=True, help="the first frame: a PNG, JPEG or WebP file")
    sampling_options(gen, frame_num=81, steps=40, prompt_required=True)
    gen.add_argument("--size", default="720P", help="720P (1280*720, shift 5; the default), 480P (832*480, shift 3) or H*W; the image's aspect ratio is kept")
    gen.add_argument("--shift", "--sample_shift", type=float, default=None, help="default: the preset's (5.0 for custom sizes and with --distilled)")
    gen.add_argument("--save-file", "--save_file", default=None,
                     help=f"an .mp4 file (default {DEFAULT_OUTPUT}, or {Path(DEFAULT_OUTPUT).stem}-N.mp4 when that exists)")
    gen.add_argument("--save-latents", default=None, help="also keep the latents here (`wan-i2v decode` re-decodes them)")
    add_options(gen)
    official_options(gen)
    gen.add_argument("--dry-run", action="store_true", help="print the plan and per-GPU memory estimate, then exit")
    gen.set_defaults(func=cmd_generate)

    ext = sub.add_parser("extend", help="continue a video with new clips, each conditioned on the last frames before it")
    ext.add_argument("video", help="the mp4 to continue: its size is the new clips' (sides multiples of 16)")
    sampling_options(ext, frame_num=81, steps=40, prompt_required=True)
    ext.add_argument("--shift", "--sample_shift", type=float, default=None, help="default: the size preset's (5.0 for custom sizes and with --distilled)")
    ext.add_argument("--context-frames", type=int, default=5,
                     help="the video's last frames each clip is conditioned on and starts with (left out of the join): 4m+1 (default 5)")
    ext.add_argument("--extend-times", type=int, default=1, help="how many clips to add, each after the one before (default 1); clip i takes --seed + i")
    ext.add_argument("--save-file", "--save_file", default=None, help="the .mp4 to write: the video, then the new frames (default VIDEO-extended.mp4)")
    add_options(ext)
    ext.add_argument("--dry-run", action="store_true", help="print the plan and per-GPU memory estimate, then exit")
    ext.set_defaults(func=cmd_extend)

    srv = sub.add_parser("serve", help="an HTTP server (OpenAI videos API, web page) with a job queue that survives restarts")
    srv.add_argument("--host", default="127.0.0.1", help="the address to listen on (default 127.0.0.1: this machine only; another needs --token)")
    srv.add_argument("--port", type=int, default=8000, help="default 8000")
    srv.add_argument("--state-dir", default=None, help="the job queue, uploads and videos (default $WAN_I2V_HOME/server): keep it on a persistent volume")
    srv.add_argument("--queue", default=None, metavar="URL", help="a PostgreSQL database (postgresql://...) that servers on several machines share, "
                     "--state-dir then being a folder they all mount (default: $WAN_I2V_QUEUE, else SQLite in --state-dir: the servers of one machine)")
    srv.add_argument("--token", default=None, help="clients must send Authorization: Bearer TOKEN (default: $WAN_I2V_TOKEN; none on 127.0.0.1)")
    srv.add_argument("--allowed-hosts", nargs="+", default=[], metavar="NAME",
                     help="the names clients reach the server by, besides IP addresses and localhost (other Host names are refused: "
                     "DNS rebinding); * allows any, for a proxy that checks them")
    srv.add_argument("--token-file", default=None, metavar="FILE", help="read --token from the first line of FILE (it stays out of ps)")
    srv.add_argument("--tokens", default=None, metavar="FILE", help="one token per client, a line each: NAME TOKEN, or NAME TOKEN admin "
                     "(each client sees only its own jobs; an admin sees all); not with --token")
    srv.add_argument("--max-queue", type=int, default=1000, help="jobs that may wait; more are refused with 429 (default 1000)")
    srv.add_argument("--max-upload-mb", type=float, default=50, help="the largest image accepted, in MiB (default 50)")
    jobs = srv.add_argument_group("each job's defaults (a request may set its own)")
    jobs.add_argument("--size", default="720P", help="720P, 480P or H*W (default 720P; the GPUs' plan is made for it)")
    jobs.add_argument("--frame-num", "--frame_num", type=int, default=81, help="4n+1 (default 81; the GPUs' plan is made for it)")
    jobs.add_argument("--steps", "--sample_steps", type=int, default=None, help=f"default 40; {DISTILLED.steps} with --distilled")
    jobs.add_argument("--guide-scale", "--sample_guide_scale", type=_guide_scale, nargs="+", default=None, metavar=("LOW", "HIGH"), help="default 3.5; 1 with --distilled")
    jobs.add_argument("--shift", "--sample_shift", type=float, default=None, help="default: the size preset's (5.0 with --distilled)")
    jobs.add_argument("--solver", choices=SOLVERS, default=None, help="default unipc; euler with --distilled")
    jobs.add_argument("--distilled", action="store_true", help="jobs sample as the 4-step distilled models: euler, 4 steps, guide scale 1, shift 5")
    srv.set_defaults(func=cmd_serve, default_steps=40)
    add_options(srv)

    dec = sub.add_parser("decode", help="decode saved latents to mp4 again")
    dec.add_argument("latents", help="a file written by `generate --save-latents` (or left by a run stopped while decoding)")
    dec.add_argument("--save-file", "--save_file", required=True, help="the .mp4 to write")
    dec.add_argument("--overwrite", action="store_true", help="replace --save-file if it exists (default: refuse)")
    add_options(dec, only=("ckpt_dir", "cache_dir", "device", "decode_dtype"))
    dec.add_argument("--quiet", action="store_true", help="no progress bar")
    dec.set_defaults(func=cmd_decode)

    demo = sub.add_parser("demo", help="run the whole pipeline on a built-in tiny random model on the CPU")
    sampling_options(demo, frame_num=17, steps=12, prompt_required=False, seed=0)
    demo.add_argument("--max-area", type=int, default=160 * 96, help=argparse.SUPPRESS)
    demo.add_argument("--save-file", default=None, help=f"default {DEMO_FILE}, or {Path(DEMO_FILE).stem}-N.mp4 when that exists")
    demo.set_defaults(func=cmd_demo)

    cmp = sub.add_parser("compare", help="PSNR and SSIM of a video against a reference, per frame and overall (what a fast mode costs)")
    cmp.add_argument("reference", help="the video of the exact path (an .mp4)")
    cmp.add_argument("video", help="the video to measure against it, of the same size and frame count")
    cmp.set_defaults(func=cmd_compare)

    tiny = sub.add_parser("make-tiny-checkpoint", help="write a tiny random checkpoint in the official layout")
    tiny.add_argument("directory")
    tiny.add_argument("--seed", type=int, default=0, help="the random weights' seed (default 0)")
    tiny.set_defaults(func=cmd_make_tiny)

    add_cache_parser(sub)
    for command in sub.choices.values():
        command.set_defaults(command_parser=command)
    return parser


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # pointed at the typed command's --help, where the options are
        getattr(args, "command_parser", parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def main(argv: list[str] | None = None) -> int:
    stop_on_sigterm()
    try:
        try:
            # (inside the handlers below: a Ctrl-C during the imports that reading the options makes is an interrupt too)
            args = _parse(argv)
        except SystemExit as exit_:  # --help, or argparse's one-line error
            return exit_.code
        with _one_line_warnings(), on_the_command_line():
            return args.func(args)
    except WanError as exc:
        rank = "" if _is_main() else f"(rank {os.environ.get('RANK')}) "
        print(f"wan-i2v: error: {rank}{exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:
        # Ctrl-C reaches the launcher's whole process group, and its ranks' ends can raise it once
        # more here: a second interrupt during the exit would end the process by the signal instead of 130.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if _is_main():  # (under torchrun every rank stops: rank 0 says so)
            print(f"wan-i2v: {'stopped by SIGTERM' if isinstance(stop, Terminated) else 'interrupted'}", file=sys.stderr)
        return TERMINATED if isinstance(stop, Terminated) else INTERRUPTED
    except MemoryError:
        print("wan-i2v: error: out of host memory (try a smaller --size or fewer --frame-num)", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        where = f" writing {exc.filename}" if exc.filename else ""
        print(f"wan-i2v: error: no space left on the disk{where} (free some space; a run's saved state lets the same command resume)", file=sys.stderr)
        return 2
    except Exception as exc:
        if is_out_of_memory(exc):
            print("wan-i2v: error: out of GPU memory (try --offload, --size 480P or fewer --frame-num)", file=sys.stderr)
            return 2
        raise


def run() -> None:
    """The program (the `wan-i2v` command, ``python -m wan_i2v``): ``main``'s exit code. After Ctrl-C
    the process ends at once with 130: CPython can remember an interrupt that struck while modules
    were being imported as unhandled, and would then end the process by SIGINT at exit (seen with
    ``python -m wan_i2v.cli`` interrupted while loading), which shells and launchers read differently."""
    code = main()
    if code in (INTERRUPTED, TERMINATED):
        atexit._run_exitfuncs()  # the exit's cleanup (multiprocessing's queues and semaphores), then the code
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
