"""Image + prompt -> video: preprocessing, text and image encoding, sampling, decoding. Nothing else."""

from __future__ import annotations

import hashlib
import random
import sys
import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from wan_i2v import checkpoint as ckpt
from wan_i2v.config import (
    BOUNDARY_TIMESTEP,
    DEFAULT_NEGATIVE_PROMPT,
    PRESETS,
    VAE_STRIDE,
    GenerationSettings,
    video_size,
)
from wan_i2v.errors import WanError
from wan_i2v.models.attention import check_kernel, default_kernel, set_attention_kernel
from wan_i2v.models.dit import DiT, load_dit, pad_context
from wan_i2v.models.text_encoder import TextEncoder
from wan_i2v.models.vae import WanVAE, load_vae
from wan_i2v.block_offload import BlockOffload
from wan_i2v.compile import apply_compile
from wan_i2v.fused_gelu import apply_fused_gelu
from wan_i2v.fused_norms import apply_fused_norms
from wan_i2v.offload import OFFLOAD_MODES, ExpertSwap, HostCopy
from wan_i2v.parallel.fsdp import apply_fsdp
from wan_i2v.parallel.ulysses import apply_ulysses
from wan_i2v.quantize import apply_fp8
from wan_i2v.sampling.loop import ClassifierFreeGuidance, Conditioning, Experts, LoopState, denoise
from wan_i2v.sampling.schedulers import official_schedule
from wan_i2v.video import image_to_tensor, load_image, write_atomically

STATE_FORMAT = "wan-i2v-loop-state/1"


@dataclass
class GenerationResult:
    video: torch.Tensor | None  # [3, F, H, W] float32 on CPU, in [-1, 1]; None on ranks other than 0 of a parallel run
    latents: torch.Tensor  # [16, (F-1)//4+1, H/8, W/8] float32 on CPU
    settings: GenerationSettings
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    stage_peaks_gb: dict[str, float] = field(default_factory=dict)  # peak GPU memory allocated in each stage; empty on CPU
    experts_used: list[str] = field(default_factory=list)  # the expert of each step

    @property
    def peak_memory_gb(self) -> float | None:
        """Peak GPU memory allocated over the run, None on CPU."""
        return max(self.stage_peaks_gb.values(), default=None)


