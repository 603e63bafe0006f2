"""A run session: plans a run for the machine, starts its ranks, loads the pipeline once and runs
jobs on it, one after another, until closed. The CLI (and a server) are thin layers over it.

Three ways a session runs, chosen by ``RunSession.open``:
- one process (one GPU, or the CPU): the pipeline lives in the caller's process;
- under a launcher (torchrun, a cluster): every rank plans and opens the session in its own
  process and calls ``generate``. The ranks join their process group as they plan: rank 0 alone
  plans (its memory, its LoRAs, its recipe) and the others receive its plan, or its refusal; rank
  0's job is the one run, handed to the others;
- ``gpus=N`` from a plain process: the session starts N ranks (``parallel.launch``) in the
  background and hands each job to rank 0 over a queue, which hands it to the others. Progress
  comes back as events, the video through shared memory, and a failed rank fails the session.
"""

from __future__ import annotations

import math
import os
import queue
import threading
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from functools import partial
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from wan_i2v.cache import cache_root, resolve_checkpoint_dir
from wan_i2v.cache.hub_files import distilled_loras as distilled_loras_of
from wan_i2v.config import OFFICIAL, GenerationSettings, SamplingDefaults
from wan_i2v.errors import WanError, command_line, option
from wan_i2v.execution import ExecutionPlan, PlannedRun, plan_run
from wan_i2v.loading.checkpoint import check_checkpoint_dir
from wan_i2v.loading.lora import Loras
from wan_i2v.models.conditioning import KnownFrames
from wan_i2v.models.spec import DEFAULT_SPEC, ModelSpec, spec_for, spec_of_checkpoint
from wan_i2v.options import DEVICE_FORM, RunOptions
from wan_i2v.parallel import ParallelGroups, init_distributed
from wan_i2v.parallel.groups import agree, env_rank, env_world, launched
from wan_i2v.parallel.launch import launch
from wan_i2v.parallel.plan import GiB, model_sizes
from wan_i2v.sampling.loop import Cancelled, LoopHook
from wan_i2v.transforms.step_cache import step_cache_threshold
from wan_i2v.video import check_writable, load_image, write_atomically

LATENTS_FORMAT = "wan-i2v-latents/1"


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def device_error(device: str) -> WanError | None:
    """The one-line error for a device name this package cannot run on (None: cpu, cuda or cuda:N)."""
    if DEVICE_FORM.fullmatch(device):
        return None
    return WanError(f"{option('device', device)} is not a device wan-i2v runs on", f"use {option('device', 'cuda')}, cuda:N (one GPU) or cpu")


def check_device(device: str) -> None:
    error = device_error(device)
    if error is not None:
        raise error
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise WanError(f"{option('device', device)} was asked for but no GPU is visible", f"use {option('device', 'cpu')}, or check the driver")


def checkpoint_dir(options: RunOptions) -> Path:
    """``ckpt_dir``, else the model's checkpoint in the cache (``model``'s, else the default model's)."""
    if options.ckpt_dir:
        return Path(options.ckpt_dir)
    return resolve_checkpoint_dir(options.cache_dir, options.model or DEFAULT_SPEC)


def model_spec(options: RunOptions, ckpt_dir: Path | None) -> ModelSpec:
    """The run's model: ``options.model``, else the checkpoint's (its config.json says it), else the
    default. A checkpoint of another model than the one asked for is refused in one line."""
    found = spec_of_checkpoint(ckpt_dir) if ckpt_dir is not None and ckpt_dir.is_dir() else None
    if options.model is None:
        return found or spec_for(DEFAULT_SPEC)
    asked = spec_for(options.model)
    if found is not None and (ckpt_dir / found.experts[0].file("config.json")).is_file() and found is not asked:
        raise WanError(f"the checkpoint in {ckpt_dir} is {found.name}, not {asked.name}",
                       f"give {option('ckpt_dir')} a {asked.name} checkpoint, or leave out {option('model')}")  # fmt: skip
    return asked


