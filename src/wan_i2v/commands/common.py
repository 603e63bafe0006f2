"""What several commands share: the run's summary, the output's name and lock, the settings and
LoRAs read from the flags, the plan's notes."""

from __future__ import annotations

import os
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

from wan_i2v import locks
from wan_i2v.cache.hub_files import is_hub_file
from wan_i2v.commands import DEFAULT_OUTPUT, STARTED, home, is_main
from wan_i2v.config import GenerationSettings, SamplingDefaults, sampling_given
from wan_i2v.errors import WanError
from wan_i2v.loading.lora import Loras, LoraSpec
from wan_i2v.models.spec import DEFAULT_SPEC, spec_for
from wan_i2v.options import expert_loras
from wan_i2v.video import leftover_temporaries


def _print_summary(result, path: Path, loading_seconds: float, steps: "StepClock | None" = None) -> None:
    timings = {"loading": loading_seconds, **result.timings}
    stages = ", ".join(f"{stage} {seconds:.1f}s" for stage, seconds in timings.items())
    print(f"time: {stages}; total {sum(timings.values()):.1f}s", file=sys.stderr)
    if steps is not None and steps.ends:
        print(steps.describe(result.timings), file=sys.stderr)
    if result.peak_memory_gb is not None:
        stages = ", ".join(f"{stage} {peak:.1f}" for stage, peak in result.stage_peaks_gb.items())
        print(f"peak GPU memory: {result.peak_memory_gb:.1f} GiB ({stages} GiB)", file=sys.stderr)
    if result.streaming is not None:
        streaming = result.streaming
        line = (f"streamed while denoising: {streaming['gb']:.1f} GB of weights, read in {streaming['read_s']:.1f}s (the reads waited "
                f"{streaming['slot_wait_s']:.1f}s for free slots); the host waited {streaming['waited_s']:.1f}s for them")
        if "computing_s" in streaming:
            line += f"; the GPU waited {streaming['device_waited_s']:.1f}s for their copies, the blocks computed for {streaming['computing_s']:.1f}s"
            line += f"; {streaming['allocator_retries']} GPU allocator retries (each a device sync)" if streaming["allocator_retries"] else ""
        print(line, file=sys.stderr)
    if result.step_cache is not None:
        print(_step_cache_line(result.step_cache["skipped"]), file=sys.stderr)
    print(f"seed: {result.settings.seed}", file=sys.stderr)
    print(path)


def _step_cache_line(skipped: dict) -> str:
    """The forwards the step cache skipped, in all and per expert."""
    skips, total = (sum(counts[i] for counts in skipped.values()) for i in (0, 1))
    return f"step cache: skipped {skips} of {total} forwards (" + ", ".join(f"{expert} {s} of {t}" for expert, (s, t) in skipped.items()) + ")"


class StepClock:
    """When each denoising step ended: the time from the start to the first step, and the steps' pace
    (the first step also compiles the blocks); each step's time in a run of a few steps.

    On the GPU this process runs on (``device``) the steps after the first are timed where they run: an
    event on its compute stream at each step's end. The host's clock at the step callbacks only says
    when a step was queued, which the host can do seconds ahead of the GPU (one step of 8 s once showed
    as 1.7 s, the next as 11.2 s). Ranks started by this process time their GPUs' steps themselves; here
    (``device`` None) the host's clock stands in."""

    def __init__(self, device=None):
        self.device = device if device is not None and device.type == "cuda" else None
        self.started = time.perf_counter()
        self.ends: list[float] = []
        self.device_ends: list = []  # torch.cuda.Event per step

    def __call__(self, step) -> None:
        self.ends.append(time.perf_counter())
        if self.device is not None:
            import torch  # (loaded by the run already; the commands' module stays quick to import)

            from wan_i2v.transforms.streaming import timing_event

            self.device_ends.append(timing_event(torch.cuda.current_stream(self.device)))

    def step_seconds(self) -> list[float]:
        """Each step after the first, the GPU's time where there is one."""
        if len(self.device_ends) == len(self.ends) > 1:
            self.device_ends[-1].synchronize()
            return [start.elapsed_time(end) / 1000 for start, end in zip(self.device_ends, self.device_ends[1:])]
        return [end - start for start, end in zip(self.ends, self.ends[1:])]

    def describe(self, timings: dict) -> str:
        denoising = self.started + timings.get("text encoding", 0) + timings.get("image encoding", 0)
        text = f"steps: first step done {self.ends[0] - STARTED:.1f}s after start (first step {self.ends[0] - denoising:.1f}s"
        later = self.step_seconds()
        if later:
            text += f", then {sum(later) / len(later):.2f}s a step"
        if 1 < len(self.ends) <= 10:  # a few-step run: each step, so a slow one (the expert's arrival) shows
            text += "; each " + ", ".join(f"{seconds:.2f}" for seconds in [self.ends[0] - denoising, *later]) + "s"
        return text + ")"


