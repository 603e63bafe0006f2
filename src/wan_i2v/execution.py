"""The execution plan: the user's options resolved into where every component lives and which
transforms apply to each expert, in one checked order (torchtitan's ``parallelize_*`` shape).

The pipeline loads by it, ``--dry-run`` prints it with its memory estimate and refusals, and the
benchmarks build their stacks with it, so the estimate, the run and a published figure describe
the same thing. A new transform (a LoRA merge, a cache) is one module in ``transforms/`` and one
row of ``EXPERT_TRANSFORMS``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from wan_i2v.errors import WanError, command_line, option
from wan_i2v.loading.converted import default_converted_dir
from wan_i2v.loading.lora import Loras
from wan_i2v.models.spec import DEFAULT_SPEC, ModelSpec
from wan_i2v.options import DTYPES, Offload, RunOptions, expert_loras
from wan_i2v.parallel.plan import (
    GiB,
    MemoryEstimate,
    ModelSizes,
    ParallelDims,
    Placement,
    estimate_memory,
    machine_needed,
    make_plan,
)
from wan_i2v.transforms.step_cache_config import StepCacheConfig


@dataclass(frozen=True)
class ExecutionPlan:
    """Everything that decides how a run executes, resolved: nothing here is "auto".

    ``device`` is the device type's run device (a rank's own GPU is set when its groups are built).
    ``loras`` are merged into each expert's weights as they load, before every transform.
    """

    device: torch.device
    dtype: torch.dtype
    dims: ParallelDims = ParallelDims()
    offload: Offload = Offload.NONE
    fp8: bool = False
    compile: bool = False
    attention: str = "sdpa"
    decode_dtype: torch.dtype = torch.float32
    encode_dtype: torch.dtype = torch.float32
    split_encode: bool = False  # the VAE encode in tiles over the ranks: faster, but no longer bit-equal to one GPU's
    batch_cfg: bool = False
    keep_text_encoder: bool = False
    stream_text_encoder: bool = False  # a visiting text encoder's blocks stream through the GPU (it does not fit whole)
    kept_blocks: int = 0  # with --offload blocks: the active expert's blocks that stay on the GPU (what it has room for)
    # ... and their file pages dropped from the page cache once there: the host's cache cannot hold a whole expert beside the run
    forget_kept_pages: bool = False
    decode_frame_by_frame: bool = False  # one GPU decodes one output frame at a time: the whole latent frame's do not fit
    loras: Loras = Loras()
    model: ModelSpec | str = DEFAULT_SPEC  # the model's spec (``models/spec.py``), which the pipeline loads
    # Where streamed experts' blocks are kept converted (``loading.converted``); None: they convert as they stream.
    converted_dir: Path | None = None
    step_cache: StepCacheConfig | None = None  # None or a threshold of 0: every forward runs every block

    @classmethod
    def for_device(cls, device, options: RunOptions = RunOptions(), **resolved) -> "ExecutionPlan":
        """The plan of ``options`` on this device, with the device's defaults for what they leave open:
        bf16 and compile on a GPU, fp32 and no compile on the CPU, the fastest exact attention kernel
        for the device, the experts on the GPU. ``resolved``: plan fields decided elsewhere (the
        parallel layout ``dims``, ``converted_dir``)."""
        from wan_i2v.kernels.attention import default_kernel

        device = torch.device(device)
        gpu = device.type == "cuda"
        model = options.model or DEFAULT_SPEC
        resolved.setdefault("converted_dir", default_converted_dir())
        return cls(
            device=device,
            dtype=torch_dtype(options.dtype, device),
            offload=Offload.parse(options.offload),
            fp8=options.fp8,
            compile=gpu if options.compile is None else options.compile,
            attention=options.attention or (default_kernel(device) if gpu and torch.cuda.is_available() else "cudnn" if gpu else "sdpa"),
            decode_dtype=torch_dtype(options.decode_dtype, device),
            encode_dtype=torch_dtype(options.encode_dtype, device),
            split_encode=options.split_encode,
            batch_cfg=options.batch_cfg,
            keep_text_encoder=options.keep_text_encoder,
            loras=Loras.of(expert_loras(options.loras, model), model),
            model=model,
            step_cache=options.step_cache,
            **resolved,
        )

    # -- where things live ------------------------------------------------------------------------

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    @property
    def fsdp(self) -> bool:
        return self.dims.fsdp

    @property
    def fsdp_offload(self) -> bool:
        """FSDP's shards in pinned host memory (on the CPU there is nothing to offload)."""
        return self.fsdp and self.offload is not Offload.NONE and self.on_gpu

    @property
    def streams_experts(self) -> bool:
        """The experts' blocks wait in the checkpoint's files and stream to the device as they run
        (one expert's at a time with ``--offload experts``, each block's with ``--offload blocks``)."""
        return self.offload is not Offload.NONE and not self.fsdp

    @property
    def shards_text_encoder(self) -> bool:
        return self.dims.shards_text_encoder(self.offload is not Offload.NONE)

    @property
    def text_encoder_visits(self) -> bool:
        """The text encoder waits in host memory and visits the GPU only to encode."""
        return not self.shards_text_encoder and self.on_gpu and (self.offload is not Offload.NONE or not self.keep_text_encoder)

    @property
    def text_encoder_device(self) -> torch.device:
        """Where the text encoder's weights are loaded."""
        host = self.text_encoder_visits or (self.offload is not Offload.NONE and not self.on_gpu)
        return torch.device("cpu") if host else self.device

    @property
    def placement(self) -> Placement:
        return Placement(self.fsdp, self.offload.flag)

    def describe(self) -> str:
        where = ("GPUs" if self.dims.world > 1 else "a GPU") if self.on_gpu else "the CPU"
        kept = f"{self.kept_blocks} blocks of the active expert kept on the GPU" + (" (their pages left out of the page cache)" if self.forget_kept_pages else "")
        extras = [kept] if self.kept_blocks else []
        extras += ["the text encoder's blocks streamed"] if self.stream_text_encoder and self.text_encoder_visits else []
        return "; ".join([self.dims.describe(self.on_gpu), self.placement.describe(self.dims, self.on_gpu, self.model), *extras, f"on {where}"])

    def describe_numerics(self) -> str:
        extras = [name for name, on in (("FP8 linear layers", self.fp8), ("compiled blocks", self.compile), ("batched guidance", self.batch_cfg),
                                        ("encode split over the ranks", self.split_encode and self.dims.world > 1)) if on]  # fmt: skip
        if self.step_cache is not None and self.step_cache.on:
            cache = self.step_cache
            extras.append(f"step cache (threshold {cache.threshold:g}, blocks {cache.first_blocks},{cache.last_blocks}, at most {cache.max_reuses} in a row)")
        encode = [] if self.encode_dtype == torch.float32 else [f"{_dtype_name(self.encode_dtype)} encode"]
        decode = f"{_dtype_name(self.decode_dtype)} decode" + (" frame by frame" if self.decode_frame_by_frame else "")
        return ", ".join([f"{_dtype_name(self.dtype)} weights", f"{self.attention} attention", *encode, decode, *extras])

    def identity(self) -> dict:
        """What in the plan changes the video's numbers: a saved state must match it to be resumed."""
        cache = {"step_cache": self.step_cache.as_dict()} if self.step_cache is not None and self.step_cache.on else {}
        return {"dtype": str(self.dtype), "fp8": self.fp8, "attention": self.attention, "device": self.device.type, **cache}

    # -- checks and estimates ------------------------------------------------------------------------

    def refusals(self) -> list[WanError]:
        """Each combination of this plan that a run refuses, as its one-line error (empty: it runs)."""
        return [WanError(message(), hint()) for refused, message, hint in INCOMPATIBLE if refused(self)]

    def check(self) -> "ExecutionPlan":
        refusals = self.refusals()
        if refusals:
            raise refusals[0]
        return self

    def estimate(self, sizes: ModelSizes, *, tokens: int, pixels: int) -> MemoryEstimate:
        return estimate_memory(
            self.dims, sizes, tokens=tokens, pixels=pixels, offload=self.offload.flag,
            decode_bytes=self.decode_dtype.itemsize, encode_bytes=self.encode_dtype.itemsize, keep_text_encoder=self.keep_text_encoder,
            stream_text_encoder=self.stream_text_encoder and self.text_encoder_visits, kept_blocks=self.kept_blocks,
            step_cache_bytes=self.step_cache_bytes, decode_frame_by_frame=self.decode_frame_by_frame, compiled=self.compile,
        )  # fmt: skip

    @property
    def step_cache_bytes(self) -> int:
        """The bytes of an element of the stream the step cache keeps (0: no cache), for the memory estimate."""
        return self.dtype.itemsize if self.step_cache is not None and self.step_cache.on else 0


