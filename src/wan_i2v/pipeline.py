"""Image + prompt -> video in three stages, each callable on its own: ``prepare`` (image, text,
condition, noise), ``sample`` (the loop) and ``decode``. Where the models live and which transforms
they get is the execution plan's (``execution.py``); this module wires the stages and nothing else."""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.distributed as dist
from PIL import Image
from tqdm.auto import tqdm

from wan_i2v.config import GenerationSettings, SamplingDefaults
from wan_i2v.errors import WanError, first_line, option
from wan_i2v.execution import ExecutionPlan, Offload, apply_plan
from wan_i2v.extend import CONTEXT_FRAMES, ExtensionResult, extend_video, read_source, source_settings
from wan_i2v.options import RunOptions
from wan_i2v.kernels.attention import check_kernel
from wan_i2v.loading import checkpoint as ckpt
from wan_i2v.loading.checkpoint import load_strict, safetensors_source
from wan_i2v.loading.converted import converted_blocks
from wan_i2v.loading.staging import StagingRing
from wan_i2v.loading.lora import LoraFile, Loras, MergedLoras, adapted, read_lora, switch_loras
from wan_i2v.models.conditioning import Condition, KnownFrames
from wan_i2v.models.dit import DiT, keeps_fp32, pad_context
from wan_i2v.models.hooks import merge_states
from wan_i2v.models.spec import DEFAULT_SPEC, AreaFit, ModelSpec, spec_for, spec_of_checkpoint
from wan_i2v.models.text_encoder import TextEncoder
from wan_i2v.models.vae import WanVAE
from wan_i2v.sampling.guidance import ClassifierFreeGuidance, Conditioning
from wan_i2v.sampling.loop import Cancelled, Experts, LoopHook, LoopState, StepInfo, denoise
from wan_i2v.sampling.resume import StateWriter, load_loop_state, map_tensors, run_identity, state_to
from wan_i2v.sampling.schedulers import official_schedule
from wan_i2v.transforms.step_cache import skipped_forwards
from wan_i2v.transforms.streaming import BlockStream, ExpertSwap, HostCopy, StreamedExperts, load_outside_blocks
from wan_i2v.video import check_writable, image_sha256, image_to_tensor, load_image, mp4_writer

__all__ = ["Cancelled", "GenerationResult", "I2VPipeline", "LoopHook", "Prepared", "StepInfo"]

LOADING_BAR_DELAY_S = 2.0
# The tensors a step callback may ask for (diffusers' ``callback_on_step_end_tensor_inputs``).
CALLBACK_TENSOR_INPUTS = ("latents",)


@dataclass
class GenerationResult:
    video: torch.Tensor | None  # [3, F, H, W] float32 on CPU, in [-1, 1]; None on ranks other than 0 of a parallel run
    latents: torch.Tensor  # [16, (F-1)//4+1, H/8, W/8] float32 on CPU
    settings: GenerationSettings
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    stage_peaks_gb: dict[str, float] = field(default_factory=dict)  # peak GPU memory allocated in each stage; empty on CPU
    experts_used: list[str] = field(default_factory=list)  # the expert of each step run (after a resume: the rest)
    loras: list[dict] = field(default_factory=list)  # each LoRA merged in: expert, file, sha256, strength
    # With the step cache on: its setting and, per expert, the forwards it skipped of those run ("skipped": {expert: [skipped, total]})
    step_cache: dict | None = None
    given: dict = field(default_factory=dict)  # the frames given (``Prepared.given``): what conditions the video, each image's SHA-256
    # Weights streamed while denoising (an offload plan): GB copied up through the staging ring, the
    # readers' seconds reading them and waiting for free slots, the seconds the host waited for the reads,
    # the GPU's seconds waiting for their copies and computing the blocks, and the GPU allocator's
    # retries (each frees its cache: a device sync)
    streaming: dict | None = None

    @property
    def metadata(self) -> dict:
        """What the mp4 records: the settings, the frames given, and the LoRAs and the step cache when there are any."""
        return video_metadata(self.settings, self.loras, self.step_cache, self.given)

    @property
    def peak_memory_gb(self) -> float | None:
        """Peak GPU memory allocated over the run, None on CPU."""
        return max(self.stage_peaks_gb.values(), default=None)


def video_metadata(settings: GenerationSettings, loras: list[dict], step_cache: dict | None = None, given: dict | None = None) -> dict:
    """What a video's mp4 records: its settings, the frames given (``Prepared.given``), and the LoRAs and the step cache when there are any."""
    return {**settings.as_dict(), **(given or {}), **({"loras": loras} if loras else {}), **({"step_cache": step_cache} if step_cache else {})}


@dataclass
class Prepared:
    """What ``prepare`` makes and ``sample`` needs: the settings (seed drawn, agreed over the ranks),
    the conditioning on the run device, the initial noise, and where to resume from."""

    settings: GenerationSettings
    conditioning: Conditioning | None  # None when every step is saved (``sampled``): nothing is left to condition
    noise: torch.Tensor | None  # [16, F', H', W'] fp32 on the run device; None when ``sampled``
    resume: LoopState | None = None
    state_file: Path | None = None
    run: dict | None = None  # what a saved state must match (checkpoint, precision, images)
    # The frames given, as the mp4 records them: "conditioning" ("first frame", "first and last frame"),
    # and the SHA-256 of each image's RGB pixels ("image_sha256", "last_image_sha256"; ``video.image_sha256``)
    given: dict = field(default_factory=dict)

    @property
    def sampled(self) -> bool:
        """Every step is in the saved state (the run it belongs to stopped while decoding)."""
        return self.resume is not None and self.resume.step == self.settings.steps