def world_size(options: RunOptions, device: str, *, planning_only: bool = False) -> int:
    """How many processes the run has: the launcher's WORLD_SIZE, else ``gpus`` (checked against the machine)."""
    if launched():
        world = env_world()
        if options.gpus not in (None, world):
            raise WanError(f"{option('gpus', options.gpus)} but the launcher started {world} processes", f"leave out {option('gpus')} under torchrun")
        return world
    gpus = 1 if options.gpus is None else options.gpus
    if gpus < 1:
        raise WanError(option("gpus", gpus), "give 1 or more")
    if device.startswith("cuda:") and gpus > 1:
        raise WanError(f"{option('device', device)} names one GPU but {option('gpus')} is {gpus}",
                       f"use {option('device', 'cuda')}, and CUDA_VISIBLE_DEVICES to pick the GPUs")  # fmt: skip
    if device.startswith("cuda") and gpus > 1 and not planning_only:
        visible = torch.cuda.device_count()
        if gpus > visible:
            raise WanError(
                f"{option('gpus', gpus)} but this machine has {visible} GPU{'s' if visible != 1 else ''}",
                f"use {option('gpus', visible)} or fewer" if visible else f"use {option('device', 'cpu')}",
            )
    return gpus


def available_host_bytes(proc: Path = Path("/proc"), cgroups: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The host memory this process may use: the machine's available memory (free, plus the page
    cache it can give back), within its cgroup v2 limit if one is set (the limit, less what the group
    uses but its page cache); None where neither can be read."""
    available = None
    try:
        for line in (proc / "meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        group = cgroups / (proc / "self" / "cgroup").read_text().splitlines()[-1].split(":", 2)[2].lstrip("/")
        limit = (group / "memory.max").read_text().strip()
        if limit != "max":
            stat = dict(line.split() for line in (group / "memory.stat").read_text().splitlines())
            free = int(limit) - int((group / "memory.current").read_text()) + int(stat.get("file", 0))
            available = free if available is None else min(available, free)
    except (OSError, IndexError, ValueError):
        pass
    return available


def plan_for(
    options: RunOptions, *, height: int, width: int, frame_num: int, device: str, world: int, ckpt_dir: Path | None, query_gpu: bool = True,
    spawned: bool = False, guided: bool = True,
) -> PlannedRun:
    """The execution plan for videos of this shape: what ``options`` force, the rest chosen to fit
    the GPUs' memory (``gpu_memory``, else the GPU's own when ``query_gpu``; else no limit) and the
    host's (``host_memory``, else what this machine has available). ``spawned``: this process will
    start the ranks itself (and holds the video); ``guided`` false: the videos run at guide scale 1
    (one pass per step), so no GPU goes to CFG parallel. Shared by the run, ``--dry-run`` and the benchmarks."""
    base = ExecutionPlan.for_device(_device_type(device), options)
    spec = spec_for(base.model)
    sizes = model_sizes(ckpt_dir if ckpt_dir is not None and ckpt_dir.is_dir() else None, base.dtype.itemsize, fp8=options.fp8, spec=spec)
    if options.gpu_memory is not None:
        gpu_bytes = int(options.gpu_memory * GiB)
    elif device.startswith("cuda") and query_gpu and torch.cuda.is_available():
        gpu_bytes = torch.cuda.get_device_properties(torch.device(device)).total_memory
    else:
        gpu_bytes = None
    host_bytes = int(options.host_memory * GiB) if options.host_memory is not None else available_host_bytes()
    return plan_run(
        base, sizes, gpus=world, tokens=spec.dit_tokens(frame_num, height, width), pixels=height * width, frames=frame_num, gpu_bytes=gpu_bytes,
        host_bytes=host_bytes, ulysses=options.ulysses, cfg_parallel=options.cfg_parallel, fsdp=options.fsdp, offload=options.offload,
        guided=guided, spawned=spawned, capped=options.gpu_memory is not None,
    )  # fmt: skip


# Expert size (parameters) past which a run on the CPU takes hours: the real model's 14B, not a test's tiny one.
CPU_PARAMETERS_LIMIT = 2e9


@dataclass(frozen=True)
class SessionPlan:
    """A session planned for videos up to a shape, as data: what the front end prints (``notes``,
    ``warnings``, ``--dry-run``'s plan), checks (``output_bytes``, ``refusal``) and ``RunSession.open`` runs."""

    options: RunOptions  # as the run goes: the device and checkpoint resolved, what the device cannot do dropped
    planned: PlannedRun
    world: int
    height: int
    width: int
    frame_num: int
    guided: bool
    notes: tuple[str, ...] = ()  # what the plan chose that the user did not ask for (the CPU, with no GPU visible)
    warnings: tuple[str, ...] = ()  # what the user asked for that the plan dropped (--fp8 on the CPU)

    @property
    def ckpt_dir(self) -> Path | None:
        return None if self.options.ckpt_dir is None else Path(self.options.ckpt_dir)

    @property
    def output_bytes(self) -> int:
        """What a video's files take beside its output, at most: the latents, the state saved each step
        and the mp4, each written beside a temporary copy."""
        latent_bytes = math.prod(spec_for(self.planned.plan.model).latent_shape(self.frame_num, self.height, self.width)) * 4  # float32
        return 6 * latent_bytes + self.frame_num * self.height * self.width // 4 + 16 * 2**20

    def refusal(self) -> WanError | None:
        """The one-line error of videos that fit nowhere on this machine (None: they fit)."""
        return self.planned.refusal()


def plan(options: RunOptions, *, height: int = 720, width: int = 1280, frame_num: int = 81, guided: bool = True, dry_run: bool = False) -> SessionPlan:
    """Plan a session for videos up to ``height`` x ``width`` x ``frame_num`` (``guided`` as ``plan_for``):
    the checkpoint, the device (with no GPU visible, the CPU for a small model, said in ``notes``), the
    world, and the execution plan, a combination the run refuses raised. On the CPU, --fp8, which would
    only slow the run there (FP8 emulated), is dropped with a warning; --offload holds there too: the
    experts then stay in the checkpoint's files, not in host memory. ``dry_run``: planned for GPUs this
    machine need not have (unless the device is the CPU), and without a checkpoint for the official model's shapes.

    Under a launcher (unless ``dry_run``, which runs nothing) every rank calls it: each checks its own
    device and joins the process group on it (the session then runs in that group), then rank 0
    alone plans and every rank gets its plan, or raises the error its planning raised."""
    planning = partial(_plan_here, options, height=height, width=width, frame_num=frame_num, guided=guided, dry_run=dry_run)
    if dry_run or not launched():
        return planning()
    # Each rank checks its own device, the backend it joins with; all the rest is rank 0's to find.
    device = _join_group(_run_device(options, None, []))
    return _rank_0_plans(planning, device)


def _plan_here(options: RunOptions, *, height: int, width: int, frame_num: int, guided: bool, dry_run: bool) -> SessionPlan:
    """``plan`` in this process."""
    try:
        ckpt_dir = checkpoint_dir(options)
    except WanError:
        if not dry_run:
            raise
        ckpt_dir = None  # a dry run plans for the official model's shapes
    options = replace(options, model=model_spec(options, ckpt_dir).name)
    notes, warned = [], []
    device = (options.device or "cuda") if dry_run else _run_device(options, ckpt_dir, notes)
    if not dry_run:
        check_checkpoint_dir(ckpt_dir, options.model)
    options = replace(options, loras=run_loras(options, ckpt_dir, notes, fetch=not dry_run))
    world = world_size(options, device, planning_only=dry_run)
    if device == "cpu" and options.fp8:
        warned.append(f"{option('fp8')} does nothing on the CPU (FP8 matmuls need an NVIDIA GPU); ignored")
        options = replace(options, fp8=False)
    spawned = world > 1 and not launched()
    planned = plan_for(options, height=height, width=width, frame_num=frame_num, device=device, world=world, ckpt_dir=ckpt_dir,
                       query_gpu=not (spawned and not dry_run), spawned=spawned, guided=guided)  # fmt: skip
    planned.plan.check()
    options = replace(options, ckpt_dir=ckpt_dir, device=device)
    return SessionPlan(options, planned, world, height, width, frame_num, guided, tuple(notes), tuple(warned))


def run_loras(options: RunOptions, ckpt_dir: Path | None, notes: list[str], fetch: bool = True) -> Loras:
    """The LoRAs the run merges, each hub file (hf://...) as its copy in the cache (fetched first
    unless not ``fetch``: a dry run fetches nothing, and says so in ``notes``). With ``distilled`` and
    none given, the spec's distilled pair from the cache (see ``distilled_loras``)."""
    loras = Loras.of(options.loras)
    if options.distilled and options.lightning and not loras.by_expert:
        loras = distilled_loras(options, ckpt_dir, notes)
    root = cache_root(options.cache_dir)
    loras = loras.from_cache(root, fetch=fetch)
    for hub_file in loras.hub_files():
        notes.append(f"{hub_file} is not in the cache {root} yet: the run fetches it")
    return loras


def distilled_loras(options: RunOptions, ckpt_dir: Path | None, notes: list[str]) -> Loras:
    """``distilled``'s LoRAs where none are given: the spec's distilled pair, found in the cache
    offline (said in ``notes``). Without it a checkpoint of the spec's shapes, which the pair is for,
    is refused: the base model is not made for four steps. A checkpoint of other shapes (a tiny
    test model) has no pair to miss and runs the recipe as it is; one distilled itself says so with
    ``lightning`` False."""
    spec = spec_for()
    root = cache_root(options.cache_dir)
    pair = {name: hub_file.cached(root) for name, hub_file in distilled_loras_of(spec).items()}
    if pair and all(pair.values()):
        notes.append(f"{option('distilled')}: the 4-step LoRAs from the cache ({', '.join(str(path) for path in pair.values())})")
        return Loras.of({name: [path] for name, path in pair.items()}, spec)
    if pair and _of_the_spec_shapes(ckpt_dir, spec):
        given = "--lora-high and --lora-low" if command_line() else "loras="
        distilled_itself = "--no-lightning" if command_line() else "lightning=False"
        raise WanError(f"{option('distilled')} needs {spec.name}'s 4-step LoRAs, which are not in the cache {root}",
                       f"`wan-i2v cache quick --lightning` fetches them; or give your own with {given}, or {distilled_itself} for a checkpoint distilled itself")  # fmt: skip
    if pair:
        notes.append(f"{option('distilled')}: no 4-step LoRAs in the cache, and {ckpt_dir} is not of {spec.name}'s shapes, which they are for: it runs without")
    else:
        notes.append(f"{option('distilled')}: {spec.name} has no 4-step LoRAs: the checkpoint runs as it is")
    return Loras()


def _of_the_spec_shapes(ckpt_dir: Path | None, spec) -> bool:
    """The checkpoint's experts have the width, depth and feed-forward size of the spec's (those a LoRA
    for it changes); a dry run without a checkpoint counts as the spec's."""
    official = spec.builders.dit_config.target()
    config_file = None if ckpt_dir is None else ckpt_dir / spec.experts[0].folder / "config.json"
    if config_file is None or not config_file.is_file():
        return True
    config = spec.builders.dit_config.target.from_json_file(config_file)
    return (config.dim, config.ffn_dim, config.num_layers) == (official.dim, official.ffn_dim, official.num_layers)


def _run_device(options: RunOptions, ckpt_dir: Path | None, notes: list[str]) -> str:
    """``device``, else the GPU. With no GPU visible the run goes to the CPU only for a small model
    (a tiny test checkpoint) in one process, and says so in ``notes``; the real model there would
    take hours, and several processes were asked for GPUs, so those need the CPU asked for.
    (``ckpt_dir`` is read for one process only.)"""
    if options.device:
        check_device(options.device)
        return options.device
    device = default_device()
    processes = env_world() if launched() else options.gpus or 1
    if device == "cpu" and processes > 1:
        raise WanError(f"{processes} GPUs asked for but no GPU is visible",
                       f"check the GPU driver (nvidia-smi), or give {option('device', 'cpu')} to run {processes} processes on the CPU")  # fmt: skip
    if device == "cpu":
        # (a folder that is not there is the loader's to report)
        parameters = model_sizes(ckpt_dir, dtype_bytes=1, spec=options.model).expert if ckpt_dir.is_dir() else 0
        if parameters > CPU_PARAMETERS_LIMIT:
            raise WanError(f"no GPU is visible, and a video of this {parameters / 1e9:.0f}B-parameter model takes hours on the CPU",
                           f"check the GPU driver (nvidia-smi), or give {option('device', 'cpu')} to run on the CPU all the same")  # fmt: skip
        notes.append(f"no GPU is visible: running on the CPU ({option('device', 'cpu')} says so and silences this)")
    return device


def cap_gpu_memory(planned: PlannedRun, device) -> None:
    """Hold the run's allocator to the GPU memory it was planned for (``gpu_memory``): a GPU shared with
    other work keeps what the run was told to leave."""
    if planned.gpu_bytes is None or not planned.capped or torch.device(device).type != "cuda":
        return
    device = torch.device(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, planned.gpu_bytes / total), index)