class I2VPipeline:
    def __init__(
        self,
        text_encoder: TextEncoder,
        vae: WanVAE,
        high_noise: DiT,
        low_noise: DiT,
        *,
        device: torch.device,
        offload: bool = False,
        batch_cfg: bool = False,
    ):
        self.parallel = None  # a wan_i2v.parallel.ParallelGroups once parallelized
        self.text_encoder = text_encoder
        self.vae = vae
        self.device = torch.device(device)
        # One swapper for the pipeline's life: it hooks the experts' blocks once.
        self.experts = (
            ExpertSwap(high_noise, low_noise, BOUNDARY_TIMESTEP, self.device)
            if offload
            else Experts(high_noise, low_noise, BOUNDARY_TIMESTEP)
        )
        self.batch_cfg = batch_cfg
        # Set when the text encoder waits in host memory and visits the GPU only to encode.
        self.text_encoder_visits: HostCopy | None = None
        # What, besides the generation settings, decides the video: a saved state must match it.
        self.identity: dict = {}

    @classmethod
    def from_pretrained(
        cls,
        ckpt_dir: str | Path,
        device: str | torch.device = "cuda",
        dtype: torch.dtype = torch.bfloat16,
        *,
        offload: bool | str = False,
        attention: str | None = None,
        batch_cfg: bool = False,
        parallel=None,
        compile: bool | None = None,
        fp8: bool = False,
        keep_text_encoder: bool = False,
        decode_dtype: torch.dtype = torch.float32,
    ) -> "I2VPipeline":
        """Load the official checkpoint directory.

        ``offload``: ``"experts"`` (or True) keeps only the active expert on the GPU, the official
        single-GPU mode for 80 GB cards; ``"blocks"`` streams every expert's blocks from pinned host
        memory, for 24-48 GB cards. On a GPU the text encoder waits in host memory and visits the GPU
        to encode, unless ``keep_text_encoder`` (it is 11 GB; a server with room keeps it).
        ``attention`` names a kernel (default: the fastest exact one for the device). ``batch_cfg``
        runs both guidance branches as one batch. ``compile`` (default: on for a GPU) compiles each
        transformer block. ``fp8`` runs the blocks' linear layers in FP8 (faster, less exact).
        ``decode_dtype``: the VAE decode's precision, fp32 as the official code (bf16: about twice as
        fast in half the memory, ~1e-2 from fp32).
        ``parallel`` (a ``wan_i2v.parallel.ParallelGroups``, in a process group) spreads the run over
        its ranks; every rank of the group calls this and ``generate`` with the same arguments.
        """
        root = Path(ckpt_dir)
        if not root.is_dir():
            raise WanError(f"checkpoint directory not found: {root}", ckpt.STATUS_HINT)
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise WanError("CUDA was asked for but no GPU is visible", "use --device cpu, or check the driver")
        kernel = attention or default_kernel(device)
        check_kernel(kernel, device)
        offload = "experts" if offload is True else (offload or None)
        if offload not in (None, *OFFLOAD_MODES):
            raise WanError(f"unknown offload mode {offload!r}", f"choose one of {', '.join(OFFLOAD_MODES)}")
        fsdp = parallel is not None and parallel.dims.fsdp
        if offload == "blocks" and fsdp:
            raise WanError("--offload blocks does not combine with --fsdp", "FSDP's own offload is --fsdp --offload")
        if fp8 and fsdp:
            raise WanError("--fp8 does not combine with --fsdp yet", "drop one of them")
        # FSDP's shards live in pinned host memory with --offload (on the CPU there is nothing to offload).
        fsdp_offload = fsdp and bool(offload) and device.type == "cuda"
        host = torch.device("cpu")
        sharded_text = parallel is not None and parallel.dims.shards_text_encoder(bool(offload))
        text_visits = not sharded_text and device.type == "cuda" and (bool(offload) or not keep_text_encoder)
        text_host_or_device = host if text_visits or (offload and device.type != "cuda") else device
        compiled = compile if compile is not None else device.type == "cuda"

        def transform(expert: DiT) -> None:
            """Every transform that restructures an expert, in this order (torchtitan's: the
            sequence split, then compile, then FSDP). With FSDP it runs on the meta device."""
            apply_fused_gelu(expert)  # before FSDP, which gathers the parameters of the modules it finds
            set_attention_kernel(expert, kernel)
            if device.type == "cuda":
                apply_fused_norms(expert)
            if parallel is not None and parallel.ulysses is not None:
                apply_ulysses(expert, parallel.ulysses)
            if compiled:
                apply_compile(expert)
            if fsdp:
                apply_fsdp(expert, expert.blocks, parallel.mesh, offload=fsdp_offload)

        experts = []
        for subdir in (ckpt.HIGH_NOISE_DIR, ckpt.LOW_NOISE_DIR):
            if fsdp:  # sharded before the weights exist: each rank reads only its rows
                expert = load_dit(root / subdir, device=device, dtype=dtype, before_weights=transform)
            else:
                expert = load_dit(root / subdir, device=host if offload else device, dtype=dtype)
                if fp8:
                    apply_fp8(expert)  # before the fused GELU, which leaves FP8 FFNs as they are
                transform(expert)
                if offload == "blocks":
                    BlockOffload(expert, device)
            experts.append(expert)
        high, low = experts
        if high.config != low.config:
            raise WanError(f"the two experts in {root} have different configs", "the checkpoint is mixed up; " + ckpt.STATUS_HINT)

        def shard_text_encoder(model) -> None:
            apply_fsdp(model, model.encoder.block, parallel.mesh, offload=fsdp_offload)

        text_encoder = TextEncoder.load(
            root / ckpt.T5_FILE, root / ckpt.TOKENIZER_DIR, text_len=high.config.text_len, device=text_host_or_device, dtype=dtype,
            before_weights=shard_text_encoder if sharded_text else None, run_device=device if sharded_text else None,
        )  # fmt: skip
        vae = load_vae_for(root / ckpt.VAE_FILE, device, decode_dtype)
        # With FSDP, its own CPU offload replaces the expert swap.
        pipe = cls(text_encoder, vae, high, low, device=device, offload=offload == "experts" and not fsdp, batch_cfg=batch_cfg)
        if text_visits:
            pipe.text_encoder_visits = HostCopy(text_encoder.model, device)
        pipe.identity = {"checkpoint": str(root.resolve()), "dtype": str(dtype), "fp8": fp8, "attention": kernel, "device": device.type}
        pipe.parallel = parallel
        return pipe

    @property
    def high_noise(self) -> DiT:
        return self.experts.models["high"]

    @property
    def low_noise(self) -> DiT:
        return self.experts.models["low"]

    @property
    def text_len(self) -> int:
        return self.high_noise.config.text_len

    def generate(
        self,
        image: Image.Image | str | Path,
        prompt: str,
        negative_prompt: str | None = None,
        max_area: int = PRESETS["720P"].max_area,
        frame_num: int = 81,
        steps: int = 40,
        shift: float = 5.0,
        guide_scale: float | tuple[float, float] = (3.5, 3.5),
        seed: int | None = None,
        solver: str = "unipc",
        progress: bool = True,
        before_decode: Callable[[torch.Tensor, GenerationSettings], None] | None = None,
        state_file: str | Path | None = None,
    ) -> GenerationResult:
        """The official Wan2.2 I2V sampling. ``guide_scale`` is (low-noise, high-noise) or one value for both;
        ``seed=None`` draws a random seed, reported in ``result.settings.seed``. ``before_decode(latents,
        settings)`` sees the latents (CPU, fp32) before decoding, e.g. to save them.

        ``state_file`` makes the run resumable: the denoising state is saved there after each step,
        and a run started again with the same image and settings (a random seed is taken from the
        file) goes on from the last saved step. In a run of several ranks, rank 0 reads and writes it
        and hands what it read to the others.

        In a parallel run the seed is rank 0's, progress and ``before_decode`` are rank 0's only, and
        only rank 0's result has the video (None elsewhere)."""
        if isinstance(guide_scale, (int, float)):
            guide_scale = (float(guide_scale), float(guide_scale))
        settings = GenerationSettings(
            prompt=prompt,
            negative_prompt=DEFAULT_NEGATIVE_PROMPT if negative_prompt is None else negative_prompt,
            max_area=max_area,
            frame_num=frame_num,
            steps=steps,
            shift=shift,
            guide_scale=tuple(guide_scale),
            seed=random.randint(0, sys.maxsize) if seed is None else seed,
            solver=solver,
        )
        main = self.parallel is None or self.parallel.is_main
        if self.parallel is not None:  # every rank must draw the same noise
            settings = self.parallel.agree(settings)
        progress = progress and main
        pixels = image_to_tensor(load_image(image))
        resumable = state_file is not None
        run = {**self.identity, "image": hashlib.sha256(pixels.numpy().tobytes()).hexdigest()} if resumable else None
        saved = load_loop_state(state_file, settings, run, seed_given=seed is not None) if resumable and main else None
        if resumable and self.parallel is not None:  # rank 0's file, read once, on every rank
            saved = self.parallel.agree(saved)
        resume = None
        if saved is not None:
            settings, state = saved
            resume = LoopState(state.step, state.latent.to(self.device), _map_tensors(state.solver, lambda t: t.to(self.device)))
        timings: dict[str, float] = {}
        peaks: dict[str, float] = {}

        with _timed(timings, peaks, "text encoding", self.device):
            context, context_null = self.encode_text([settings.prompt, settings.negative_prompt], progress)
        with _timed(timings, peaks, "image encoding", self.device):
            condition = self.encode_image(pixels, settings.max_area, settings.frame_num)

        noise = self.initial_noise(condition.shape[1:], settings.seed)
        conditioning = Conditioning(condition[None], context[None], context_null[None])
        experts_used: list[str] = []
        bar = tqdm(total=settings.steps, desc="denoising", unit="step", disable=not progress, initial=resume.step if resume else 0)
        if resume is not None and progress:
            tqdm.write(f"resuming from step {resume.step} of {settings.steps} ({state_file})", file=sys.stderr)

        def on_step(index, total, t, expert, latent):
            experts_used.append(expert)
            bar.set_postfix(t=t, expert=expert)
            bar.update()

        with _timed(timings, peaks, "denoising", self.device):
            latents = denoise(
                noise[None],
                experts=self.experts,
                guidance=self._guidance(conditioning),
                schedule=official_schedule(settings.solver, settings.steps, settings.shift),
                solver=settings.solver,
                guide_scale=settings.guide_scale,
                on_step=on_step,
                resume=resume,
                on_state=(lambda state: save_loop_state(state_file, state, settings, run)) if resumable and main else None,
            )[0]
        bar.close()
        latents_cpu = latents.float().cpu()
        if before_decode is not None and main:
            before_decode(latents_cpu, settings)
        with _timed(timings, peaks, "decoding", self.device):
            video = self.decode(latents, progress)
        return GenerationResult(video, latents_cpu, settings, timings, stage_peaks_gb=peaks, experts_used=experts_used)

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

    def encode_image(self, pixels: torch.Tensor, max_area: int, frame_num: int) -> torch.Tensor:
        """[3, h, w] image in [-1, 1] -> the [20, F', H/8, W/8] condition: first-frame mask, then the
        VAE latents of the resized image followed by black frames."""
        height, width = video_size(pixels.shape[1], pixels.shape[2], max_area)
        # Resized on the CPU in fp32, bicubic without antialiasing, as the official code does.
        first = F.interpolate(pixels[None], size=(height, width), mode="bicubic")[0]
        video = torch.cat([first[:, None], torch.zeros(3, frame_num - 1, height, width)], dim=1)
        vae_dtype = next(self.vae.parameters()).dtype
        with torch.no_grad():
            latents = self.vae.encode(video[None].to(self.device, vae_dtype))[0].float()
        mask = torch.zeros(VAE_STRIDE[0], *latents.shape[1:], device=self.device)
        mask[:, 0] = 1
        return torch.cat([mask, latents])

    def initial_noise(self, latent_shape, seed: int) -> torch.Tensor:
        """The official noise: one randn of [16, F', H', W'] from a generator on the run device."""
        generator = torch.Generator(device=self.device).manual_seed(seed)
        channels = self.high_noise.config.out_dim
        return torch.randn(channels, *latent_shape, dtype=torch.float32, generator=generator, device=self.device)

    def decode(self, latents: torch.Tensor, progress: bool = False) -> torch.Tensor | None:
        """[16, f, h, w] latents -> [3, F, H, W] video (in a parallel run: split over the ranks, on rank 0)."""
        group = self.parallel.group if self.parallel is not None else None
        return decode_latents(self.vae, latents, self.device, progress, group)

    def _guidance(self, conditioning: Conditioning) -> ClassifierFreeGuidance:
        if self.parallel is not None and self.parallel.cfg is not None:  # this rank's half of the pair
            from wan_i2v.parallel.cfg import ParallelGuidance

            return ParallelGuidance(conditioning, self.parallel.cfg, self.parallel.cfg_index)
        return ClassifierFreeGuidance(conditioning, batched=self.batch_cfg)


