"""The Wan2.2 image-to-video diffusion transformer (one expert), in plain PyTorch.

Parameter names are the official ones, so the official safetensors load as they are.
Numerics follow the official model run in bf16: the linear layers and attention run
in the weights' dtype, while the residual stream, the norms, the timestep modulation
and the output head stay in fp32 (the "fp32 islands"). Unlike the official code,
RoPE runs in fp32 from float64-built tables and the timestep modulation is computed
once per sample, not once per token.

Two seams let parallelism be applied from outside without a branch in ``forward``:
``DiT.sequence`` (how the token sequence is laid out over ranks) and each
``SelfAttention.attention`` (the attention call). Both are identity-like modules here.
A third, ``DiT.blocks`` (a ``BlockStack``, the model's declared repeated blocks), runs the
blocks and the hooks registered on it (``models/hooks.py``): step caches and traces attach there,
and the transforms find the blocks through ``DiT.block_stack()``.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from wan_i2v.errors import WanError
from wan_i2v.models.spec import UMT5_XXL_DIM
from wan_i2v.models.attention import Attention
from wan_i2v.models.hooks import HookRegistry, settle

# Video sizes whose RoPE tables a DiT keeps (the latest used).
ROPE_CACHE_SIZES = 4

# Tensors kept in fp32 whatever the compute dtype, as the official model does under autocast.
FP32_PARAMETER_MARKERS = ("modulation", "norm", "time_embedding.", "time_projection.", "head.")


def keeps_fp32(parameter_name: str) -> bool:
    return any(marker in parameter_name for marker in FP32_PARAMETER_MARKERS)


@dataclass(frozen=True)
class DiTConfig:
    """One expert's shape; the defaults are Wan2.2-I2V-A14B's."""

    dim: int = 5120
    ffn_dim: int = 13824
    freq_dim: int = 256
    in_dim: int = 36
    out_dim: int = 16
    num_heads: int = 40
    num_layers: int = 40
    text_len: int = 512
    text_dim: int = UMT5_XXL_DIM
    eps: float = 1e-6
    patch_size: tuple[int, int, int] = (1, 2, 2)

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @classmethod
    def from_json_file(cls, path: Path) -> "DiTConfig":
        from wan_i2v.loading.checkpoint import read_json

        from wan_i2v.models.spec import SPECS

        raw = read_json(path, "expert config")
        model_type = raw.get("model_type", "i2v")
        if model_type not in {spec.model_type for spec in SPECS.values()}:
            raise WanError(
                f"{path} describes a {model_type!r} model, not image-to-video",
                f"use a checkpoint of {' or '.join(SPECS)}",
            )
        # Keys the official config may carry that only restate the architecture we implement.
        fixed = {"window_size": [-1, -1], "qk_norm": True, "cross_attn_norm": True}
        known = {f.name for f in fields(cls)}
        values = {}
        for key, value in raw.items():
            if key.startswith("_") or key == "model_type":
                continue
            if key in fixed:
                if json.loads(json.dumps(value)) != fixed[key]:
                    raise WanError(f"{path}: unsupported {key}={value!r}", "this checkpoint is of another model")
            elif key in known:
                values[key] = tuple(value) if key == "patch_size" else value
            else:
                raise WanError(f"{path}: unknown config key {key!r}", "this checkpoint is of another model")
        config = cls(**values)
        if config.dim % config.num_heads or config.head_dim % 2:
            raise WanError(f"{path}: dim {config.dim} does not split into {config.num_heads} heads of even size")
        return config


@dataclass(frozen=True)
class TI2V5BConfig(DiTConfig):
    """Wan2.2-TI2V-5B's DiT: 48 latent channels in and out (the image is a latent frame, not extra channels)."""

    dim: int = 3072
    ffn_dim: int = 14336
    in_dim: int = 48
    out_dim: int = 48
    num_heads: int = 24
    num_layers: int = 30


