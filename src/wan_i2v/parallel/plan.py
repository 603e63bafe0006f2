"""The parallel plan (cfg x ulysses, FSDP or not) and the per-GPU memory estimate it is chosen by.

Pure data and arithmetic: nothing here touches ``torch.distributed``, so the plan can be
chosen, explained (``--dry-run``) and rejected before any process is started.
"""

from __future__ import annotations

from dataclasses import dataclass

from wan_i2v.errors import WanError

GiB = 2**30
HEADROOM = 0.85  # plan for 85% of a GPU's memory: the CUDA context, allocator fragmentation and the estimate's roughness


@dataclass(frozen=True)
class ParallelDims:
    """How N = cfg x ulysses processes share one video (the torchtitan ``ParallelDims`` shape).

    ``cfg``: 1, or 2 to run the conditional and unconditional passes on two halves of the ranks.
    ``ulysses``: the sequence-parallel degree inside each half; it must divide the attention heads.
    ``fsdp``: shard both experts over all N ranks (FSDP2, one unit per block). The text encoder is
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
            raise WanError(f"CFG parallel degree {self.cfg}", "it is 1 or 2 (--cfg-parallel)")
        if self.ulysses < 1 or num_heads % self.ulysses:
            raise WanError(
                f"--ulysses {self.ulysses} does not divide the model's {num_heads} attention heads",
                f"choose one of {', '.join(map(str, divisors(num_heads)))}",
            )
        if self.fsdp and world == 1:
            raise WanError("--fsdp shards over several GPUs", "give --gpus 2 or more, or leave out --fsdp")
        if self.world != world:
            raise WanError(
                f"the plan cfg {self.cfg} x ulysses {self.ulysses} uses {self.world} GPUs, not {world}",
                f"with {world} GPUs use {' or '.join(describe_choices(world, num_heads)) or 'another --gpus'}",
            )
        return self

    def describe(self, offload: bool = False) -> str:
        parts = [f"{self.world} GPU{'s' if self.world > 1 else ''}"]
        parts.append("CFG parallel 2" if self.cfg == 2 else "no CFG parallel")
        parts.append(f"Ulysses {self.ulysses}")
        if self.fsdp:
            parts.append("FSDP over experts and text encoder")
        elif self.shards_text_encoder(offload):
            parts.append("experts unsharded, text encoder sharded")
        else:
            parts.append("unsharded")
        return ", ".join(parts)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_layouts(world: int, num_heads: int) -> list[tuple[int, int]]:
    """(cfg, ulysses) pairs for ``world`` ranks, CFG parallel first."""
    return [(cfg, world // cfg) for cfg in (2, 1) if world % cfg == 0 and num_heads % (world // cfg) == 0]


def describe_choices(world: int, num_heads: int) -> list[str]:
    return [f"--ulysses {u}" + (" --cfg-parallel" if cfg == 2 else "") for cfg, u in candidate_layouts(world, num_heads)]


def valid_gpu_counts(num_heads: int, up_to: int = 16) -> list[int]:
    return [n for n in range(1, up_to + 1) if candidate_layouts(n, num_heads)]


@dataclass(frozen=True)
class ModelSizes:
    """Bytes of each model in the run dtype, and the shapes the activations scale with."""

    expert: int  # one DiT expert
    block: int  # one transformer block of it
    text_encoder: int
    vae: int
    dim: int
    ffn_dim: int
    num_heads: int
    vae_dim: int  # channels of the VAE decoder's last stage


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU: resident weights (the VAE's included), the DiT's activations while denoising
    and the VAE's while decoding; the two stages come one after the other."""

    weights: int
    activations: int
    vae: int

    @property
    def total(self) -> int:
        return self.weights + max(self.activations, self.vae)

    def fits(self, gpu_bytes: int | None) -> bool:
        return gpu_bytes is None or self.total <= gpu_bytes * HEADROOM

    def describe(self) -> str:
        return (
            f"weights {self.weights / GiB:.1f} GiB + max(DiT activations {self.activations / GiB:.1f} GiB,"
            f" VAE decode {self.vae / GiB:.1f} GiB) = {self.total / GiB:.1f} GiB per GPU"
        )