def torch_dtype(name: str | None, device) -> torch.dtype:
    """The torch dtype of a precision's name (None: bf16 on a GPU, fp32 on the CPU)."""
    return getattr(torch, DTYPES[name or ("bf16" if torch.device(device).type == "cuda" else "fp32")])


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float16: "fp16"}.get(dtype, str(dtype))


# Combinations a run refuses: (refused(plan), message, what to do), the options spelled for the
# reader when the plan is checked (errors.option). --dry-run prints them too.
INCOMPATIBLE: tuple[tuple[Callable[[ExecutionPlan], bool], Callable[[], str], Callable[[], str]], ...] = (
    (lambda p: p.fsdp and p.offload is Offload.BLOCKS,
     lambda: f"{option('offload', 'blocks')} does not combine with {option('fsdp')}",
     lambda: "FSDP's own offload is " + ("--fsdp --offload" if command_line() else "fsdp=True with offload='experts'")),
    (lambda p: p.fsdp and p.fp8, lambda: f"{option('fp8')} does not combine with {option('fsdp')} yet", lambda: "drop one of them"),
    (lambda p: p.fsdp and p.dims.world == 1, lambda: f"{option('fsdp')} shards over several GPUs", lambda: f"give {option('gpus', 2)} or more, or leave out {option('fsdp')}"),
)  # fmt: skip