def _device_type(device: str) -> str:
    return "cuda" if device.startswith("cuda") else "cpu"


@dataclass
class Job:
    """One video: ``generate``'s arguments as data, so that it can travel to the ranks. ``image`` (and
    ``last_image``) are PIL images (read by the caller: every rank gets the same pixels), or ``image`` is
    the ``KnownFrames`` of an extension."""

    image: object
    settings: GenerationSettings
    state_file: str | None = None  # the denoising state is saved there after each step (the same job resumes from it)
    progress: bool = True  # progress bars on stderr (rank 0's)
    latents_file: str | None = None  # the latents are saved there before decoding (a decode that dies loses nothing)
    video_file: str | None = None  # rank 0 writes the mp4 there as it decodes; the video then stays there (the result's is None)
    last_image: object = None  # the video's last frame, if given
    step_cache: float | None = None  # this job's threshold for the session's step cache (None: the plan's)


def save_latents(path: Path, latents, settings: dict) -> None:
    write_atomically(Path(path), lambda tmp: torch.save({"format": LATENTS_FORMAT, "latents": latents, "settings": settings}, tmp))


def _run_job(pipe, job: Job, *, cancel=None, on_step=None):
    class StepEvents(LoopHook):
        def on_step_end(self, step, latent):
            on_step(step)

    def before_decode(latents, settings):
        if job.latents_file is not None:
            save_latents(Path(job.latents_file), latents, settings.as_dict())

    hooks = [StepEvents()] if on_step is not None and pipe.is_main else []
    with job_step_cache(pipe, job.step_cache):
        result = pipe.generate(job.image, settings=job.settings, state_file=job.state_file, progress=job.progress, before_decode=before_decode,
                               cancel=cancel, hooks=hooks, video_file=job.video_file, last_image=job.last_image)  # fmt: skip
    # Written to its file, the video does not travel back (0.9 GB of float frames at 720P, through shared memory from a spawned rank).
    return result if job.video_file is None else replace(result, video=None)