def _map_tensors(state: dict, fn) -> dict:
    """The solver state with ``fn`` applied to its tensors (alone or in lists)."""

    def apply(value):
        if isinstance(value, torch.Tensor):
            return fn(value)
        return [apply(v) for v in value] if isinstance(value, list) else value

    return {key: apply(value) for key, value in state.items()}


def save_loop_state(path, state: LoopState, settings: GenerationSettings, run: dict) -> None:
    """The denoising state after a step, written atomically (a killed write leaves the previous one).
    ``run`` identifies the checkpoint, precision and input image the state belongs to."""
    record = {"format": STATE_FORMAT, "settings": settings.as_dict(), "run": run,
              "step": state.step, "latent": state.latent.cpu(), "solver": _map_tensors(state.solver, torch.Tensor.cpu)}
    write_atomically(Path(path), lambda tmp: torch.save(record, tmp))


def load_loop_state(path, settings: GenerationSettings, run: dict, *, seed_given: bool):
    """(settings, LoopState) to resume from ``path``, or None when there is nothing to resume.

    A state saved for another image, checkpoint, precision or other settings is ignored (and
    overwritten by the run); without an explicit seed, the saved run's seed is taken.
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        warnings.warn(f"ignoring unreadable state file {path}; starting over")
        return None
    if not isinstance(record, dict) or record.get("format") != STATE_FORMAT or record.get("run") != run:
        return None
    try:
        saved = GenerationSettings(**{**record["settings"], "guide_scale": tuple(record["settings"]["guide_scale"])})
    except (TypeError, WanError):
        return None
    wanted = settings if seed_given else replace(settings, seed=saved.seed)
    if saved != wanted:
        return None
    return saved, LoopState(record["step"], record["latent"], record["solver"])


def load_vae_for(path: Path, device: torch.device, decode_dtype: torch.dtype = torch.float32) -> WanVAE:
    """The VAE in fp32, as the official code runs it, but for a decode in ``decode_dtype``; on a GPU
    in channels-last memory, which cuDNN runs without layout conversions (less memory, faster)."""
    vae = load_vae(path, device=device, dtype=torch.float32).decode_in(decode_dtype)
    return vae.to_channels_last() if torch.device(device).type == "cuda" else vae


def decode_latents(
    vae: WanVAE, latents: torch.Tensor, device: torch.device, progress: bool = False, group=None
) -> torch.Tensor | None:
    """[16, F', H', W'] latents -> [3, F, H, W] float32 video on CPU in [-1, 1]. With a process
    ``group``, the decode is split over its ranks and only its rank 0 gets the video (None elsewhere)."""
    inputs = latents[None].to(device, next(vae.parameters()).dtype)
    bar = tqdm(total=latents.shape[1], desc="decoding", unit="latent frame", disable=not progress)

    def advance(done, total):
        bar.update(done - bar.n)

    try:
        if group is not None:
            from wan_i2v.parallel.vae import decode_tiled

            video = decode_tiled(vae, inputs, group, advance)
        else:
            # Frames go to host memory as they come: the video (0.9 GB at 720P) never sits on the GPU.
            video = torch.empty(vae.video_shape(inputs.shape), dtype=torch.float32)
            with torch.no_grad():
                vae.decode(inputs, progress=advance, out=video)
    finally:
        bar.close()
    return None if video is None else video[0]


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