@dataclass(frozen=True)
class PlannedRun:
    """A plan for a video of a given shape: the plan, its per-GPU and host memory estimates, and whether they fit."""

    plan: ExecutionPlan
    estimate: MemoryEstimate
    fits: bool
    gpu_bytes: int | None  # the per-GPU memory planned for (None: no limit)
    host: MemoryEstimate | None = None  # the machine's host memory at each stage
    host_bytes: int | None = None  # the host memory planned for (None: no limit)
    needed: str = ""  # the smallest machine the plan fits, in words (when it does not fit this one)
    capped: bool = False  # gpu_bytes was given (--gpu-memory): the run's allocator is held to it

    def refusal(self) -> WanError | None:
        """The one-line error of a run that fits nowhere on this machine (None: it fits)."""
        if self.fits:
            return None
        have = []
        if self.gpu_bytes is not None and self.plan.on_gpu:
            have.append(f"{self.gpu_bytes / GiB:.0f} GiB per GPU")
        if self.host_bytes is not None:
            have.append(f"{self.host_bytes / GiB:.0f} GiB of host memory")
        memory_flags = f"{option('gpu_memory')}/{option('host_memory')}" if self.plan.on_gpu else option("host_memory")  # the CPU has no GPU memory to give
        return WanError(f"this video needs a machine with at least {self.needed}; planned for {' and '.join(have) or 'no limit'}",
                        f"use a smaller {option('size')}, fewer {option('frame_num')}" + (f", more {option('gpus')}" if self.plan.on_gpu else "")
                        + f", or give {memory_flags} if more is free")  # fmt: skip


def plan_run(
    base: ExecutionPlan,
    sizes: ModelSizes,
    *,
    gpus: int,
    tokens: int,
    pixels: int,
    gpu_bytes: int | None,
    host_bytes: int | None = None,
    frames: int = 81,
    ulysses: int | None = None,
    cfg_parallel: bool = False,
    fsdp: bool = False,
    offload: Offload | None = None,
    guided: bool = True,
    spawned: bool = False,
    capped: bool = False,
) -> PlannedRun:
    """``base`` with its parallel layout and placement decided: what the user forced (``ulysses``,
    ``cfg_parallel``, ``fsdp``, ``offload``; None: choose), the rest the fastest that fits in
    ``gpu_bytes`` per GPU and ``host_bytes`` of host memory; without guidance (``guided`` false:
    scale 1, one pass per step) every GPU goes to Ulysses. The refusals are checked by the caller
    (``--dry-run`` prints them)."""
    choice = make_plan(
        gpus, sizes, ulysses=ulysses, cfg_parallel=cfg_parallel, fsdp=fsdp, offload=None if offload is None else offload.flag,
        gpu_bytes=gpu_bytes, host_bytes=host_bytes, tokens=tokens, pixels=pixels, frames=frames, decode_bytes=base.decode_dtype.itemsize,
        encode_bytes=base.encode_dtype.itemsize, keep_text_encoder=base.keep_text_encoder, step_cache_bytes=base.step_cache_bytes, guided=guided,
        on_gpu=base.on_gpu, spawned=spawned, compiled=base.compile,
    )  # fmt: skip
    # Streamed blocks are read every step, the kept ones once an expert: where the page cache left
    # beside the run cannot hold all the run reads (the text encoder, every expert's blocks), the
    # kept blocks' pages give way to the streamed ones'.
    read = sizes.text_encoder + sizes.experts * sizes.blocks * (sizes.stored_block or sizes.block)
    forget_kept = choice.kept_blocks > 0 and host_bytes is not None and host_bytes - choice.host.total < read
    plan = replace(base, dims=choice.dims, offload=Offload.parse(choice.placement.offload), stream_text_encoder=choice.stream_text_encoder,
                   kept_blocks=choice.kept_blocks, decode_frame_by_frame=choice.decode_frame_by_frame, forget_kept_pages=forget_kept)  # fmt: skip
    return PlannedRun(plan, choice.estimate, choice.fits, gpu_bytes, choice.host, host_bytes, machine_needed(choice, base.on_gpu), capped)