def sinusoidal_embedding(timestep: torch.Tensor, dim: int) -> torch.Tensor:
    """[B] timesteps -> [B, dim] fp32 as cat(cos, sin).

    Built in float64 as the official model does: it is B x dim numbers, so the
    cost is nil, while fp32 angles near t=1000 would be off by ~1e-4 rad.
    """
    half = dim // 2
    exponent = torch.arange(half, device=timestep.device, dtype=torch.float64) / half
    angles = timestep.to(torch.float64)[:, None] * torch.pow(10000.0, -exponent)[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1).float()


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """How the rotary pairs of a head split over (frame, height, width), as in the official model."""
    pairs = head_dim // 2
    return pairs - 2 * (pairs // 3), pairs // 3, pairs // 3


def rope_tables(grid: tuple[int, int, int], head_dim: int, device, theta: float = 10000.0):
    """cos and sin, each [F*H*W, head_dim/2] fp32, for tokens in (frame, height, width) order.

    Angles are built per axis in float64 (a few hundred numbers) and only the
    per-token expansion runs on the device, in fp32.
    """
    per_axis = []
    for size, pairs in zip(grid, rope_axis_dims(head_dim)):
        axis_dim = 2 * pairs
        inv_freq = 1.0 / theta ** (torch.arange(0, axis_dim, 2, dtype=torch.float64) / axis_dim)
        angles = torch.arange(size, dtype=torch.float64)[:, None] * inv_freq[None]
        per_axis.append(torch.stack([angles.cos(), angles.sin()]).float().to(device))
    f, h, w = grid
    table = torch.cat(
        [
            per_axis[0][:, :, None, None, :].expand(-1, f, h, w, -1),
            per_axis[1][:, None, :, None, :].expand(-1, f, h, w, -1),
            per_axis[2][:, None, None, :, :].expand(-1, f, h, w, -1),
        ],
        dim=-1,
    ).flatten(1, 3)
    return table[0], table[1]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of [B, L, H, D] by the per-token angles; returns fp32."""
    pairs = x.float().unflatten(-1, (-1, 2))
    real, imag = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[:, None, :], sin[:, None, :]
    return torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1).flatten(-2)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalised in fp32, rounded to the input dtype, then scaled: the official order.
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype) * self.weight


class FP32LayerNorm(nn.LayerNorm):
    """Layer norm computed in fp32, returned in the input's dtype (as the official WanLayerNorm)."""

    def forward(self, x):
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


class NormRope(nn.Module):
    """A query or key projection's RMS norm (over all heads' channels), then RoPE when ``rope`` is
    given, in ``dtype``: [B, L, C] -> [B, L, heads, C / heads].

    A seam, like ResidualNorm: on a GPU, ``wan_i2v.fused_norms`` swaps in one kernel that reads
    the projection once, where the compiler's reduction reads it twice.
    """

    def forward(self, x, norm: RMSNorm, rope, heads: int, dtype: torch.dtype):
        x = norm(x).unflatten(-1, (heads, -1))
        return (x if rope is None else apply_rope(x, *rope)).to(dtype)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)
        self.norm_rope = NormRope()
        self.attention = Attention()

    def forward(self, x, rope, key_mask=None):
        v = self.v(x).unflatten(-1, (self.num_heads, -1))
        q = self.norm_rope(self.q(x), self.norm_q, rope, self.num_heads, v.dtype)
        k = self.norm_rope(self.k(x), self.norm_k, rope, self.num_heads, v.dtype)
        return self.o(self.attention(q, k, v, key_mask).flatten(2))


class CrossAttention(nn.Module):
    """Attention from video tokens to all ``text_len`` text positions, padding included (as official)."""

    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)
        self.norm_rope = NormRope()
        self.attention = Attention()

    def forward(self, x, context):
        q = self.norm_rope(self.q(x.to(context.dtype)), self.norm_q, None, self.num_heads, context.dtype)
        k = self.norm_rope(self.k(context), self.norm_k, None, self.num_heads, context.dtype)
        v = self.v(context).unflatten(-1, (self.num_heads, -1))
        return self.o(self.attention(q, k, v).flatten(2))


