"""The parallel plan (cfg x ulysses, FSDP or not) and the per-GPU memory estimate it is chosen by.

Pure data and arithmetic: nothing here touches ``torch.distributed``, so the plan can be
chosen, explained (``--dry-run``) and rejected before any process is started.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from itertools import product

from wan_i2v.errors import WanError, command_line, counted, option
from wan_i2v.models.spec import DEFAULT_SPEC, SAFETENSORS_FILE, T5_CONFIG_FILE, ModelSpec, spec_for

GiB = 2**30


def fsdp_needs_ranks() -> WanError:
    return WanError(f"{option('fsdp')} shards over several GPUs", f"give {option('gpus', 2)} or more, or leave out {option('fsdp')}")


@dataclass(frozen=True)
class ParallelDims:
    """How N = cfg x ulysses processes share one video (the torchtitan ``ParallelDims`` shape).

    ``cfg``: 1, or 2 to run the conditional and unconditional passes on two halves of the ranks.
    ``ulysses``: the sequence-parallel degree inside each half; it must divide the attention heads.
    ``fsdp``: shard every expert over all N ranks (FSDP2, one unit per block). The text encoder is
    sharded in every multi-rank run (it runs once, so that is nearly free), unless ``--offload``
    without FSDP keeps it in host memory.
    Rank r is cfg half ``r // ulysses`` and sequence shard ``r % ulysses``: a Ulysses group is
    made of consecutive ranks, so it stays inside one node, where its all-to-all traffic is.
    """

    cfg: int = 1
    ulysses: int = 1
    fsdp: bool = False

    @property
    def world(self) -> int:
        return self.cfg * self.ulysses

    def shards_text_encoder(self, offload: bool) -> bool:
        """The text encoder runs once per video, so sharding it costs one gather per block once and
        frees (N-1)/N of its 11 GB on every GPU; only with ``--offload`` and unsharded experts does it
        stay whole, in host memory, as on one GPU."""
        return self.world > 1 and (self.fsdp or not offload)

    def validate(self, world: int, num_heads: int) -> "ParallelDims":
        if self.cfg not in (1, 2):
            raise WanError(f"CFG parallel degree {self.cfg}", f"it is 1 or 2 ({option('cfg_parallel')})")
        if self.ulysses < 1 or num_heads % self.ulysses:
            raise WanError(
                f"{option('ulysses', self.ulysses)} does not divide the model's {num_heads} attention heads",
                f"choose one of {', '.join(map(str, divisors(num_heads)))}",
            )
        if self.fsdp and world == 1:
            raise fsdp_needs_ranks()
        if self.world != world:
            raise WanError(
                f"the plan cfg {self.cfg} x ulysses {self.ulysses} uses {counted(self.world, 'GPU')}, not {world}",
                f"with {counted(world, 'GPU')} use {' or '.join(describe_choices(world, num_heads)) or 'another number of GPUs'}",
            )
        return self

    def describe(self, on_gpu: bool = True) -> str:
        """The ranks: GPUs, or processes on the CPU."""
        parts = [counted(self.world, "GPU") if on_gpu else f"{self.world} process{'es' if self.world > 1 else ''}"]
        if self.world > 1:
            parts.append("CFG parallel 2" if self.cfg == 2 else "no CFG parallel")
            parts.append(f"Ulysses {self.ulysses}")
        return ", ".join(parts)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_layouts(world: int, num_heads: int, guided: bool = True) -> list[tuple[int, int]]:
    """(cfg, ulysses) pairs for ``world`` ranks, CFG parallel first; without guidance (scale 1: one
    pass per step) none with CFG parallel, whose second half would have nothing to run."""
    return [(cfg, world // cfg) for cfg in ((2, 1) if guided else (1,)) if world % cfg == 0 and num_heads % (world // cfg) == 0]


def describe_choices(world: int, num_heads: int) -> list[str]:
    separator = " " if command_line() else ", "
    return [option("ulysses", u) + (separator + (option("cfg_parallel") if command_line() else "cfg_parallel=True") if cfg == 2 else "")
            for cfg, u in candidate_layouts(world, num_heads)]  # fmt: skip


def valid_gpu_counts(num_heads: int, up_to: int = 16) -> list[int]:
    return [n for n in range(1, up_to + 1) if candidate_layouts(n, num_heads)]


@dataclass(frozen=True)
class ModelSizes:
    """Bytes of each model in the run dtype, and the shapes the activations scale with."""

    expert: int  # one DiT expert
    block: int  # one transformer block of it
    expert_root: int  # its weights outside the blocks (embeddings, head), gathered for a whole forward under FSDP
    text_encoder: int
    text_block: int  # one umT5 block
    text_embedding: int  # umT5's token embedding (in FSDP's root unit, gathered while it encodes)
    vae: int  # fp32, as it is kept
    dim: int
    ffn_dim: int
    num_heads: int
    vae_dim: int  # channels of the VAE's full-resolution stages
    vae_decode_units: tuple[float, float] = (11.0, 8.5)  # its decode's activations, whole chunks and frame by frame (its config's)
    stored_block: int = 0  # one block as the checkpoint stores it (fp32 or bf16): a staging slot
    blocks: int = 40  # blocks of an expert
    experts: int = 2  # the model's experts (its spec's), each of the sizes above
    timestep_per_frame: bool = False  # the DiT may take a timestep per latent frame (its spec's conditioning), so a modulation per token


# Transient memory of each stage, in units measured on H100/H200 (docs/benchmarks.md), per GPU:
# the DiT's activations in fp32 copies of its token stream (x tokens x dim x 4 bytes); the VAE's in
# full-resolution activations of 4 frames (x 4 x vae_dim x height x width x bytes per element; the
# decode's units are its VAE's, ``ModelSizes.vae_decode_units``).
DIT_STREAMS = 5.0  # one forward, compiled, fused norms: 7.2 GiB at 720P
EAGER_EXTRA_STREAMS = 1.4  # without torch.compile (--no-compile): 7.7 against 5.8 GiB of activations at 720P (bench/dit_forward.py, plan-eager)
ULYSSES_STREAMS = 6.0  # the same on 1/u of the tokens, with the all-to-all's buffers
GATHER_STREAMS = 2.0  # the whole sequence gathered for the output head (Ulysses)
VAE_ENCODE_UNITS = 10.0  # the first frame and 80 black ones, fp32, every rank encodes
TEXT_ACTIVATIONS = 2**30  # umT5 over two prompts of 512 tokens
STEP_CACHE_COPIES = 2  # the stream copies the step cache keeps per guidance branch (transforms/step_cache.py)
# With a timestep per latent frame the blocks' modulation is per token, [tokens, 6, dim] fp32 of this
# rank's tokens (72 KB a token for TI2V-5B: 1.9 GiB on one GPU at 720P x 121 frames): the DiT's, held
# for the whole forward, each block's sum of it and its own modulation, and the previous block's, whose
# gate the block adds first. Measured in an eager forward on the CPU (tests/test_ti2v_parallel.py:
# 3.2 copies more than with a timestep per sample); compiled blocks may fuse the sums away, and then
# this errs high.
PER_TOKEN_MODULATIONS = 3
HEADROOM = 0.9  # plan for 90% of a GPU's memory: the allocator's fragmentation and the estimate's roughness

# Host memory of each process that cannot be reclaimed (anonymous and pinned; the checkpoint's pages
# in the page cache are not counted, the kernel gives them back under pressure): Python, torch and
# the CUDA context; and the video on its way out, in fp32 copies of it. The per-process share is fitted
# to two runs on one H200 (docs/benchmarks.md, third session: 5.83 GiB for the process tree at 720P
# and 4.31 GiB at 480P, each with a 2.0 GiB staging ring, the whole video then held before the mp4
# was encoded). Since the CLI and the server write the mp4 as the frames are decoded, 720P peaks at
# 4.35 GiB (fifth session): 1.3 copies of the fp32 video (the API, which returns the whole video and
# its 8-bit copy, holds about 3.2). (With inductor's pool of compiler processes, which the CLI turns
# off, 11.4-11.9 GiB.)
HOST_PROCESS = 1.25 * GiB
VIDEO_COPIES = 1.3
HOST_PROCESS_CPU = 1.0 * GiB  # the same without CUDA
HOST_SPAWNER = 1.0 * GiB  # the process that starts N ranks itself (--gpus N): torch without CUDA
STAGING_DEPTH = 3  # slots of the staging ring, one block each: one read while one is copied up and one computes
PINNED_ROUNDING = 1.5  # FSDP2's host offload pins each shard on its own, rounded up to a power of two (measured 48 GiB for 32)


@dataclass(frozen=True)
class Placement:
    """Where the weights live. ``fsdp``: the experts and the text encoder sharded over the ranks;
    ``offload``: None (on the GPU), ``"experts"`` (one expert at a time on the GPU; with FSDP: every
    shard in pinned host memory, each block gathered to the GPU as it runs) or ``"blocks"`` (one
    GPU: each expert's blocks streamed from the checkpoint's files through a few pinned slots)."""

    fsdp: bool = False
    offload: str | None = None

    def describe(self, dims: ParallelDims, on_gpu: bool = True, spec: ModelSpec | str = DEFAULT_SPEC) -> str:
        """Where ``spec``'s weights live, said of the GPU, or of host memory when the run is on the CPU."""
        if self.fsdp:
            return "experts and text encoder sharded (FSDP)" + (", the shards in host memory" if self.offload and on_gpu else "")
        experts = spec_for(spec).experts
        every = "both experts" if len(experts) == 2 else str(experts[0]) if len(experts) == 1 else f"all {len(experts)} experts"
        if len(experts) == 1:  # a dense model's one expert leaves the GPU between its runs, for the other stages
            one_expert = f"{every} on the GPU while it denoises" if on_gpu else f"{every} while it denoises"
            blocks = f"{every}'s blocks streamed from the checkpoint"
        else:
            one_expert = "one expert on the GPU at a time" if on_gpu else "one expert at a time"
            blocks = "expert blocks streamed from the checkpoint"
        experts = {None: f"{every} on the GPU" if on_gpu else f"{every} in host memory",
                   "experts": f"{one_expert}, streamed in from the checkpoint", "blocks": blocks}[self.offload]  # fmt: skip
        return experts + (", text encoder sharded" if dims.shards_text_encoder(bool(self.offload)) else "")