@contextmanager
def job_step_cache(pipe, threshold: float | None):
    """A job's own step cache threshold, for its run only: the loaded cache decides with it, and the
    plan the run records (the video's metadata, the saved state's identity) says it."""
    cache = pipe.plan.step_cache
    if threshold is None or (cache is not None and threshold == cache.threshold):
        yield
        return
    if cache is None or not cache.on:
        if threshold > 0:
            raise WanError(f"{option('step_cache', threshold)} asked of a pipeline loaded without the step cache",
                           "load it with a step cache (its threshold is then each job's default)")  # fmt: skip
        yield  # (0: off, as it is)
        return
    plan = pipe.plan
    pipe.plan = replace(plan, step_cache=replace(cache, threshold=threshold))
    try:
        with step_cache_threshold(pipe.experts.models, threshold):
            yield
    finally:
        pipe.plan = plan


class RunSession:
    """A loaded pipeline on 1..N GPUs (or the CPU) that runs jobs until ``close``. Open with
    ``RunSession.open``; use as a context manager."""

    defaults: SamplingDefaults = OFFICIAL  # a job's sampling settings where it leaves them out

    def __init__(self, planned: PlannedRun):
        self.planned = planned

    @property
    def plan(self) -> ExecutionPlan:
        return self.planned.plan

    @property
    def is_main(self) -> bool:
        """This process gets the results (not a rank other than 0 under a launcher)."""
        return True

    @classmethod
    def open(cls, options: RunOptions | SessionPlan, *, height: int = 720, width: int = 1280, frame_num: int = 81, guided: bool = True,
             progress: bool = False) -> "RunSession":  # fmt: skip
        """Run a session: ``options`` planned (``plan``: for videos up to ``height`` x ``width`` x
        ``frame_num``, guided or not; videos that fit nowhere refused), or a ``SessionPlan`` made
        already; start the ranks and load the pipeline on each. ``progress``: a loading bar on stderr (rank 0's)."""
        if isinstance(options, SessionPlan):
            session_plan = options
        else:
            session_plan = plan(options, height=height, width=width, frame_num=frame_num, guided=guided)
            for warning in session_plan.warnings:
                warnings.warn(warning)
            refusal = session_plan.refusal()
            if refusal is not None:
                raise refusal
        session = cls._start(session_plan, progress)
        # (with distilled, the LoRAs merged at load; the recipe is then every job's default)
        session.defaults = SamplingDefaults.recipe(session_plan.options.distilled, session_plan.planned.plan.model)
        return session

    @staticmethod
    def _start(session_plan: SessionPlan, progress: bool) -> "RunSession":
        options, planned, device, ckpt_dir = session_plan.options, session_plan.planned, session_plan.options.device, session_plan.ckpt_dir
        if launched():
            return RankSession(planned, ckpt_dir, device, progress)
        if session_plan.world > 1:
            # This process does not touch CUDA (its context would hold GPU memory all along): rank 0 plans for its
            # GPU's memory and the other ranks receive its plan.
            replan = None
            if device.startswith("cuda") and options.gpu_memory is None:
                replan = partial(plan_for, options, height=session_plan.height, width=session_plan.width, frame_num=session_plan.frame_num,
                                 device=device, world=session_plan.world, ckpt_dir=ckpt_dir, spawned=True, guided=session_plan.guided)  # fmt: skip
            return SpawnedSession(planned, ckpt_dir, device, replan, progress)
        from wan_i2v.pipeline import I2VPipeline  # (the models' stack: planning, and a dry run, go without it)

        plan_here = replace(planned.plan, device=torch.device(device))
        cap_gpu_memory(planned, plan_here.device)
        return LocalSession(planned, I2VPipeline.load(ckpt_dir, plan_here, progress=progress))

    def generate(self, image, prompt: str | None = None, negative_prompt: str | None = None, *, settings: GenerationSettings | None = None,
                 state_file=None, progress: bool = True, latents_file=None, video_file=None, cancel=None, on_step: Callable | None = None,
                 last_image=None, step_cache: float | None = None, **sampling):  # fmt: skip
        """Run one job: ``I2VPipeline.generate``'s arguments (``image`` a path, a PIL image or ``KnownFrames``, and ``last_image`` if
        given, a path or PIL image; ``settings``, else ``GenerationSettings.of`` the prompts and the ``sampling`` keywords, whose
        defaults are the distilled recipe in a session opened ``distilled``), plus ``latents_file``
        (the latents are saved there before decoding), ``video_file`` (the mp4 is written there as the
        frames are decoded; the result's video is then None), ``cancel`` (``is_set()``: stop before the
        next step, raising ``Cancelled``), ``on_step(StepInfo)`` after each step and ``step_cache``
        (this job's threshold for the step cache the session loaded; 0: off; None: the plan's)."""
        if settings is None:
            settings = GenerationSettings.of(prompt, negative_prompt, **{"defaults": self.defaults, **sampling})
        paths = (None if path is None else str(path) for path in (state_file, latents_file, video_file))
        state_file, latents_file, video_file = paths
        image = image if image is None or isinstance(image, KnownFrames) else load_image(image)  # (None: text-to-video, for a model that makes it)
        last = None if last_image is None else load_image(last_image, flag="last_image")
        return self._run(Job(image, settings, state_file, progress, latents_file, video_file, last, step_cache), cancel, on_step)

    def _run(self, job: Job, cancel, on_step):
        raise NotImplementedError

    @property
    def alive(self) -> bool:
        """The session can run jobs (a spawned session whose ranks died cannot)."""
        return True

    def keep_alive(self) -> None:
        """Call now and then while idle between jobs (a server does): ranks that wait longer than the
        collectives' timeout for the next job would end the session."""

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class LocalSession(RunSession):
    def __init__(self, planned: PlannedRun, pipe):
        super().__init__(planned)
        self.pipe = pipe

    def _run(self, job, cancel, on_step):
        return _run_job(self.pipe, job, cancel=cancel, on_step=on_step)