class ResidualNorm(nn.Module):
    """The residual add and the layer norm that follows it, as one step: ``x + y * gate`` (``y``
    and ``gate`` optional), then ``norm`` of the sum, modulated as ``* (1 + scale) + shift`` when
    given, in ``dtype``. Returns (sum, normed).

    A seam, like Attention: on a GPU, ``wan_i2v.fused_norms`` swaps in one kernel that reads the
    stream once, where the compiler's reduction over 5120 channels reads it twice. That kernel
    may write the sum over ``x``: callers pass a stream they do not read again.
    """

    def forward(self, x, y, gate, norm: "FP32LayerNorm", shift, scale, dtype: torch.dtype):
        if y is not None:
            x = x + (y if gate is None else y * gate)
        normed = norm(x)
        if scale is not None:
            normed = normed * (1 + scale) + shift
        return x, normed.to(dtype)


class FeedForward(nn.Sequential):
    """Linear -> tanh GELU -> Linear; a Sequential, so that the official names (``ffn.0``, ``ffn.2``) hold."""

    def __init__(self, dim: int, hidden: int):
        super().__init__(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))

    @property
    def up(self) -> nn.Module:
        """The widening projection."""
        return self[0]

    @property
    def activation(self) -> nn.Module:
        return self[1]

    def fuse_activation(self, fused: nn.Module) -> None:
        """``fused`` computes ``activation(up(x))``: it takes the projection's place (and names), the
        activation becomes the identity."""
        self[0], self[1] = fused, nn.Identity()


class Block(nn.Module):
    def __init__(self, config: DiTConfig):
        super().__init__()
        dim, eps = config.dim, config.eps
        self.norm1 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.self_attn = SelfAttention(dim, config.num_heads, eps)
        self.norm3 = FP32LayerNorm(dim, eps, elementwise_affine=True)
        self.cross_attn = CrossAttention(dim, config.num_heads, eps)
        self.norm2 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.ffn = FeedForward(dim, config.ffn_dim)
        self.modulation = nn.Parameter(torch.zeros(1, 6, dim))
        self.residual_norm = ResidualNorm()

    def forward(self, x, pending, time_modulation, context, rope, key_mask=None):
        """x: residual stream [B, L, C] (fp32 after the first block); pending: the previous block's
        last residual term as (update, gate), not yet added to x, or None; time_modulation: fp32
        [B, 1, 6, C], or [B, L, 6, C] with a timestep per token; context: [B, text_len, C] in the
        compute dtype, which the linear layers take their inputs in. Returns (x, pending): this
        block's own last term (the gated FFN output) is left for the next step that reads the
        stream to add, so that the add and the next norm are one step (one pass over the stream
        with the fused kernels)."""
        dtype = context.dtype
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = (self.modulation + time_modulation).unbind(2)
        update, gate = (None, None) if pending is None else pending
        x, attn_in = self.residual_norm(x, update, gate, self.norm1, shift_sa, scale_sa, dtype)
        x, cross_in = self.residual_norm(x, self.self_attn(attn_in, rope, key_mask), gate_sa, self.norm3, None, None, dtype)
        x, ffn_in = self.residual_norm(x, self.cross_attn(cross_in, context), None, self.norm2, shift_ff, scale_ff, dtype)
        return x, (self.ffn(ffn_in), gate_ff)