def generate_and_write(session, image, settings, *, progress: bool, save_file: Path, latents_file: Path | None, keep_latents: bool,
                       loading_seconds: float, state_file: Path | None = None, last_image=None):
    """Generate, save the latents before decoding (a decode that dies loses nothing), and write the mp4
    as the frames are decoded (after the decode, its encode took 4.9 s at 720P). With ``state_file`` the denoising state is saved after every step and the same command resumes
    a run that died. In a multi-process run only rank 0 writes and prints."""
    started = time.time()
    pipe = getattr(session, "pipe", None)  # a session in this process; one that started ranks has none here
    clock = StepClock(None if pipe is None else pipe.device)
    try:
        result = session.generate(image, settings=settings, progress=progress, latents_file=latents_file, state_file=state_file, on_step=clock,
                                  last_image=last_image, video_file=save_file)  # fmt: skip
    except BaseException as exc:
        saved = latents_file is not None and latents_file.is_file() and latents_file.stat().st_mtime >= started
        if saved and session.is_main and not isinstance(exc, WanError):
            # (with every step in the state file, the same command goes straight to the decode too)
            again = "the same command finishes the video, as does " if state_file is not None and state_file.is_file() else "finish with: "
            print(f"wan-i2v: the latents are saved in {latents_file}; {again}wan-i2v decode {latents_file} --save-file {save_file}", file=sys.stderr)
        elif state_file is not None and session.is_main and state_file.is_file():
            print(f"wan-i2v: the denoising state is saved in {state_file}; the same command resumes from it", file=sys.stderr)
        raise
    if not session.is_main:
        return result
    if latents_file is not None and not keep_latents:
        latents_file.unlink(missing_ok=True)
    if state_file is not None:
        state_file.unlink(missing_ok=True)
    _print_summary(result, save_file, loading_seconds, clock)
    return result


def run_model(options):
    """The model a command runs: --model, else the checkpoint's, else the default's (where no checkpoint
    is found, the run's planning says so, after everything typed has been checked)."""
    from wan_i2v import session as runs

    try:
        ckpt_dir = runs.checkpoint_dir(options)
    except WanError:
        ckpt_dir = None
    return runs.model_spec(options, ckpt_dir)


def settings_from(args, spec=DEFAULT_SPEC, **fixed):
    """The video's settings from the sampling flags; those not given: ``spec``'s model card's defaults
    (the command's number of steps, if it has one), or the distilled recipe. ``fixed``: settings the command has no flag for."""
    defaults = SamplingDefaults.recipe(True, spec) if args.distilled else SamplingDefaults.official(spec).given(steps=args.default_steps)
    return GenerationSettings.of(defaults=defaults, **{**sampling_given(args), **fixed})


def fresh_output(default: str = DEFAULT_OUTPUT, *, dry_run: bool = False) -> Path:
    """The default output: wan-i2v-output.mp4 (or the demo's), else the first -N.mp4 free, so that runs
    never overwrite each other's videos; a name whose run was interrupted (its state file is there) is
    taken again, so that the same command resumes it."""
    stem, n = Path(default).stem, 0
    while True:
        path = Path(f"{stem}-{n}.mp4" if n else default)
        free = not path.exists() or path.with_suffix(".state.pt").is_file()
        if free and not locks.held(_lock_path(path)):  # (a state file with its lock held is a run in progress)
            if n and is_main():
                print(f"wan-i2v: {'the run would write' if dry_run else 'writing'} {path} ({default} exists)", file=sys.stderr)
            return path
        n += 1


def _lock_path(save_file: Path) -> Path:
    return save_file.with_name(f".{save_file.name}.lock")


@contextmanager
def exclusive(save_file: Path, *companions: Path):
    """Hold a lock on the output while the run writes it: two runs on one --save-file would share its
    state file and one video would be lost. The lock is released (and its file removed) at the end.
    Held, it makes the temporaries a run killed mid-write left of the output and its ``companions``
    (the state, the latents) this run's to remove: no other run writes them."""
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


def mp4_path(text: str, option: str) -> Path:
    """An output video's path: a file name that ends in .mp4 (what is written there is an mp4)."""
    path = Path(text)
    if not text.strip():
        raise WanError(f"{option} is empty", "give a file name such as out.mp4")
    if text.endswith(("/", os.sep)) or path.is_dir():
        raise WanError(f"output path {text} is a directory", f"give a file name such as {path / 'out.mp4'}")
    if path.suffix.lower() != ".mp4":
        raise WanError(f"{option} {text} does not end in .mp4", f"the video is an mp4: use {path.with_suffix('.mp4')}")
    return path


def loras_from(files: dict | None, model=DEFAULT_SPEC):
    """The LoRA files of each of ``model``'s experts as the flags gave them (``RunOptions.loras``), each checked to exist before any loading."""
    by_expert = {expert: [LoraSpec.parse(text) for text in texts] for expert, texts in (expert_loras(files, model) or {}).items()}
    for spec in {spec for specs in by_expert.values() for spec in specs}:
        if Path(spec.path).suffix != ".safetensors":
            raise WanError(f"LoRA file {spec.path} is not a .safetensors file", "only .safetensors LoRAs are read")
        if not is_hub_file(spec.path) and not Path(spec.path).is_file():  # (a hub file is fetched, or found in the cache, by the plan)
            raise WanError(f"LoRA file not found: {spec.path}", "give the path of a .safetensors LoRA")
    return Loras.of(by_expert, model)


def tell(session_plan) -> None:
    """What the plan chose unasked (a line each, from rank 0) and dropped of what was asked (warnings)."""
    if is_main():
        for note in session_plan.notes:
            print(f"wan-i2v: {note}", file=sys.stderr)
    for warning in session_plan.warnings:
        warnings.warn(warning)


def check_fits(planned) -> None:
    refusal = planned.refusal()
    if refusal is not None:
        raise refusal


def keep_compiled_code() -> None:
    """The compiled blocks' code is kept beside the model cache (a pod's persistent volume), not in
    /tmp, so that a new process, even after a restart, finds it instead of compiling for a minute."""
    compiled = home() / "compiled"
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