def _join_group(device: str) -> torch.device:
    """In a rank: join the process group on ``device`` (once); the device this rank runs on."""
    if _device_type(device) == "cpu" and not dist.is_initialized():  # CPU ranks on one machine split its cores rather than each taking them all
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    return init_distributed(_device_type(device))


def _rank_0_plans(planning: Callable, device: torch.device):
    """In a rank of the group: ``planning()`` on rank 0 alone, and its outcome on every rank: what
    it returned, or the one-line error it raised, raised on every rank alike (not a hang on the others)."""
    outcome = None
    if dist.get_rank() == 0:
        try:
            outcome = planning()
        except WanError as error:
            outcome = error
    outcome = agree(outcome, device)
    if isinstance(outcome, WanError):
        raise outcome
    return outcome


def _join_ranks(planned: PlannedRun, ckpt_dir: Path, device: str, replan=None, progress: bool = False):
    """In a rank: join the process group (planning under a launcher joined it already); with
    ``replan``, rank 0 plans again (for its GPU, which the process that started the ranks did not
    query) and every rank takes its plan, else ``planned``, which every rank has; build the groups
    and load the pipeline."""
    from wan_i2v.pipeline import I2VPipeline  # (the models' stack: planning, and a dry run, go without it)

    run_device = _join_group(device)
    if replan is not None:
        planned = _rank_0_plans(replan, run_device)
    cap_gpu_memory(planned, run_device)
    groups = ParallelGroups.build(planned.plan.dims, run_device)
    plan = replace(planned.plan, device=run_device)
    return planned, groups, I2VPipeline.load(ckpt_dir, plan, groups, progress=progress and groups.is_main)