# What the planner tries, fastest first: one expert at a time streams the arriving expert behind its
# first forward; FSDP's host offload gathers each block behind the compute of the one before (no
# slower per step at 720P, docs/benchmarks.md, but its pinned shards need host memory); streaming
# blocks from the checkpoint costs a few percent.
PLACEMENTS_ONE_GPU = (Placement(), Placement(offload="experts"), Placement(offload="blocks"))
PLACEMENTS_SEVERAL = (Placement(), Placement(fsdp=True), Placement(offload="experts"), Placement(fsdp=True, offload="experts"), Placement(offload="blocks"))


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU at the peak of each stage of a run, which come one after the other."""

    stages: dict

    @property
    def total(self) -> int:
        return max(self.stages.values())

    def fits(self, budget: int | None) -> bool:
        return budget is None or self.total <= budget * HEADROOM

    def describe(self, per: str = "per GPU") -> str:
        parts = ", ".join(f"{stage} {value / GiB:.1f}" for stage, value in self.stages.items())
        return f"peak {self.total / GiB:.1f} GiB {per} ({parts} GiB)"


def estimate_host_memory(
    dims: ParallelDims,
    sizes: ModelSizes,
    gpu: MemoryEstimate,
    *,
    pixels: int,
    frames: int = 81,
    offload: str | None = None,
    on_gpu: bool = True,
    spawned: bool = False,
    tokens: int = 0,
    step_cache_bytes: int = 0,
) -> MemoryEstimate:
    """The host memory of one machine at the peak of each stage: every rank's process, its staging ring
    (one block per slot, as stored) or its FSDP shards pinned in host memory, the frames on their way
    in (the image encode's input) and out (the decoded video, its 8-bit copy for the mp4), and with the
    step cache on (``step_cache_bytes`` an element of its stream, ``tokens`` the DiT's sequence) the
    host copy of its state in the resumable state file, every rank's gathered on rank 0 (3.1 GB at 720P
    with guidance). On the CPU everything the GPU estimate counts is in host memory. ``spawned``: a
    process of ours started the ranks (``--gpus N``) and holds the video too."""
    world, offloaded = dims.world, bool(offload)
    video = 3 * frames * pixels * 4  # a float32 video, on its way in (the encode) or out (the decode)
    if not on_gpu:
        per_rank = {stage: HOST_PROCESS_CPU + value for stage, value in gpu.stages.items()}
    else:
        if dims.fsdp:
            held = 0
            if offloaded:  # the experts' shards, and the text encoder's, pinned
                held = int(PINNED_ROUNDING * (sizes.experts * sizes.expert + sizes.text_encoder) / world)
        else:
            held = STAGING_DEPTH * (sizes.stored_block or sizes.block)
        per_rank = {stage: HOST_PROCESS + held for stage in gpu.stages}
    cache_state = STEP_CACHE_COPIES * 2 * tokens * sizes.dim * step_cache_bytes if on_gpu else 0  # (on the CPU: the GPU estimate's)
    main = {"text encoding": 0, "image encoding": video, "denoising": cache_state, "decoding": int(VIDEO_COPIES * video)}
    stages = {}
    for stage, value in per_rank.items():
        total = world * value + main.get(stage, 0)
        if spawned and world > 1:  # the video crosses to the spawning process through shared memory
            total += HOST_SPAWNER + (2 * video if stage == "decoding" else 0)
        stages[stage] = int(total)
    return MemoryEstimate(stages)


def estimate_memory(
    dims: ParallelDims,
    sizes: ModelSizes,
    *,
    tokens: int,
    pixels: int,
    offload: str | None = None,
    decode_bytes: int = 4,
    encode_bytes: int = 4,
    keep_text_encoder: bool = False,
    stream_text_encoder: bool = False,
    kept_blocks: int = 0,
    step_cache_bytes: int = 0,
    decode_frame_by_frame: bool = False,
    compiled: bool = True,
) -> MemoryEstimate:
    """The per-GPU peak of each stage: the weights on the GPU then, plus that stage's transients.

    ``tokens`` is the DiT's sequence length (latent frames x latent pixels / 4), ``pixels`` one
    output frame's height x width, ``decode_bytes`` 4 for an fp32 decode, 2 for bf16.
    ``stream_text_encoder``: a visiting text encoder's blocks stream through the GPU (its embedding
    stays while it encodes); ``kept_blocks``: with ``offload="blocks"``, the active expert's blocks
    that stay on the GPU while it runs. ``step_cache_bytes``: with the step cache on, the bytes of an
    element of the stream it keeps (the compute dtype's); 0: no cache. ``decode_frame_by_frame``: one
    GPU decodes one output frame at a time (smaller, slower), as a split decode always does.
    ``compiled``: the DiT runs compiled (its activations are smaller).
    """
    world, offloaded = dims.world, bool(offload)
    # Text encoder: sharded (gathering a block ahead and its embedding while it encodes), visiting the GPU, or kept.
    if dims.shards_text_encoder(offloaded):
        in_host = dims.fsdp and offloaded  # then each gathered unit's shard is copied up first
        text_kept = 0 if in_host else sizes.text_encoder // world
        gathered = sizes.text_embedding + 2 * sizes.text_block
        text_running = text_kept + gathered + (gathered // world if in_host else 0)
    else:
        text_kept = sizes.text_encoder if text_encoder_kept(dims, offload, keep_text_encoder) else 0
        text_running = sizes.text_embedding + 2 * sizes.text_block if stream_text_encoder else sizes.text_encoder
    # Experts outside the loop, and in it.
    if dims.fsdp:
        experts_kept = 0 if offloaded else sizes.experts * sizes.expert // world
        experts_running = experts_kept + sizes.expert_root + 2 * sizes.block  # the root and a block ahead, gathered
    elif offload == "blocks":  # every expert's embeddings and head stay on the GPU; two streamed blocks are there at a time
        experts_kept = sizes.experts * sizes.expert_root
        experts_running = experts_kept + (2 + kept_blocks) * sizes.block
    elif offload:  # the same, and the active expert's blocks while it runs
        experts_kept = sizes.experts * sizes.expert_root
        experts_running = sizes.expert + (sizes.experts - 1) * sizes.expert_root
    else:
        experts_kept = experts_running = sizes.experts * sizes.expert
    local = -(-tokens // dims.ulysses)
    stream = sizes.dim * 4
    if dims.ulysses > 1:
        activations = max(ULYSSES_STREAMS * local * stream, GATHER_STREAMS * tokens * stream)
    else:
        activations = DIT_STREAMS * tokens * stream
    if not compiled:
        activations += EAGER_EXTRA_STREAMS * local * stream
    # The step cache keeps two copies of this rank's stream (the first blocks' residual, the middle
    # blocks') per guidance branch of the active expert: both branches on a GPU but under CFG parallel
    # (a run without guidance has one, counted as two here: the estimate does not know the guide scale).
    activations += STEP_CACHE_COPIES * (1 if dims.cfg > 1 else 2) * local * sizes.dim * step_cache_bytes
    if sizes.timestep_per_frame:  # with or without an image: a server's plan serves both kinds of job
        activations += PER_TOKEN_MODULATIONS * local * 6 * sizes.dim * 4
    unit = 4 * sizes.vae_dim * pixels  # elements of 4 full-resolution frames at the VAE's width
    whole, frame_by_frame = sizes.vae_decode_units
    if world > 1:  # this rank's tile with its halo (13 latent pixels of the longer side's 80 at 720P), frame by frame
        share = min(1.0, 1 / world + 0.16)
        decode = frame_by_frame * share * unit * decode_bytes
    else:
        decode = (frame_by_frame if decode_frame_by_frame else whole) * unit * decode_bytes
    stages = {
        "text encoding": experts_kept + text_running + sizes.vae + TEXT_ACTIVATIONS,
        "image encoding": experts_kept + text_kept + sizes.vae + int(VAE_ENCODE_UNITS * unit * encode_bytes),
        "denoising": experts_running + text_kept + sizes.vae + int(activations),
        "decoding": experts_kept + text_kept + sizes.vae + int(decode),
    }
    return MemoryEstimate(stages)


def text_encoder_kept(dims: ParallelDims, offload: str | None, keep_text_encoder: bool) -> bool:
    """The whole text encoder stays on the GPU (a server with room), rather than visiting it to encode."""
    return keep_text_encoder and not offload and not dims.shards_text_encoder(False)


@dataclass(frozen=True)
class Choice:
    """A plan and its two estimates: per GPU, and for the host memory of the machine; whether the
    text encoder's blocks stream through the GPU, how many of the active expert's blocks stay
    on it with streamed blocks (what the GPU has room for), and whether one GPU decodes frame by frame."""

    dims: ParallelDims
    placement: Placement
    estimate: MemoryEstimate
    host: MemoryEstimate
    fits: bool
    stream_text_encoder: bool = False
    kept_blocks: int = 0
    decode_frame_by_frame: bool = False


def choose_plan(
    world: int,
    sizes: ModelSizes,
    *,
    gpu_bytes: int | None,
    host_bytes: int | None = None,
    layouts: list[tuple[int, int]] | None = None,
    placements: tuple[Placement, ...] | None = None,
    guided: bool = True,
    on_gpu: bool = True,
    spawned: bool = False,
    frames: int = 81,
    **shape,
) -> Choice:
    """The fastest plan that fits in ``gpu_bytes`` per GPU and ``host_bytes`` of host memory (None: no
    limit): CFG parallel when ``world`` is even, the rest as Ulysses; for each layout, the weights on
    the GPU, else sharded, else one expert at a time, else sharded in host memory, else streamed
    blocks (one GPU: on the GPU, else one expert at a time, else streamed blocks). ``layouts`` and
    ``placements`` narrow the choice (what the user forced). When nothing fits, the plan that needs
    the smallest GPU, with ``fits`` false."""
    layouts = layouts if layouts is not None else candidate_layouts(world, sizes.num_heads, guided)
    if not layouts:
        raise WanError(
            f"{counted(world, 'GPU')} cannot split the model's {sizes.num_heads} attention heads",
            f"use {option('gpus')} {', '.join(map(str, valid_gpu_counts(sizes.num_heads)))}",
        )
    if placements is None:
        placements = PLACEMENTS_SEVERAL if world > 1 else PLACEMENTS_ONE_GPU
    best = None
    for placement in placements:  # the placement decides the speed more than the layout
        for cfg, u in layouts:
            dims = ParallelDims(cfg, u, placement.fsdp)
            # The text encoder visits whole (one copy up) unless only its blocks streamed through fit.
            visits = on_gpu and not dims.shards_text_encoder(bool(placement.offload)) and not text_encoder_kept(dims, placement.offload, shape.get("keep_text_encoder", False))
            # Then the same with a frame-by-frame decode (one GPU; a split decode goes frame by frame anyway).
            for stream_text, by_frame in product((False, True) if visits else (False,), (False, True) if on_gpu and dims.world == 1 else (False,)):
                estimate = estimate_memory(dims, sizes, offload=placement.offload, stream_text_encoder=stream_text, decode_frame_by_frame=by_frame, **shape)
                host = estimate_host_memory(dims, sizes, estimate, pixels=shape["pixels"], frames=frames, offload=placement.offload,
                                            on_gpu=on_gpu, spawned=spawned, tokens=shape["tokens"], step_cache_bytes=shape.get("step_cache_bytes", 0))  # fmt: skip
                fits = estimate.fits(gpu_bytes if on_gpu else host_bytes) and host.fits(host_bytes)
                choice = Choice(dims, placement, estimate, host, fits, stream_text, decode_frame_by_frame=by_frame)
                if choice.fits:
                    return _keep_blocks(choice, sizes, gpu_bytes, shape) if placement.offload == "blocks" and on_gpu else choice
                if best is None or (estimate.total, host.total) < (best.estimate.total, best.host.total):
                    best = choice
    return best


def _keep_blocks(choice: Choice, sizes: ModelSizes, gpu_bytes: int | None, shape: dict) -> Choice:
    """``choice`` (streamed blocks that fit) with as many of the active expert's blocks kept on the GPU
    as the budget leaves room for while it denoises: fewer bytes stream each step."""
    if gpu_bytes is None:
        return choice
    room = int(gpu_bytes * HEADROOM) - choice.estimate.stages["denoising"]
    # At most all but the two that stream: those two are on the GPU at once anyway (the estimate counts them).
    kept = max(0, min(sizes.blocks - 2, room // max(sizes.block, 1)))
    if kept == 0:
        return choice
    estimate = estimate_memory(choice.dims, sizes, offload="blocks", stream_text_encoder=choice.stream_text_encoder, kept_blocks=kept,
                               decode_frame_by_frame=choice.decode_frame_by_frame, **shape)  # fmt: skip
    return replace(choice, estimate=estimate, kept_blocks=kept)


def machine_needed(choice: Choice, on_gpu: bool = True) -> str:
    """The smallest machine the plan of ``choice`` fits, in words."""
    host = f"{choice.host.total / HEADROOM / GiB:.0f} GiB of host memory"
    if not on_gpu:
        return host
    gpus = choice.dims.world
    return f"{gpus} GPU{'s' if gpus > 1 else ''} of {choice.estimate.total / HEADROOM / GiB:.0f} GiB and {host}"


def make_plan(
    world: int,
    sizes: ModelSizes,
    *,
    ulysses: int | None = None,
    cfg_parallel: bool = False,
    fsdp: bool = False,
    offload: str | None = None,
    gpu_bytes: int | None,
    **shape,
) -> Choice:
    """The plan for ``world`` GPUs: what the user forced (``ulysses``, ``cfg_parallel``, ``fsdp``,
    ``offload``), checked, with the rest chosen by ``choose_plan``; its estimates and whether it fits."""
    layouts = None
    if ulysses is not None or cfg_parallel:
        cfg = 2 if cfg_parallel else 1
        dims = ParallelDims(cfg, ulysses or max(1, world // cfg), fsdp).validate(world, sizes.num_heads)
        layouts = [(dims.cfg, dims.ulysses)]
    elif fsdp and world == 1:
        raise fsdp_needs_ranks()
    placements = None
    if fsdp or offload is not None:
        placements = (Placement(fsdp, offload),)
    return choose_plan(world, sizes, gpu_bytes=gpu_bytes, layouts=layouts, placements=placements, **shape)


def model_sizes(ckpt_dir, dtype_bytes: int = 2, fp8: bool = False, spec: ModelSpec | str = DEFAULT_SPEC) -> ModelSizes:
    """Sizes from the checkpoint's configs (``spec``'s official shapes where ``ckpt_dir`` has none)."""
    from pathlib import Path

    import torch

    from wan_i2v.models.dit import DiT, keeps_fp32
    from wan_i2v.models.vae import VAE_CONFIG_FILE

    spec = spec_for(spec)
    root = Path(ckpt_dir) if ckpt_dir is not None else None
    builders = spec.builders

    def config(cls, path):
        return cls.from_json_file(path) if root is not None and path.is_file() else cls()

    expert_dir = (root or Path()) / spec.experts[0].folder  # the experts share one config (the loader checks it)
    dit = config(builders.dit_config.target, expert_dir / "config.json")
    t5 = config(builders.text_encoder_config.target, (root or Path()) / T5_CONFIG_FILE)
    vae = config(builders.vae_config.target, (root or Path()) / VAE_CONFIG_FILE)
    with torch.device("meta"):
        expert, wan_vae = DiT(dit), vae.build()
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    blocks = expert.block_stack()
    block = count(blocks[0]) * dtype_bytes
    if fp8:  # the blocks' linear weights in 1 byte, with an fp32 scale per output channel (transforms/fp8.py)
        linears = [module for module in blocks[0].modules() if isinstance(module, torch.nn.Linear)]
        block -= sum(linear.weight.numel() * (dtype_bytes - 1) - linear.out_features * 4 for linear in linears)
    stored_bytes = _stored_bytes(expert_dir, spec.stored_bytes) if root is not None else spec.stored_bytes
    t5_layer = 4 * t5.dim * t5.dim_attn + 3 * t5.dim * t5.dim_ffn + t5.num_buckets * t5.num_heads + 2 * t5.dim
    return ModelSizes(
        expert=count(expert) * dtype_bytes - len(blocks) * (count(blocks[0]) * dtype_bytes - block),
        block=block,
        expert_root=sum(p.numel() * (4 if keeps_fp32(name) else dtype_bytes) for name, p in expert.named_parameters() if not name.startswith("blocks.")),
        text_encoder=(t5.vocab_size * t5.dim + t5.encoder_layers * t5_layer + t5.dim) * dtype_bytes,
        text_block=t5_layer * dtype_bytes,
        text_embedding=t5.vocab_size * t5.dim * dtype_bytes,
        vae=count(wan_vae) * 4,
        dim=dit.dim,
        ffn_dim=dit.ffn_dim,
        num_heads=dit.num_heads,
        vae_dim=vae.full_resolution_channels,
        vae_decode_units=vae.decode_units,
        stored_block=count(blocks[0]) * stored_bytes,
        blocks=len(blocks),
        experts=len(spec.experts),
        timestep_per_frame=spec.conditioning.target.timestep_per_frame,
    )


def _stored_bytes(model_dir, official: int) -> int:
    """Bytes per parameter of an expert's blocks as its safetensors store them (from a header; else ``official``)."""
    from wan_i2v.loading.checkpoint import safetensors_ranges

    files = sorted(model_dir.glob("diffusion_pytorch_model*.safetensors")) or [model_dir / SAFETENSORS_FILE]
    try:
        ranges = safetensors_ranges(files[0])
    except (OSError, ValueError, KeyError):
        return official
    weights = [stored for key, stored in ranges.items() if key.startswith("blocks.") and key.endswith(".weight") and len(stored.shape) == 2]
    return weights[0].dtype.itemsize if weights else official