class BlockStack(nn.ModuleList):
    """The blocks, run in a row, and the hooks registered on them (``hooks``: a ``HookRegistry``).

    A ModuleList, so that the blocks keep their checkpoint names (``blocks.N.…``). Without hooks the
    loop is the plain one; with hooks, each block's input and output pass through them, and they
    may skip every block or a span of them (see ``models/hooks.py``)."""

    def __init__(self, blocks):
        super().__init__(blocks)
        self.hooks = HookRegistry()

    def forward(self, tokens, time_modulation, context, rope, key_mask=None):
        """The blocks' arguments as ``Block.forward`` takes them (but ``pending``) -> the residual stream."""
        pending = None
        if not self.hooks:
            for block in self:
                tokens, pending = block(tokens, pending, time_modulation, context, rope, key_mask)
            return settle(tokens, pending)
        hooks = self.hooks
        call, output = hooks.begin(tokens, time_modulation)
        if call.skipped:
            return hooks.end(call, output)
        index = 0
        while index < len(self):
            skip = hooks.skip_blocks(call, index, tokens, pending)
            if skip is not None:
                index, tokens, pending = skip
                continue
            tokens, pending = hooks.before_block(call, index, tokens, pending)
            tokens, pending = self[index](tokens, pending, time_modulation, context, rope, key_mask)
            tokens, pending = hooks.after_block(call, index, tokens, pending)
            index += 1
        return hooks.end(call, settle(tokens, pending))


class Head(nn.Module):
    def __init__(self, config: DiTConfig):
        super().__init__()
        self.norm = FP32LayerNorm(config.dim, config.eps, elementwise_affine=False)
        self.head = nn.Linear(config.dim, math.prod(config.patch_size) * config.out_dim)
        self.modulation = nn.Parameter(torch.zeros(1, 2, config.dim))

    def forward(self, x, time_embedding):
        """x [B, L, C]; time_embedding [B, 1, C], or [B, L, C] with a timestep per token."""
        shift, scale = (self.modulation[:, None] + time_embedding[:, :, None]).unbind(2)
        return self.head(self.norm(x) * (1 + scale) + shift)


class SequenceLayout(nn.Module):
    """Where each rank's tokens come from: here, one rank holds them all.

    Sequence parallelism replaces this module (``wan_i2v.parallel``); ``scatter``
    returns the local tokens, their RoPE tables and a key mask (None: no padding), and
    ``per_token`` the local tokens' rows of values given per latent frame.
    """

    def scatter(self, tokens, rope):
        return tokens, rope, None

    def per_token(self, per_frame: torch.Tensor, tokens_per_frame: int) -> torch.Tensor:
        """[B, F, ...] values of each latent frame -> [B, L, ...]: each token of the last ``scatter`` takes its frame's."""
        return per_frame.repeat_interleave(tokens_per_frame, dim=1)

    def gather(self, tokens):
        return tokens