class RankSession(RunSession):
    """Under a launcher: this process is one rank. Every rank calls ``generate``; rank 0's job runs."""

    def __init__(self, planned: PlannedRun, ckpt_dir: Path, device: str, progress: bool = False):
        planned, self.groups, self.pipe = _join_ranks(planned, ckpt_dir, device, progress=progress)
        self.ended_by_main = False  # a follower has seen rank 0 close
        super().__init__(planned)

    @property
    def is_main(self) -> bool:
        return self.groups.is_main

    def _run(self, job, cancel, on_step):
        job = self.groups.agree(job)
        return _run_job(self.pipe, job, cancel=cancel, on_step=on_step)

    def follow(self) -> None:
        """On a rank other than 0: run rank 0's jobs until rank 0 closes the session."""
        while (job := self.groups.agree(None)) is not None:
            if job == IDLE:
                continue
            try:
                _run_job(self.pipe, job)
            except (WanError, Cancelled):  # rank 0 has the same and reports it; the session goes on
                pass
        self.ended_by_main = True

    def keep_alive(self) -> None:
        if self.is_main:
            self.groups.agree(IDLE)

    def close(self) -> None:
        """Every rank calls it: rank 0's None ends the followers' loops, or meets the other ranks' own
        ``close`` (when every rank called ``generate``, as the CLI under torchrun does)."""
        if dist.is_initialized():
            if not self.ended_by_main:
                self.groups.agree(None)
            dist.destroy_process_group()