def estimate_memory(
    dims: ParallelDims,
    sizes: ModelSizes,
    *,
    tokens: int,
    pixels: int,
    offload: bool = False,
    dtype_bytes: int = 2,
) -> MemoryEstimate:
    """A rough per-GPU peak: resident weights, the DiT's activations at ``tokens`` and the VAE.

    ``tokens`` is the DiT's sequence length (latent frames x latent pixels / 4), ``pixels`` one
    output frame's height x width. The estimate leans high; it is for choosing a plan, not a promise.
    """
    experts, t5 = 2 * sizes.expert, sizes.text_encoder
    if dims.fsdp:
        # Sharded storage plus the gathered current block and the prefetched next one; with --offload
        # the experts' shards wait in host memory, the text encoder's do not.
        weights = 2 * sizes.block + (0 if offload else experts // dims.world)
    elif offload:
        weights = sizes.expert  # one expert at a time
    else:
        weights = experts
    if dims.shards_text_encoder(offload):
        weights += t5 // dims.world
    else:  # whole, on the GPU or visiting it to encode
        weights = max(weights, t5) if offload else weights + t5
    weights += sizes.vae
    local = -(-tokens // dims.ulysses)
    # In a block: the fp32 residual stream and its temporaries, q/k/v and the attention output, the
    # FFN's hidden layer; after the blocks: the gathered full sequence for the output head.
    per_token = sizes.dim * 4 * 4 + sizes.ffn_dim * dtype_bytes * 2
    activations = max(local * per_token, tokens * sizes.dim * 4 * 3)
    # The VAE's last stage on one latent frame (4 video frames): a few full-resolution fp32 tensors,
    # tiled over the ranks (with halos).
    share = min(1.0, 1 / dims.world + (0.3 if dims.world > 1 else 0))
    vae = int(4 * pixels * sizes.vae_dim * 4 * 4 * share)
    return MemoryEstimate(weights, activations, vae)


def choose_plan(
    world: int,
    sizes: ModelSizes,
    *,
    gpu_bytes: int | None,
    tokens: int,
    pixels: int,
    offload: bool = False,
    dtype_bytes: int = 2,
) -> tuple[ParallelDims, MemoryEstimate, bool]:
    """The default plan: CFG parallel when ``world`` is even, the rest as Ulysses; experts unsharded
    when they fit in ``gpu_bytes`` (None: no limit), FSDP otherwise. Returns (plan, estimate, fits)."""
    layouts = candidate_layouts(world, sizes.num_heads)
    if not layouts:
        raise WanError(
            f"{world} GPUs cannot split the model's {sizes.num_heads} attention heads",
            f"use --gpus {', '.join(map(str, valid_gpu_counts(sizes.num_heads)))}",
        )
    # CFG parallel first (it needs no communication inside a forward), each unsharded before sharded.
    options = [(cfg, u, fsdp) for cfg, u in layouts for fsdp in ((False, True) if world > 1 else (False,))]
    best = None
    for cfg, u, fsdp in options:
        dims = ParallelDims(cfg, u, fsdp)
        estimate = estimate_memory(dims, sizes, tokens=tokens, pixels=pixels, offload=offload, dtype_bytes=dtype_bytes)
        if estimate.fits(gpu_bytes):
            return dims, estimate, True
        if best is None or estimate.total < best[1].total:
            best = (dims, estimate)
    return best[0], best[1], False


def make_plan(
    world: int,
    sizes: ModelSizes,
    *,
    ulysses: int | None = None,
    cfg_parallel: bool = False,
    fsdp: bool = False,
    gpu_bytes: int | None,
    **shape,
) -> tuple[ParallelDims, MemoryEstimate, bool]:
    """The plan the user forced (any of ``ulysses``, ``cfg_parallel``, ``fsdp`` given), checked, or
    else the default one (``choose_plan``); with its estimate and whether it fits in ``gpu_bytes``."""
    if ulysses is None and not cfg_parallel and not fsdp:
        return choose_plan(world, sizes, gpu_bytes=gpu_bytes, **shape)
    cfg = 2 if cfg_parallel else 1
    dims = ParallelDims(cfg, ulysses or max(1, world // cfg), fsdp).validate(world, sizes.num_heads)
    estimate = estimate_memory(dims, sizes, **shape)
    return dims, estimate, estimate.fits(gpu_bytes)


def model_sizes(ckpt_dir, dtype_bytes: int = 2) -> ModelSizes:
    """Sizes from the checkpoint's configs (the official model's where ``ckpt_dir`` has none)."""
    from pathlib import Path

    import torch

    from wan_i2v import checkpoint as ckpt
    from wan_i2v.models.dit import DiT, DiTConfig
    from wan_i2v.models.text_encoder import T5_CONFIG_FILE, T5Config
    from wan_i2v.models.vae import VAE_CONFIG_FILE, VAEConfig, WanVAE

    root = Path(ckpt_dir) if ckpt_dir is not None else None

    def config(cls, path):
        return cls.from_json_file(path) if root is not None and path.is_file() else cls()

    dit = config(DiTConfig, (root or Path()) / ckpt.HIGH_NOISE_DIR / "config.json")
    t5 = config(T5Config, (root or Path()) / T5_CONFIG_FILE)
    vae = config(VAEConfig, (root or Path()) / VAE_CONFIG_FILE)
    with torch.device("meta"):
        expert, wan_vae = DiT(dit), WanVAE(vae)
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    t5_layer = 4 * t5.dim * t5.dim_attn + 3 * t5.dim * t5.dim_ffn + t5.num_buckets * t5.num_heads + 2 * t5.dim
    return ModelSizes(
        expert=count(expert) * dtype_bytes,
        block=count(expert.blocks[0]) * dtype_bytes,
        text_encoder=(t5.vocab_size * t5.dim + t5.encoder_layers * t5_layer + t5.dim) * dtype_bytes,
        vae=count(wan_vae) * 4,
        dim=dit.dim,
        ffn_dim=dit.ffn_dim,
        num_heads=dit.num_heads,
        vae_dim=vae.dim,
    )