class DiT(nn.Module):
    """One Wan2.2 I2V expert: (noisy latent, image condition, timestep, text) -> flow."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        dim = config.dim
        self.patch_embedding = nn.Conv3d(config.in_dim, dim, kernel_size=config.patch_size, stride=config.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(config.text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(config.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim * 6))
        self.blocks = BlockStack(Block(config) for _ in range(config.num_layers))
        self.head = Head(config)
        self.sequence = SequenceLayout()
        # (grid, device) -> RoPE tables: built once per video size, since copying them to the
        # device from host memory would wait for the GPU at the start of every forward. Only the
        # latest few sizes are kept: a server sees many (720P tables are 39 MB).
        self.rope_cache: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    def forward(self, latent, timestep, context, condition=None):
        """
        latent:    [B, out_dim, F, H, W] noisy latents
        timestep:  [B] timesteps in [0, 1000], or [B, F] one per latent frame, which its tokens take
                   (TI2V: a given frame's is 0; the official model takes it per token, [B, seq_len])
        context:   [B, text_len, text_dim] text features, zero-padded to text_len
        condition: [B, in_dim - out_dim, F, H, W] channels concatenated to the latents (I2V: a
                   first-frame mask and VAE latents), or None where in_dim == out_dim
        returns    [B, out_dim, F, H, W] fp32 flow prediction
        """
        cfg = self.config
        compute_dtype = self.patch_embedding.weight.dtype
        video = (latent if condition is None else torch.cat([latent, condition], dim=1)).to(compute_dtype)
        patches = self.patch_embedding(video)
        grid = tuple(patches.shape[2:])
        # Left in the compute dtype, as the official model leaves it: the first block's norm
        # rounds to it, and the first residual add makes the stream fp32 from there on.
        tokens = patches.flatten(2).transpose(1, 2)

        # Embedded once per sample, or once per latent frame (not once per token, as the official
        # model does): [B, 1 or F, C] and [B, 1 or F, 6, C].
        time_embedding = self.time_embedding(sinusoidal_embedding(timestep.flatten(), cfg.freq_dim)).view(timestep.shape[0], -1, cfg.dim)
        time_modulation = self.time_projection(time_embedding).unflatten(2, (6, cfg.dim))
        context = self.text_embedding(context.to(compute_dtype))

        key = (grid, tokens.device)
        if key not in self.rope_cache:
            self.rope_cache[key] = rope_tables(grid, cfg.head_dim, tokens.device)
            while len(self.rope_cache) > ROPE_CACHE_SIZES:
                self.rope_cache.popitem(last=False)
        self.rope_cache.move_to_end(key)
        rope = self.rope_cache[key]
        tokens, rope, key_mask = self.sequence.scatter(tokens, rope)
        if timestep.dim() == 2:  # each token takes its frame's: the blocks' of this rank's tokens, the head's of all
            tokens_per_frame = grid[1] * grid[2]
            time_modulation = self.sequence.per_token(time_modulation, tokens_per_frame)
            time_embedding = time_embedding.repeat_interleave(tokens_per_frame, dim=1)
        tokens = self.sequence.gather(self.blocks(tokens, time_modulation, context, rope, key_mask))
        return self.unpatchify(self.head(tokens, time_embedding), grid)

    def block_stack(self) -> BlockStack:
        """The repeated blocks, which the transforms act on (FP8, fused kernels, compile, FSDP, streaming)."""
        return self.blocks

    def unpatchify(self, tokens, grid):
        pt, ph, pw = self.config.patch_size
        f, h, w = grid
        x = tokens.view(tokens.shape[0], f, h, w, pt, ph, pw, self.config.out_dim)
        return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(tokens.shape[0], self.config.out_dim, f * pt, h * ph, w * pw)


def pad_context(features: torch.Tensor, text_len: int) -> torch.Tensor:
    """[L, D] text features -> [text_len, D], zero rows after the real tokens (the official padding)."""
    return F.pad(features, (0, 0, 0, text_len - features.shape[0]))


def build_dit(model_dir: Path, *, dtype, adapt=None):
    """One expert's model on the meta device, its parameters in the dtypes they load in, and the
    checked tensor source of its weights (``adapt(source)``: the source to read instead, as in ``load_dit``)."""
    from wan_i2v.loading.checkpoint import cast_parameters, check_strict, safetensors_source

    config = DiTConfig.from_json_file(model_dir / "config.json")
    source = safetensors_source(model_dir)  # first: a missing file fails before any work
    if adapt is not None:
        source = adapt(source)
    with torch.device("meta"):
        model = DiT(config)
    check_strict(model, source)
    return cast_parameters(model, dtype, keeps_fp32), source


def load_dit(model_dir: Path, *, device, dtype, before_weights=None, adapt=None) -> DiT:
    """One expert from its official folder (config.json + safetensors, sharded or not).

    ``before_weights(model)``, if given, transforms the model while it is still on the meta device
    (with its parameters in the dtypes they load in): FSDP shards it there, so that each rank then
    reads only its own rows of each tensor. ``adapt(source)`` returns the tensor source to load
    from instead of the checkpoint's (LoRAs merged as they are read)."""
    from wan_i2v.loading.checkpoint import load_strict

    model, source = build_dit(model_dir, dtype=dtype, adapt=adapt)
    if before_weights is not None:
        before_weights(model)
    return load_strict(model, source, device=device, dtype=dtype, keep_fp32=keeps_fp32)