def _rank_main(planned: PlannedRun, ckpt_dir: str, device: str, replan, progress: bool, jobs, replies, acks, cancel) -> None:
    """A rank started by ``SpawnedSession``: load, then run rank 0's jobs until it receives None."""
    with warnings.catch_warnings():
        # Rank 0's warnings (a truncated prompt, skipped LoRA keys) go to the caller, which shows them
        # as its own; the other ranks would only repeat them.
        warnings.showwarning = lambda message, *args, **kwargs: replies.put(("warning", str(message))) if env_rank() == 0 else None
        planned, groups, pipe = _join_ranks(planned, Path(ckpt_dir), device, replan, progress)
        try:
            _serve_jobs(planned, groups, pipe, jobs, replies, acks, cancel)
        finally:
            dist.destroy_process_group()


def _serve_jobs(planned, groups, pipe, jobs, replies, acks, cancel) -> None:
    """Rank 0 takes each job from the queue and hands it to the other ranks, until it gets None.
    While idle it hands them ``IDLE`` now and then: a rank waiting longer than the collectives'
    timeout for the next job would end the session."""
    if groups.is_main:
        replies.put(("ready", planned))
    while True:
        if groups.is_main:
            try:
                job = jobs.get(timeout=IDLE_SECONDS)
            except queue.Empty:
                job = IDLE
        job = groups.agree(job if groups.is_main else None)
        if job is None:
            return
        if job == IDLE:
            continue
        on_step = None
        if groups.is_main:

            def on_step(step):
                # The caller's callback (which may cancel) has run before the next step starts:
                # a cancel from it stops the run at exactly that step, as in one process.
                replies.put(("step", step))
                acks.get()

        try:
            result = _run_job(pipe, job, cancel=cancel, on_step=on_step)
        except (WanError, Cancelled) as exc:  # the same on every rank (settings, cancel): the session goes on
            if groups.is_main:
                replies.put(("error", exc))
            continue
        if groups.is_main:
            replies.put(("done", result))