# -- the transforms of an expert, in order -----------------------------------------------------------


@dataclass(frozen=True)
class Transform:
    """One step of ``apply_plan``. ``meta``: it may run before the weights exist (FSDP then shards
    on the meta device and each rank reads only its rows); ``after``: steps that must come first."""

    name: str
    applies: Callable[[ExecutionPlan, object], bool]
    apply: Callable[[nn.Module, ExecutionPlan, object], object]  # returns what the pipeline keeps of it, or None
    meta: bool = True
    after: tuple[str, ...] = ()


def _fp8(expert, plan, groups):
    from wan_i2v.transforms.fp8 import apply_fp8

    apply_fp8(expert)


def _fused_gelu(expert, plan, groups):
    from wan_i2v.transforms.fused_gelu import apply_fused_gelu

    apply_fused_gelu(expert)


def _attention(expert, plan, groups):
    from wan_i2v.models.attention import set_attention_kernel

    set_attention_kernel(expert, plan.attention)


def _fused_norms(expert, plan, groups):
    from wan_i2v.transforms.fused_norms import apply_fused_norms

    apply_fused_norms(expert)


def _ulysses(expert, plan, groups):
    from wan_i2v.parallel.ulysses import apply_ulysses

    apply_ulysses(expert, groups.ulysses)


def _compile(expert, plan, groups):
    from wan_i2v.transforms.compile import apply_compile

    apply_compile(expert)


def _step_cache(expert, plan, groups):
    from wan_i2v.transforms.step_cache import apply_step_cache

    return apply_step_cache(expert, plan.step_cache)


def _fsdp(expert, plan, groups):
    from wan_i2v.parallel.fsdp import apply_fsdp

    apply_fsdp(expert, expert.block_stack(), groups.mesh, offload=plan.fsdp_offload)


EXPERT_TRANSFORMS: tuple[Transform, ...] = (
    # Needs the weights (it quantizes them), so never with FSDP, which shards before they load.
    Transform("fp8", lambda plan, groups: plan.fp8, _fp8, meta=False),
    # FSDP gathers the parameters of the modules it finds, so module swaps come before it.
    Transform("fused GELU", lambda plan, groups: True, _fused_gelu, after=("fp8",)),
    Transform("attention kernel", lambda plan, groups: True, _attention),
    Transform("fused norms", lambda plan, groups: plan.on_gpu, _fused_norms),
    # torchtitan's order: the sequence split, then compile, then FSDP.
    Transform("ulysses", lambda plan, groups: groups is not None and groups.ulysses is not None, _ulysses, after=("attention kernel",)),
    Transform("compile", lambda plan, groups: plan.compile, _compile, after=("fused GELU", "fused norms", "ulysses")),
    Transform("fsdp", lambda plan, groups: plan.fsdp, _fsdp, after=("compile",)),
    # A hook on the block stack, run eagerly between the (compiled, sharded) blocks: it needs no weights,
    # and reads what Ulysses and FSDP set on the stack (how to sum over the sequence, whom to agree with) as it runs.
    Transform("step cache", lambda plan, groups: plan.step_cache is not None and plan.step_cache.on, _step_cache),
)


def check_order(transforms: tuple[Transform, ...]) -> None:
    """Each transform comes after every step it names in ``after``; with FSDP (which runs on the meta
    device) no step that needs the weights may come before it."""
    seen: set[str] = set()
    names = {t.name for t in transforms}
    for transform in transforms:
        late = [name for name in transform.after if name in names and name not in seen]
        if late:
            raise ValueError(f"transform {transform.name!r} must come after {', '.join(late)}")
        seen.add(transform.name)


check_order(EXPERT_TRANSFORMS)


def apply_plan(expert: nn.Module, plan: ExecutionPlan, groups=None, *, meta: bool = False) -> dict[str, object]:
    """Apply the plan's transforms to one expert, in ``EXPERT_TRANSFORMS``' order; returns the name
    of each applied, in order, with what it returned.

    ``meta``: the expert has no weights yet (FSDP shards it before it loads): only the steps that
    can run then are applied, and a step that needs the weights is an error. ``groups`` is the run's
    ``ParallelGroups`` (None on one GPU)."""
    applied = {}
    for transform in EXPERT_TRANSFORMS:
        if not transform.applies(plan, groups):
            continue
        if meta and not transform.meta:
            raise ValueError(f"{transform.name} needs the weights; it cannot run before they load (FSDP)")
        applied[transform.name] = transform.apply(expert, plan, groups)
    return applied