class I2VPipeline:
    def __init__(
        self,
        text_encoder: TextEncoder,
        vae: WanVAE,
        experts: Experts,
        *,
        plan: ExecutionPlan,
        parallel=None,
        checkpoint: Path | None = None,
        ring: StagingRing | None = None,
        loras: MergedLoras = MergedLoras(),
        spec: ModelSpec | str = DEFAULT_SPEC,
    ):
        self.spec = spec_for(spec)
        self.conditioning = self.spec.conditioning()
        self.plan = plan
        self.checkpoint = checkpoint
        self.merged_loras = loras
        self.parallel = parallel  # a wan_i2v.parallel.ParallelGroups in a multi-rank run
        self.text_encoder = text_encoder
        self.vae = vae
        self.device = plan.device
        # One streamer for the pipeline's life: it hooks the experts' blocks once.
        self.experts = experts
        # Set when the text encoder waits in host memory and visits the GPU only to encode (through ``ring``).
        if plan.text_encoder_visits:
            self.text_encoder_visits = HostCopy(text_encoder.model, ring, blocks_of=text_encoder.model.encoder.block if plan.stream_text_encoder else None)
        else:
            self.text_encoder_visits = None

    @property
    def loras(self) -> list[dict]:
        """A record of each LoRA merged in: expert, file, sha256, strength."""
        return self.merged_loras.records()

    @property
    def identity(self) -> dict:
        """What, besides the generation settings and the image, decides this pipeline's videos."""
        return run_identity(self.checkpoint, self.plan.identity(), self.loras)

    @classmethod
    def from_pretrained(
        cls, ckpt_dir: str | Path, options: RunOptions | None = None, *, parallel=None, plan: ExecutionPlan | None = None,
        spec: ModelSpec | str | None = None, **fields,
    ) -> "I2VPipeline":
        """Load the official checkpoint directory as ``options`` say (a ``wan_i2v.options.RunOptions``,
        or its fields as keywords: ``from_pretrained(ckpt_dir, device="cuda", dtype=torch.bfloat16, fp8=True)``;
        the device is cuda unless given). Their meaning is the CLI's flags' (``RunOptions`` has each one's
        help): ``dtype`` (default: bf16 on a GPU, fp32 on the CPU, as the CLI), ``offload`` ("experts"
        or True: only the active expert on the GPU; "blocks": every expert's blocks streamed from the
        checkpoint), ``keep_text_encoder``, ``attention``, ``batch_cfg``, ``compile`` (default: on
        for a GPU), ``fp8``, ``decode_dtype``, ``encode_dtype``, ``split_encode`` and ``loras``
        (``{expert name: [(path, strength), ...]}``, the names of the spec's experts, merged into each
        expert as it loads; ``set_loras`` changes them later without reloading the pipeline).
        ``parallel`` (a ``wan_i2v.parallel.ParallelGroups``, in a process group) spreads the run over
        its ranks; every rank of the group calls this and ``generate`` with the same arguments
        (``wan_i2v.session.RunSession`` does that for you).
        ``plan``: an ``ExecutionPlan`` decided already (``RunSession`` plans one to fit the GPUs);
        it replaces ``options``.
        ``spec``: the model (a ``ModelSpec`` or a registered name, ``models/spec.py``); by default
        ``options.model``, else the checkpoint's (its config.json says it)."""
        if plan is None:
            options = options if options is not None else RunOptions(**{"device": "cuda", **fields})
            options = replace(options, model=spec_for(spec or options.model or spec_of_checkpoint(Path(ckpt_dir))))
            device = parallel.device if parallel is not None else options.device or "cuda"
            plan = ExecutionPlan.for_device(device, options, **({"dims": parallel.dims} if parallel is not None else {}))
        return cls.load(ckpt_dir, plan, parallel)

    @classmethod
    def load(cls, ckpt_dir: str | Path, plan: ExecutionPlan, parallel=None, progress: bool = False, spec: ModelSpec | str | None = None) -> "I2VPipeline":
        """Load the checkpoint as ``plan`` says: each expert built, transformed by ``apply_plan`` (on
        the meta device first with FSDP, so each rank reads only its rows) and filled, or, when its
        blocks stream (``--offload``), left in the checkpoint's files with only its embeddings and
        head on the device. ``progress``: a bar over the parts (minutes for the real model). ``spec``: the
        model, whose experts, builders and files are read (default: the plan's)."""
        spec = spec_for(plan.model if spec is None else spec)
        root = ckpt.check_checkpoint_dir(Path(ckpt_dir), spec)
        if plan.on_gpu and not torch.cuda.is_available():
            raise WanError("CUDA was asked for but no GPU is visible", f"use {option('device', 'cpu')}, or check the driver")
        check_kernel(plan.attention, plan.device)
        plan.check()
        device = plan.device
        experts, sources, merged = {}, {}, {}
        # Shown once loading takes a while (the real model: minutes), so a quick load, or one that
        # fails at once, leaves no bar before its one-line error.
        bar = tqdm(total=len(spec.experts) + 2, desc="loading", unit="part", disable=not progress, delay=LOADING_BAR_DELAY_S)
        ring = None
        builders = spec.builders
        for expert_spec in spec.experts:
            name, subdir = expert_spec.name, expert_spec.folder
            merged[name] = []
            specs = plan.loras.for_expert(name)
            adapt = _merging(specs, merged[name], plan.device) if specs else None
            if plan.fsdp:  # sharded before the weights exist: each rank reads only its rows
                shard = lambda expert: apply_plan(expert, plan, parallel, meta=True)  # noqa: E731
                expert = builders.load_dit(root / subdir, device=device, dtype=plan.dtype, before_weights=shard, adapt=adapt)
            else:
                expert, source = builders.build_dit(root / subdir, dtype=plan.dtype, adapt=adapt)
                if ring is None:
                    ring = staging_ring(expert, source, plan)
                if plan.streams_experts:  # the blocks stay in the files; they stream in as they run
                    apply_plan(expert, plan, parallel)
                    load_outside_blocks(expert, source, ring, plan.dtype, keeps_fp32)
                    sources[name] = source if plan.converted_dir is None else converted_blocks(
                        expert.block_stack(), source, ring, folder=plan.converted_dir, dtype=plan.dtype, keep_fp32=keeps_fp32, what=str(expert_spec), progress=progress,
                        identity={"dtype": plan.dtype, "fp8": plan.fp8, "device": plan.device.type, "loras": [[lora.sha256, lora.spec.strength] for lora in merged[name]]},
                    )  # fmt: skip
                else:
                    load_strict(expert, source, device=device, dtype=plan.dtype, keep_fp32=keeps_fp32, ring=ring)
                    apply_plan(expert, plan, parallel)
            experts[name] = expert
            bar.update()
        first = experts[spec.experts[0].name]
        if any(expert.config != first.config for expert in experts.values()):
            from wan_i2v.cache.layout import loading_hint

            count = "two" if len(experts) == 2 else len(experts)
            raise WanError(f"the {count} experts in {root} have different configs", "the checkpoint is mixed up; " + loading_hint(root))
        if plan.streams_experts:
            experts = (
                ExpertSwap(experts, sources, ring, spec.experts, dtype=plan.dtype, keep_fp32=keeps_fp32)
                if plan.offload is Offload.EXPERTS
                else StreamedExperts(experts, sources, ring, spec.experts, dtype=plan.dtype, keep_fp32=keeps_fp32, kept=plan.kept_blocks,
                                     forget_kept=plan.forget_kept_pages)
            )
        else:
            experts = Experts(experts, spec.experts)

        def shard_text_encoder(model) -> None:
            from wan_i2v.parallel.fsdp import apply_fsdp

            apply_fsdp(model, model.encoder.block, parallel.mesh, offload=plan.fsdp_offload)

        sharded = plan.shards_text_encoder
        text_encoder = builders.load_text_encoder(
            root / spec.files.text_encoder, root / spec.files.tokenizer_dir, text_len=first.config.text_len, device=plan.text_encoder_device,
            dtype=plan.dtype, before_weights=shard_text_encoder if sharded else None, run_device=device if sharded else None,
            ring=ring if plan.text_encoder_device.type == "cuda" else None,
        )  # fmt: skip
        bar.update()
        vae = load_vae_for(root / spec.files.vae, device, plan.decode_dtype, plan.encode_dtype, spec)
        bar.update()
        bar.close()
        return cls(text_encoder, vae, experts, plan=plan, parallel=parallel, checkpoint=root, ring=ring, loras=MergedLoras(merged), spec=spec)

    def set_loras(self, loras) -> None:
        """Change the LoRAs (as ``from_pretrained``'s ``loras``; None: none) without reloading: each
        parameter the old or the new LoRAs change is read again from the checkpoint and the new
        deltas merged, in place, wherever it lives (GPU, host memory, this rank's shard). In a
        parallel run every rank calls it with the same LoRAs."""
        loras = Loras.of(loras, self.spec)
        bases = {expert.name: safetensors_source(self.checkpoint / expert.folder) for expert in self.spec.experts}
        self.merged_loras = switch_loras(self.experts, bases, self.merged_loras, loras, self.device)
        self.plan = replace(self.plan, loras=loras)

    @property
    def config(self):
        """The experts' DiT config (one for all: ``load`` checks that they agree)."""
        return self.experts.models[self.spec.experts[0].name].config

    @property
    def text_len(self) -> int:
        return self.config.text_len

    def generate(
        self,
        image: Image.Image | str | Path | KnownFrames | None,
        prompt: str | None = None,
        negative_prompt: str | None = None,
        max_area: int | None = None,
        frame_num: int | None = None,
        steps: int | None = None,
        shift: float | None = None,
        guide_scale: float | tuple[float, float] | None = None,
        seed: int | None = None,
        solver: str | None = None,
        progress: bool = True,
        before_decode: Callable[[torch.Tensor, GenerationSettings], None] | None = None,
        state_file: str | Path | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] | tuple[str, ...] = ("latents",),
        cancel=None,
        hooks: list[LoopHook] | tuple[LoopHook, ...] = (),
        video_file: str | Path | None = None,
        settings: GenerationSettings | None = None,
        last_image: Image.Image | str | Path | None = None,
        height: int | None = None,
        width: int | None = None,
        fps: int | None = None,
    ) -> GenerationResult:
        """The official Wan2.2 I2V sampling: ``prepare``, ``sample`` and ``decode`` in a row.

        ``image`` is the video's first frame; ``last_image``, if given, its last (resized and cropped
        to the video's size: ``known_frames``).

        The settings are ``settings`` (a ``GenerationSettings``, as a front end builds it), else
        ``GenerationSettings.of`` the keywords from ``prompt`` to ``solver`` and ``height``, ``width``
        (an exact size, instead of ``max_area``'s rule) and ``fps`` (the mp4's), the model card's
        defaults for those left out: ``guide_scale`` is one value per expert, in the spec's
        ``guide_scale_order``, or one value for all; ``seed=None`` draws a random seed, reported in
        ``result.settings.seed``. ``before_decode(latents, settings)`` sees the latents (CPU, fp32)
        before decoding, e.g. to save them.

        ``state_file`` makes the run resumable: the denoising state is saved there after each step,
        and a run started again with the same image and settings (a random seed is taken from the
        file) goes on from the last saved step; a state with every step (a run stopped while decoding)
        goes straight to the decode, the encoders not run. In a run of several ranks, rank 0 reads and
        writes it and hands what it read to the others.

        ``callback_on_step_end(pipe, step_index, timestep, callback_kwargs) -> dict`` is called after
        each step, as in diffusers: ``callback_kwargs`` holds the tensors named in
        ``callback_on_step_end_tensor_inputs`` ("latents"); a returned "latents" replaces them.
        ``cancel`` (anything with ``is_set()``, e.g. a ``threading.Event``) stops the run before its
        next step once set: ``Cancelled`` is raised, and with ``state_file`` the same call resumes.
        ``hooks`` are further ``LoopHook``s.

        ``video_file``: the mp4 is written there as the frames are decoded, so that it is complete
        moments after the decode ends (rather than encoded after it: about a second at 720P); it appears
        whole, or not at all (checked writable before the run starts). The same bytes as ``write_mp4`` of the result's video at the settings' fps with its metadata.

        In a parallel run the seed is rank 0's, progress and ``before_decode`` are rank 0's only, and
        only rank 0's result has the video (None elsewhere); a cancel on any rank stops every rank."""
        writing = video_file is not None and self.is_main
        if writing:
            check_writable(Path(video_file))
        timings: dict[str, float] = {}
        peaks: dict[str, float] = {}
        if settings is None:
            settings = GenerationSettings.of(prompt, negative_prompt, defaults=SamplingDefaults.official(self.spec), max_area=max_area, frame_num=frame_num,
                                             steps=steps, shift=shift, guide_scale=guide_scale, seed=seed, solver=solver, height=height, width=width,
                                             fps=fps)  # fmt: skip
        prepared = self.prepare(image, settings, last_image=last_image, state_file=state_file, progress=progress, timings=timings, peaks=peaks)
        log = ExpertLog()
        all_hooks = [*hooks, log]
        if callback_on_step_end is not None:
            all_hooks.append(StepEndCallback(self, callback_on_step_end, callback_on_step_end_tensor_inputs))
        before = self._streaming_counters()
        with _timed(timings, peaks, "denoising", self.device):
            latents = self.sample(prepared, hooks=all_hooks, cancel=cancel, progress=progress)
        streaming = None if before is None else {key: value - before[key] for key, value in self._streaming_counters().items()}
        latents_cpu = latents.float().cpu()
        if before_decode is not None and self.is_main:
            before_decode(latents_cpu, prepared.settings)
        step_cache = self._step_cache_record()
        metadata = video_metadata(prepared.settings, self.loras, step_cache, prepared.given)
        with mp4_writer(video_file, fps=prepared.settings.fps, metadata=metadata) if writing else nullcontext() as write:
            with _timed(timings, peaks, "decoding", self.device):
                video = self.decode(latents, progress and self.is_main, on_frames=write)
            decoded = time.perf_counter()
        if writing:  # what the encode adds after the decode: its last frames, and the file's sync to disk
            timings["mp4 after the decode"] = time.perf_counter() - decoded
        return GenerationResult(video, latents_cpu, prepared.settings, timings, stage_peaks_gb=peaks, experts_used=log.experts, loras=self.loras,
                                step_cache=step_cache, given=prepared.given, streaming=streaming)  # fmt: skip

    def _streaming_counters(self) -> dict | None:
        """The staging ring's counters where the experts' blocks stream through it; None otherwise."""
        if not isinstance(self.experts, (StreamedExperts, ExpertSwap)):
            return None
        ring = next(iter(self.experts.streams.values())).ring
        if self.device.type == "cuda":
            retries = torch.cuda.memory_stats(self.device).get("num_alloc_retries", 0)
            torch.cuda.synchronize(self.device)  # every span so far has passed
        counters = {"gb": ring.copied_bytes / 1e9, "read_s": ring.read_s, "slot_wait_s": ring.slot_wait_s, "waited_s": ring.waited_s}
        if self.device.type == "cuda":  # the GPU's own timeline
            streams = self.experts.streams.values()
            counters |= {"device_waited_s": sum(stream.copy_waits.seconds() for stream in streams),
                         "computing_s": sum(stream.computing.seconds() for stream in streams), "allocator_retries": retries}  # fmt: skip
        return counters

    def extend(
        self,
        video: str | Path | torch.Tensor,
        prompt: str | None = None,
        negative_prompt: str | None = None,
        *,
        context_frames: int = CONTEXT_FRAMES,
        extend_times: int = 1,
        frame_num: int | None = None,
        steps: int | None = None,
        shift: float | None = None,
        guide_scale: float | tuple[float, float] | None = None,
        seed: int | None = None,
        solver: str | None = None,
        settings: GenerationSettings | None = None,
        state_dir: str | Path | None = None,
        progress: bool = True,
    ) -> ExtensionResult:
        """Continue ``video`` (an mp4's path, or a [3, F, H, W] tensor in [-1, 1]) with a clip of
        ``frame_num`` frames conditioned on its last ``context_frames`` frames (4m+1), at its size;
        ``extend_times`` clips, each conditioned on the end of the one before. The result's video is
        ``video`` then the new frames (each clip's first ``context_frames`` reproduce its context and are
        left out); its metadata, the chain: the source's SHA-256 and each clip's settings.

        The settings are ``settings``, else ``GenerationSettings.of`` the keywords, as in ``generate``;
        each clip after the first takes the next seed (or a drawn one). ``state_dir``: each clip's
        denoising state is kept there (``generate``'s ``state_file``), so the same call resumes an
        interrupted extension."""
        source = read_source(video, self.spec)
        if settings is None:
            settings = source_settings(source, self.spec, prompt, negative_prompt, frame_num=frame_num, steps=steps, shift=shift,
                                       guide_scale=guide_scale, seed=seed, solver=solver)  # fmt: skip

        def clip(known: KnownFrames, settings: GenerationSettings, state_file: Path | None) -> GenerationResult:
            return self.generate(known, settings=settings, state_file=state_file, progress=progress)

        return extend_video(clip, source, settings, context_frames=context_frames, times=extend_times, spec=self.spec, state_dir=state_dir)

    def _step_cache_record(self) -> dict | None:
        """The step cache's setting and the forwards it skipped per expert in the video just sampled
        (None without a cache). Under CFG parallel each rank ran one guidance branch: their counts are added."""
        config = self.plan.step_cache
        if config is None or not config.on:
            return None
        skipped = skipped_forwards(self.experts.models)
        if self.parallel is not None and self.parallel.cfg is not None and skipped:
            counts = torch.tensor(list(skipped.values()), device=self.device)
            dist.all_reduce(counts, group=self.parallel.cfg)
            skipped = dict(zip(skipped, counts.tolist()))
        return {**config.as_dict(), "skipped": {expert: list(count) for expert, count in skipped.items()}}

    @property
    def is_main(self) -> bool:
        """This process writes files and shows progress (rank 0 of a parallel run)."""
        return self.parallel is None or self.parallel.is_main

    def prepare(
        self, image: Image.Image | str | Path | KnownFrames | None, settings: GenerationSettings, *, last_image: Image.Image | str | Path | None = None,
        state_file: str | Path | None = None, progress: bool = False, timings: dict | None = None, peaks: dict | None = None,
    ) -> Prepared:  # fmt: skip
        """Stage 1: the text and image encodings of ``settings``' video (``image`` its first frame,
        ``last_image`` if given its last, each fitted to the settings' size; or the ``KnownFrames`` of
        an extension's context, taken at their own size; None: text-to-video, for a model whose
        conditioning makes videos without an image), the noise, and with ``state_file`` the saved
        state to resume from (whose seed is taken when ``settings``' was drawn). In a parallel run the
        settings and known frames are rank 0's (every rank must draw the same noise)."""
        timings = {} if timings is None else timings
        peaks = {} if peaks is None else peaks
        chosen = settings if self.parallel is None else self.parallel.agree(settings)
        if image is not None:  # its aspect rules: the size's text-to-video shape is no setting of this video
            chosen = replace(chosen, text_to_video_shape=None)
        if image is None and (self.conditioning.needs_image or last_image is not None):
            raise WanError(f"{self.spec.name} makes a video from an image" if last_image is None else "a last image needs a first",
                           f"give one with {option('image')}")  # fmt: skip
        if isinstance(image, KnownFrames):  # frames at the video's size (an extension's context)
            known = image if self.parallel is None else self.parallel.agree(image)
            hashes, pixels = {"context_frames": known.sha256()}, None
        else:
            images = {} if image is None else {"image": load_image(image)}
            if last_image is not None:
                images["last_image"] = load_image(last_image, flag="last_image")
            hashes = {name: image_sha256(picture) for name, picture in images.items()}
            pixels = [image_to_tensor(picture) for picture in images.values()]
        resume = run = None
        if state_file is not None:
            state_file = Path(state_file)
            run = run_identity(self.checkpoint, self.plan.identity(), self.loras, hashes)
            saved = load_loop_state(state_file, chosen, run, seed_given=not chosen.seed_drawn) if self.is_main else None
            if self.parallel is not None:  # rank 0's file, read once, on every rank
                saved = self.parallel.agree(saved)
            if saved is not None:
                chosen, resume = saved[0], state_to(saved[1], self.device)
        if pixels is not None:
            known = self.known_frames(pixels[0] if pixels else None, chosen, last=pixels[1] if len(pixels) > 1 else None)
        described = "text only" if known is None else known.describe(chosen.frame_num)
        given = {"conditioning": described, **{f"{name}_sha256": digest for name, digest in hashes.items()}}
        sampled = Prepared(chosen, None, None, resume, state_file, run, given)
        if sampled.sampled:  # the latents are done: the encoders need not run again (12.8 s at 720P)
            return sampled
        with _timed(timings, peaks, "text encoding", self.device):
            context, context_null = self.encode_text([chosen.prompt, chosen.negative_prompt], progress and self.is_main)
        with _timed(timings, peaks, "image encoding", self.device):
            condition = self.encode_frames(known, chosen.frame_num, progress and self.is_main)
        noise = self.initial_noise(self.spec.latent_shape(chosen.frame_num, *self.video_size(known, chosen))[1:], chosen.seed)
        channels = None if condition.channels is None else condition.channels[None]
        conditioning = Conditioning(channels, context[None], context_null[None], condition.fixed)
        return Prepared(chosen, conditioning, noise, resume, state_file, run, given)

    def sample(self, prepared: Prepared, *, hooks=(), cancel=None, progress: bool = False) -> torch.Tensor:
        """Stage 2: the denoising loop from ``prepared`` -> [16, F', H', W'] latents on the run device.
        ``hooks`` are ``LoopHook``s; ``cancel`` as in ``generate``."""
        settings, resume = prepared.settings, prepared.resume
        if resume is not None and progress and self.is_main:
            tqdm.write(f"resuming from step {resume.step} of {settings.steps} ({prepared.state_file})", file=sys.stderr)
        if prepared.sampled:
            return resume.latent[0]
        bar = ProgressBar(settings.steps, resume.step if resume else 0, disable=not (progress and self.is_main))
        with StateWriter() as writer:
            try:
                latents = denoise(
                    prepared.noise[None],
                    experts=self.experts,
                    guidance=self._guidance(prepared.conditioning),
                    schedule=official_schedule(settings.solver, settings.steps, settings.shift),
                    solver=settings.solver,
                    guide_scale=self.spec.guide_scales(settings.guide_scale),
                    hooks=[*hooks, bar],
                    resume=resume,
                    on_state=None if prepared.state_file is None else lambda state: self._save_state(prepared, state, writer),
                    stop_requested=self._stop_requested(cancel),
                    fixed=prepared.conditioning.fixed,
                )[0]
            except BaseException:
                try:  # the last state on disk (a resume goes on from it), behind the run's own error
                    writer.finish()
                except Exception as failure:
                    warnings.warn(f"the last step's state was not written ({first_line(failure)}): a resume goes on from the state written before it")
                raise
            finally:
                bar.close()
            self._agreed(writer.finish)
        return latents

    def _save_state(self, prepared: Prepared, state: LoopState, writer: StateWriter) -> None:
        """Rank 0 starts the state's write after a step (the last one's failure raised on every rank;
        see ``StateWriter`` for the large states it does not wait for). Each rank holds its own block
        hooks' states (its tokens'): with any, every rank's go into the file, merged (each rank reads
        back its own), gathered only for a state rank 0 will write."""
        if self.parallel is not None and any(state.block_hooks.values()):
            world = dist.get_world_size(self.parallel.group)
            if self.parallel.any(self.is_main and writer.skips(state, prepared.settings, ranks=world)):  # each rank holds about its share
                return
            every_rank = [None] * world
            dist.all_gather_object(every_rank, map_tensors(state.block_hooks, torch.Tensor.cpu), group=self.parallel.group)
            state = replace(state, block_hooks=merge_states(every_rank))
        self._agreed(lambda: writer.save(prepared.state_file, state, prepared.settings, prepared.run) if self.is_main else None)

    def _agreed(self, write: Callable[[], None]) -> None:
        """Run rank 0's part of a state write; where it fails, every rank stops (rank 0 with its error),
        rather than the others going on into a collective rank 0 never joins."""
        failure = None
        try:
            write()
        except Exception as exc:
            failure = exc
        if self.parallel is not None and self.parallel.any(failure is not None) and failure is None:
            raise WanError("rank 0 could not write the run's state", "its error says why; the same command resumes from the last state written")
        if failure is not None:
            raise failure

    def _stop_requested(self, cancel) -> Callable[[], bool] | None:
        """Asked before each step. In a parallel run every rank asks (one tiny all-reduce per step),
        so a cancel seen by any rank stops them all at the same step."""
        if self.parallel is None:
            return None if cancel is None else cancel.is_set
        return lambda: self.parallel.any(cancel is not None and cancel.is_set())

    def encode_text(self, prompts: list[str], progress: bool = False) -> list[torch.Tensor]:
        """Each prompt -> [text_len, text_dim] on the run device, zero-padded after its real tokens."""
        if self.text_encoder_visits is not None:
            self.text_encoder_visits.to_device()
        try:
            features = [
                self.text_encoder.encode([prompt])[0]
                for prompt in tqdm(prompts, desc="text encoding", unit="prompt", disable=not progress)
            ]
        finally:
            if self.text_encoder_visits is not None:
                self.text_encoder_visits.to_host()
        return [pad_context(f, self.text_len).to(self.device) for f in features]

    def video_size(self, known: KnownFrames | torch.Tensor | None, settings: GenerationSettings) -> tuple[int, int]:
        """(height, width) of the video: the exact size asked for, that of ``known`` frames (already at
        the video's size), else fitted by the spec to the [3, h, w] first image (None: the aspect of the
        W*H size asked for, else the spec's text-to-video shape) within the settings' area."""
        if isinstance(known, KnownFrames):
            return tuple(known.frames.shape[2:])
        return settings.video_size(*(() if known is None else known.shape[1:]), spec=self.spec)

    def known_frames(self, first: torch.Tensor | None, settings: GenerationSettings, *, last: torch.Tensor | None = None) -> KnownFrames | None:
        """The first frame, and the last if given ([3, h, w] images in [-1, 1]; no first: text-to-video),
        at the video's size. Each is fitted as the spec fits the first frame (the official code's resize)
        where that gives it the video's size; an image of another aspect ratio (a last frame of another
        shape, any image at an exact ``--height``/``--width``) is scaled to cover the size and
        center-cropped, rather than stretched."""
        if first is None:
            return None
        height, width = self.video_size(first, settings)

        def sized(image: torch.Tensor) -> torch.Tensor:
            if settings.height is None and self.spec.video_size(image.shape[1], image.shape[2], settings.max_area) == (height, width):
                return self.spec.fit.resize(image, height, width)
            return cover_and_crop(image, height, width)

        if last is None:
            return KnownFrames.first(sized(first))
        return KnownFrames.first_and_last(sized(first), sized(last), settings.frame_num)

    def encode_frames(self, known: KnownFrames | None, frame_num: int, progress: bool = False) -> Condition:
        """The ``Condition`` the spec's strategy makes of the ``known`` frames at the video's size (None:
        text-to-video) (Wan2.2-I2V-A14B's: channels [20, F', H/8, W/8], a mask of the known frames, then
        the VAE latents of the video with them in their places and black frames elsewhere;
        Wan2.2-TI2V-5B's: the first frame's latent as the fixed first latent frame)."""
        bar = tqdm(total=self.spec.latent_frames(frame_num), desc="image encoding", unit="latent frame", disable=not progress)
        advance = _advancing(bar)

        def encode(video: torch.Tensor) -> torch.Tensor:
            if self.parallel is not None and self.plan.split_encode:  # each rank encodes a tile of the frames
                from wan_i2v.parallel.vae import encode_tiled

                return encode_tiled(self.vae, video[None].to(self.device), self.parallel.group, advance)[0].float()
            return self.vae.encode(video[None].to(self.device), progress=advance)[0].float()

        try:
            with torch.no_grad():
                return self.conditioning.condition(known, frame_num, self.spec.vae_stride[0], encode)
        finally:
            bar.close()

    def initial_noise(self, latent_shape, seed: int) -> torch.Tensor:
        """The official noise: one randn of [the spec's latent channels, F', H', W'] from a generator on the run device."""
        generator = torch.Generator(device=self.device).manual_seed(seed)
        channels = self.spec.latent_channels
        return torch.randn(channels, *latent_shape, dtype=torch.float32, generator=generator, device=self.device)

    def decode(self, latents: torch.Tensor, progress: bool = False, on_frames: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor | None:
        """[16, f, h, w] latents -> [3, F, H, W] video (in a parallel run: split over the ranks, on
        rank 0); ``on_frames`` as ``decode_latents``'."""
        group = self.parallel.group if self.parallel is not None else None
        return decode_latents(self.vae, latents, self.device, progress, group, on_frames, frame_by_frame=self.plan.decode_frame_by_frame or None)

    def _guidance(self, conditioning: Conditioning) -> ClassifierFreeGuidance:
        if self.parallel is not None and self.parallel.cfg is not None:  # this rank's half of the pair
            from wan_i2v.parallel.cfg import ParallelGuidance

            return ParallelGuidance(conditioning, self.parallel.cfg, self.parallel.cfg_index)
        return ClassifierFreeGuidance(conditioning, batched=self.plan.batch_cfg)


def cover_and_crop(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[3, h, w] -> [3, height, width]: resized as the official code resizes the first frame (``AreaFit``)
    to the smallest size that covers ``height`` x ``width`` with the image's aspect ratio, then its center cut out."""
    scale = max(height / image.shape[1], width / image.shape[2])
    covering = max(height, round(image.shape[1] * scale)), max(width, round(image.shape[2] * scale))
    top, left = (covering[0] - height) // 2, (covering[1] - width) // 2
    return AreaFit().resize(image, *covering)[:, top : top + height, left : left + width]


# Slots of the staging ring: one block is read while the one before is copied up and the one
# before that computes.
STAGING_DEPTH = 3


def staging_ring(expert: DiT, source, plan: ExecutionPlan) -> StagingRing:
    """The ring every host-to-device weight copy of the run goes through, its slots one block each.
    On the CPU too: the weights are then fresh, aligned tensors whether streamed or not (the CPU's
    matmul kernels round differently for a tensor that starts at a file offset), so every plan
    gives the same video there as on a GPU."""
    return StagingRing(BlockStream.slot_bytes(expert.block_stack(), source), STAGING_DEPTH, plan.device)


def _merging(specs, files: list[LoraFile], device: torch.device):
    """``load_dit``'s ``adapt``: read the LoRA files against the checkpoint (into ``files``) and
    merge them as the weights are read."""

    def adapt(source):
        files.extend(read_lora(spec, source) for spec in specs)
        return adapted(source, files, device)

    return adapt


class ProgressBar(LoopHook):
    """The denoising progress bar: the step, its timestep and expert."""

    def __init__(self, total: int, initial: int, disable: bool):
        self.bar = tqdm(total=total, desc="denoising", unit="step", disable=disable, initial=initial)

    def on_step_end(self, step: StepInfo, latent: torch.Tensor) -> None:
        self.bar.set_postfix(t=step.timestep, expert=step.expert)
        self.bar.update()

    def close(self) -> None:
        self.bar.close()


class ExpertLog(LoopHook):
    """The expert of each step run (``GenerationResult.experts_used``)."""

    def __init__(self):
        self.experts: list[str] = []

    def on_step_begin(self, step: StepInfo) -> None:
        self.experts.append(step.expert)


class StepEndCallback(LoopHook):
    """diffusers' ``callback_on_step_end(pipe, step_index, timestep, callback_kwargs) -> dict``."""

    def __init__(self, pipe: I2VPipeline, callback: Callable, tensor_inputs):
        unknown = [name for name in tensor_inputs if name not in CALLBACK_TENSOR_INPUTS]
        if unknown:
            raise WanError(f"callback_on_step_end_tensor_inputs names {', '.join(unknown)}", f"choose from {', '.join(CALLBACK_TENSOR_INPUTS)}")
        self.pipe, self.callback, self.tensor_inputs = pipe, callback, tuple(tensor_inputs)

    def on_step_end(self, step: StepInfo, latent: torch.Tensor) -> torch.Tensor | None:
        kwargs = {"latents": latent} if "latents" in self.tensor_inputs else {}
        returned = self.callback(self.pipe, step.index, step.timestep, kwargs) or {}
        return returned.get("latents")


def load_vae_for(path: Path, device: torch.device, decode_dtype: torch.dtype = torch.float32, encode_dtype: torch.dtype = torch.float32,
                 spec: ModelSpec | str = DEFAULT_SPEC) -> WanVAE:  # fmt: skip
    """``spec``'s VAE in fp32, as the official code runs it, but for a decode in ``decode_dtype`` and an
    encode in ``encode_dtype``; on a GPU in channels-last memory, which cuDNN runs without layout
    conversions (less memory, faster)."""
    vae = spec_for(spec).builders.load_vae(path, device=device, dtype=torch.float32).decode_in(decode_dtype).encode_in(encode_dtype)
    return vae.to_channels_last() if torch.device(device).type == "cuda" else vae


def decode_latents(
    vae: WanVAE, latents: torch.Tensor, device: torch.device, progress: bool = False, group=None,
    on_frames: Callable[[torch.Tensor], None] | None = None, frame_by_frame: bool | None = None,
) -> torch.Tensor | None:  # fmt: skip
    """[16, F', H', W'] latents -> [3, F, H, W] float32 video on CPU in [-1, 1]. With a process
    ``group``, the decode is split over its ranks and only its rank 0 gets the video (None elsewhere).
    ``on_frames(frames)`` is handed the video in order, in runs of [3, n, H, W] frames, each as soon
    as it is decoded (on a ``group``'s rank 0); it must not modify them. ``frame_by_frame`` as
    ``WanVAE.decode``'s (None: where the GPU has no room for whole frames)."""
    inputs = latents[None].to(device)  # the decoder casts them to its dtype after de-normalizing in fp32
    if frame_by_frame is None:
        frame_by_frame = no_room_for_whole_frames(vae, inputs)
    bar = tqdm(total=latents.shape[1], desc="decoding", unit="latent frame", disable=not progress)
    advance = _advancing(bar)

    try:
        if group is not None:
            from wan_i2v.parallel.vae import decode_tiled

            video = decode_tiled(vae, inputs, group, advance, on_frames)
        else:
            # Frames go to host memory as they come: the video (0.9 GB at 720P) never sits on the GPU.
            video = torch.empty(vae.video_shape(inputs.shape), dtype=torch.float32)
            with torch.no_grad():
                progress_of = advance if on_frames is None else _handing_on(advance, vae, inputs.shape, video, on_frames)
                vae.decode(inputs, progress=progress_of, frame_by_frame=frame_by_frame, out=video)
    finally:
        bar.close()
    return None if video is None else video[0]


def no_room_for_whole_frames(vae: WanVAE, latents: torch.Tensor) -> bool:
    """Whether ``vae`` must decode the [B, z_dim, f, h, w] ``latents`` frame by frame: on a GPU
    whose memory left (within the run's cap) cannot hold a decode of whole frames."""
    return latents.device.type == "cuda" and free_gpu_bytes(latents.device) < vae.whole_decode_bytes(latents.shape)


def free_gpu_bytes(device: torch.device) -> int:
    """What the allocator can still hand out on ``device``: the GPU's free memory and the allocator's
    unused reserve, within the per-process cap where one is set (``set_per_process_memory_fraction``,
    as ``--gpu-memory`` does; the GPU's free memory does not see it). Torch before 2.6 cannot tell the
    cap (no ``get_per_process_memory_fraction``): there only the GPU's free memory counts."""
    free, total = torch.cuda.mem_get_info(device)
    allocated = torch.cuda.memory_allocated(device)
    free += torch.cuda.memory_reserved(device) - allocated
    get_fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    if get_fraction is not None:
        free = min(free, int(get_fraction(device) * total) - allocated)
    return free


def _handing_on(advance, vae: WanVAE, latent_shape, video: torch.Tensor, on_frames) -> Callable[[int, int], None]:
    """The decode's ``progress(done, total)``: ``advance``, then the frames that the ``done`` latent
    frames decoded to and ``on_frames`` has not had yet (the decode has written them into ``video``)."""
    handed = 0

    def progress(done: int, total: int) -> None:
        nonlocal handed
        advance(done, total)
        ready = vae.video_shape((*latent_shape[:2], done, *latent_shape[3:]))[2]
        on_frames(video[0, :, handed:ready])
        handed = ready

    return progress


def _advancing(bar: tqdm) -> Callable[[int, int], None]:
    """A ``progress(done, total)`` callback that moves ``bar`` to ``done``."""
    return lambda done, total: bar.update(done - bar.n)


@contextmanager
def _timed(timings: dict[str, float], peaks: dict[str, float], stage: str, device: torch.device):
    """Time a stage into ``timings`` and, on a GPU, its peak allocated memory (GiB) into ``peaks``."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    yield
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peaks[stage] = torch.cuda.max_memory_allocated(device) / 2**30
    timings[stage] = time.perf_counter() - start