# How long rank 0 waits for a job before telling the other ranks it is idle (well under the collectives' timeout).
IDLE_SECONDS = 60
IDLE = "idle"


class SpawnedSession(RunSession):
    """N ranks started from this process; it hands them jobs and gets back events and results."""

    def __init__(self, planned: PlannedRun, ckpt_dir: Path, device: str, replan=None, progress: bool = False):
        super().__init__(planned)
        context = mp.get_context("spawn")
        self.jobs, self.replies, self.acks, self.cancel = context.Queue(), context.Queue(), context.Queue(), context.Event()
        self.failure: BaseException | None = None
        self.lock = threading.Lock()  # one job at a time on the queues
        args = (planned, str(ckpt_dir), device, replan, progress, self.jobs, self.replies, self.acks, self.cancel)

        def run_ranks():
            try:
                launch(_rank_main, args, planned.plan.dims.world)
            except BaseException as exc:  # a rank failed, or was interrupted: the session is over
                self.failure = exc
            self.replies.put(("closed", None))

        self.launcher = threading.Thread(target=run_ranks, name="wan-i2v-ranks", daemon=True)
        self.launcher.start()
        try:
            self.planned = self._reply("ready")  # the plan the ranks agreed on
        except BaseException:  # interrupted while the ranks load: they are stopped before this returns
            self.close()
            raise

    def _reply(self, expected: str, cancel=None, on_step=None):
        while True:
            try:
                kind, value = self.replies.get(timeout=0.1)
            except queue.Empty:
                kind = value = None
            if kind == "warning":
                warnings.warn(value)
            if kind == "step":
                try:
                    if on_step is not None:
                        on_step(value)
                except BaseException:  # the job cannot report any more: stop it, and wait for its end
                    self.cancel.set()
                    self.acks.put(True)
                    self._drain()
                    raise
                if cancel is not None and cancel.is_set():
                    self.cancel.set()  # before the word to go on: the job stops at the next step
                self.acks.put(True)
                continue
            if cancel is not None and cancel.is_set():
                self.cancel.set()
            if kind == "error":
                raise value
            if kind == "closed":
                self.launcher.join()
                raise self.failure or WanError("the ranks of the run have exited", "open a new session")
            if kind == expected:
                return value

    def _drain(self) -> None:
        """Read the replies of a job that is stopping until its end, so that none is taken for the next job's."""
        while self.launcher.is_alive():
            try:
                kind, _ = self.replies.get(timeout=0.1)
            except queue.Empty:
                continue
            if kind == "step":
                self.acks.put(True)
            elif kind in ("done", "error", "closed"):
                return

    def _run(self, job, cancel, on_step):
        for path in (job.latents_file, job.video_file, job.state_file):
            if path is not None:  # rank 0 alone writes them: an error there would leave the other ranks behind
                check_writable(Path(path))
        with self.lock:
            if not self.launcher.is_alive():
                raise self.failure or WanError("this session is closed", "open a new session")
            self.cancel.clear()
            self.jobs.put(job)
            return self._reply("done", cancel, on_step)

    @property
    def alive(self) -> bool:
        return self.launcher.is_alive()

    def close(self) -> None:
        """Stop the ranks: a job still running (the caller was interrupted) stops before its next
        step, its state saved, then every rank exits."""
        if self.launcher.is_alive():
            self.cancel.set()
            self.acks.put(True)  # rank 0 may wait for the caller's word on a step it reported
            self.jobs.put(None)
            self.launcher.join()
