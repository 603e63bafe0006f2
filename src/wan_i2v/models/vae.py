"""The Wan2.1 video VAE (the VAE of Wan2.2-I2V-A14B), with the official parameter names.

The network is causal in time: every temporal convolution sees only the current and
earlier frames. Video goes through it in chunks (encode: the first frame alone, then one
latent frame's worth of frames at a time; decode: one latent frame at a time), and a
``CausalCache`` carries, for each temporal convolution, the last input frames of the
previous chunk, so that no chunk needs the whole video in memory.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from wan_i2v.loading.checkpoint import load_strict, read_config, torch_file_source
from wan_i2v.errors import WanError

VAE_CONFIG_FILE = "vae_config.json"

# Per-channel statistics of the latents (official Wan2_1_VAE); encode returns (mu - mean) / std.
LATENT_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
               0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
LATENT_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
              3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)

# Each temporal convolution -> its input frames at the end of the previous chunk.
CausalCache = dict[nn.Module, torch.Tensor]


@dataclass(frozen=True)
class VAEConfig:
    dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)  # the official spelling

    def __post_init__(self):
        for name in ("dim_mult", "attn_scales", "temperal_downsample"):  # JSON gives lists
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.z_dim != len(LATENT_MEAN):
            raise WanError(f"VAE z_dim is {self.z_dim}", f"the latent statistics are for z_dim {len(LATENT_MEAN)}")
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise WanError(
                f"VAE temperal_downsample has {len(self.temperal_downsample)} entries for {len(self.dim_mult)} stages",
                "it needs one entry per downsampling, len(dim_mult) - 1",
            )

    @classmethod
    def from_json_file(cls, path) -> VAEConfig:
        return read_config(cls, path, "VAE config")

    @property
    def frames_per_latent(self) -> int:
        return 2 ** sum(self.temperal_downsample)

    @property
    def pixels_per_latent(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def full_resolution_channels(self) -> int:
        """Channels of its stages at the video's full resolution (what its activations scale with)."""
        return self.dim

    # The decode's peak activations, in units of one latent frame's output frames at
    # ``full_resolution_channels`` (whole chunks, then frame by frame): measured on an H100 at 720P in
    # channels-last memory (bench/vae_decode.py), 7.1 GiB in bf16 and 14.2 GiB in fp32 for whole chunks.
    decode_units: ClassVar[tuple[float, float]] = (11.0, 8.5)

    def build(self) -> "WanVAE":
        return WanVAE(self)


class CausalModule(nn.Module):
    """A layer whose forward is ``forward(x, cache)``: it looks at frames of earlier chunks."""


class CausalSequential(nn.Sequential, CausalModule):
    """Layers in order; the causal ones also get the cache."""

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        for layer in self:
            x = layer(x, cache) if isinstance(layer, CausalModule) else layer(x)
        return x


def layout_of(x: torch.Tensor) -> torch.memory_format:
    """The memory format new tensors made from ``x`` should keep (channels-last on the GPU)."""
    if x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


class CausalConv3d(nn.Conv3d, CausalModule):
    """A 3D convolution over [B, C, T, H, W] whose outputs see only current and earlier frames.

    Instead of symmetric padding in time, the input is preceded by its last
    ``kernel - stride`` frames of the previous chunk (zeros before the first chunk), so
    chunked processing computes what one pass over the whole video would.
    Height and width keep their size.
    """

    def __init__(self, in_dim: int, out_dim: int, kernel_size=(3, 3, 3), stride=(1, 1, 1)):
        super().__init__(in_dim, out_dim, kernel_size, stride, padding=(0, kernel_size[1] // 2, kernel_size[2] // 2))
        self.context = kernel_size[0] - stride[0]

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        return self.convolve(self.padded_input(x, cache))

    def convolve(self, padded: torch.Tensor) -> torch.Tensor:
        return super().forward(padded)

    def padded_input(
        self, x: torch.Tensor, cache: CausalCache, prologue: Callable[[torch.Tensor, torch.Tensor], None] | None = None
    ) -> torch.Tensor:
        """The past frames followed by x, in one new tensor; the last frames are kept in ``cache``.

        ``prologue(x, out)``, if given, writes what the convolution is to read (the norm and
        SiLU of x, say) straight into that tensor: one activation and one copy fewer than
        computing it apart and concatenating, which is most of the decoder's memory traffic.
        """
        past = cache.get(self)
        shape = (*x.shape[:2], self.context + x.shape[2], *x.shape[3:])
        padded = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=layout_of(x))
        if past is None:
            padded[:, :, : self.context].zero_()
        else:
            padded[:, :, : self.context] = past
        if prologue is None:
            padded[:, :, self.context :] = x
        else:
            prologue(x, padded[:, :, self.context :])
        cache[self] = padded[:, :, -self.context :].clone()  # a copy, so the chunk can be freed
        return padded


class FrameConv2d(nn.Conv2d):
    """A 2D convolution applied to every frame of [B, C, T, H, W].

    Done as a 3D convolution with a kernel one frame deep, which gives the same result
    as folding time into the batch without transposing the video twice.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv3d(x, self.weight.unsqueeze(2), self.bias, (1, *self.stride), (0, *self.padding))


class RMSNorm(nn.Module):
    """Normalizes each pixel's channel vector to length sqrt(dim), then scales it per channel."""

    def __init__(self, dim: int, spatial_dims: int = 3):  # 3 for video [B, C, T, H, W], 2 for frames [N, C, H, W]
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, *[1] * spatial_dims))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1).mul_(self.scale).mul_(self.gamma)  # in place: decode memory is the limit

    def silu_into(self, x: torch.Tensor, out: torch.Tensor) -> None:
        """SiLU(forward(x)) written into ``out`` (on the CPU, SiLU into a strided ``out`` may differ in the
        last bit: its vectorized and scalar exp round differently)."""
        F.normalize(x, dim=1, out=out)
        F.silu(out.mul_(self.scale).mul_(self.gamma), inplace=True)


class ResidualBlock(CausalModule):
    """x + two (norm, SiLU, causal 3x3x3 conv) steps; a 1x1x1 conv matches the channels of x."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.residual = CausalSequential(
            RMSNorm(in_dim), nn.SiLU(inplace=True), CausalConv3d(in_dim, out_dim),
            RMSNorm(out_dim), nn.SiLU(inplace=True),
            nn.Identity(),  # the official model's dropout (p=0); keeps the parameter names' indices
            CausalConv3d(out_dim, out_dim),
        )  # fmt: skip
        self.shortcut = nn.Conv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        # What self.residual computes, with each norm and SiLU written into its convolution's padded
        # input, and the first convolution's output freed before the second convolution runs.
        norm1, _, conv1, norm2, _, _, conv2 = self.residual
        h = conv1.convolve(conv1.padded_input(x, cache, norm1.silu_into))
        padded = conv2.padded_input(h, cache, norm2.silu_into)
        del h
        return conv2.convolve(padded).add_(self.shortcut(x))


class NormSiLUConv(CausalSequential):
    """RMSNorm, SiLU, causal convolution (the decoder's and encoder's head), the norm and SiLU
    written into the convolution's padded input as in ResidualBlock."""

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        norm, _, conv = self
        return conv.convolve(conv.padded_input(x, cache, norm.silu_into))


class AttentionBlock(nn.Module):
    """Single-head self-attention among the pixels of each frame; frames do not see each other."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, spatial_dims=2)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        frames = x.transpose(1, 2).reshape(b * t, c, h, w)
        qkv = self.to_qkv(self.norm(frames)).view(b * t, 1, 3 * c, h * w)
        q, k, v = qkv.transpose(2, 3).contiguous().chunk(3, dim=-1)
        out = F.scaled_dot_product_attention(q, k, v)  # [b*t, 1, h*w, c]
        out = self.proj(out.squeeze(1).transpose(1, 2).reshape(b * t, c, h, w))
        return x + out.view(b, t, c, h, w).transpose(1, 2)


class Resample(CausalModule):
    """Halves (``up=False``) or doubles height and width; with ``temporal`` also the frame count.

    Upsampling halves the channels unless ``out_dim`` says otherwise. The first chunk (the first frame alone) passes through
    without temporal resampling, so T frames map to 1 + (T - 1) * 2 and back.
    """

    def __init__(self, dim: int, *, up: bool, temporal: bool, out_dim: int | None = None):
        super().__init__()
        self.up, self.temporal = up, temporal
        if up:
            self.resample = nn.Sequential(
                nn.Upsample(scale_factor=(1.0, 2.0, 2.0), mode="nearest-exact"),
                FrameConv2d(dim, dim // 2 if out_dim is None else out_dim, 3, padding=1),
            )
        else:  # pad right and bottom only, as the official model does
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), FrameConv2d(dim, dim, 3, stride=2))
        if temporal and up:  # each frame becomes two, stacked in the output channels
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1))
        elif temporal:
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        if self.temporal and self.up:  # time first: the frames are still small
            x = self._resample_time(x, cache)
        x = self._upsample_frame_by_frame(x) if self.up else self.resample(x)
        if self.temporal and not self.up:
            x = self._resample_time(x, cache)
        return x

    def _upsample_frame_by_frame(self, x: torch.Tensor) -> torch.Tensor:
        # A frame upsampled before its convolution holds 4x the pixels in all the input channels:
        # the decoder's largest tensor (1.4 GB for 4 frames at 720P in bf16). Frames are
        # independent here, so it is made for one frame at a time.
        if x.shape[2] == 1:
            return self.resample(x)
        out = None
        for t in range(x.shape[2]):
            frame = self.resample(x[:, :, t : t + 1])
            if out is None:
                shape = (*frame.shape[:2], x.shape[2], *frame.shape[3:])
                out = torch.empty(shape, dtype=frame.dtype, device=frame.device, memory_format=layout_of(frame))
            out[:, :, t : t + 1] = frame
        return out

    def _resample_time(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        conv = self.time_conv
        if conv not in cache:  # the first chunk, the first frame alone: passed through
            # Downsampling keeps that frame as the past of the next chunk; upsampling
            # starts its past with zeros, as the official model does.
            if self.up:
                cache[conv] = x.new_zeros(*x.shape[:2], conv.context, *x.shape[3:])
            else:
                cache[conv] = x[:, :, -conv.context :].clone()
            return x
        x = conv(x, cache)
        if self.up:  # [B, (2, C), T, H, W] -> [B, C, (T, 2), H, W]
            b, c2, t, h, w = x.shape
            x = x.view(b, 2, c2 // 2, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c2 // 2, t * 2, h, w)
        return x


def _stage(in_dim: int, out_dim: int, num_blocks: int, attention: bool, resample: Resample | None) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for _ in range(num_blocks):
        layers.append(ResidualBlock(in_dim, out_dim))
        if attention:
            layers.append(AttentionBlock(out_dim))
        in_dim = out_dim
    return layers + ([resample] if resample else [])


def _middle(dim: int) -> CausalSequential:
    return CausalSequential(ResidualBlock(dim, dim), AttentionBlock(dim), ResidualBlock(dim, dim))


def _head(dim: int, out_dim: int) -> NormSiLUConv:
    return NormSiLUConv(RMSNorm(dim), nn.SiLU(inplace=True), CausalConv3d(dim, out_dim))


def _encoder(config: VAEConfig) -> CausalSequential:
    """Video [B, 3, T, H, W] -> mean and log-variance [B, 2 * z_dim, T', H / 8, W / 8]."""
    dims = [config.dim * m for m in (1, *config.dim_mult)]
    layers, scale = [], 1.0  # scale: frame size relative to the input, which attn_scales selects by
    for stage, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
        last = stage == len(config.dim_mult) - 1
        down = None if last else Resample(out_dim, up=False, temporal=config.temperal_downsample[stage])
        layers += _stage(in_dim, out_dim, config.num_res_blocks, scale in config.attn_scales, down)
        scale /= 2
    return CausalSequential(OrderedDict(
        conv1=CausalConv3d(3, dims[0]),
        downsamples=CausalSequential(*layers),
        middle=_middle(dims[-1]),
        head=_head(dims[-1], config.z_dim * 2),
    ))  # fmt: skip


def _decoder(config: VAEConfig) -> CausalSequential:
    """Latents [B, z_dim, T', h, w] -> video [B, 3, T, 8h, 8w]; the mirror image of the encoder."""
    dims = [config.dim * m for m in (config.dim_mult[-1], *config.dim_mult[::-1])]
    temporal = config.temperal_downsample[::-1]
    layers, scale = [], 1.0 / 2 ** (len(config.dim_mult) - 2)  # the official start, one stage off the encoder's
    for stage, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
        if stage > 0:
            in_dim //= 2  # the previous stage's upsampling halved the channels
        last = stage == len(config.dim_mult) - 1
        up = None if last else Resample(out_dim, up=True, temporal=temporal[stage])
        layers += _stage(in_dim, out_dim, config.num_res_blocks + 1, scale in config.attn_scales, up)
        scale *= 2
    return CausalSequential(OrderedDict(
        conv1=CausalConv3d(config.z_dim, dims[0]),
        middle=_middle(dims[0]),
        upsamples=CausalSequential(*layers),
        head=_head(dims[-1], 3),
    ))  # fmt: skip


class WanVAE(nn.Module):
    """Video <-> normalized latents. Runs in the dtype of its weights; results are float32."""

    latent_mean, latent_std = LATENT_MEAN, LATENT_STD

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = _encoder(config)
        self.conv1 = nn.Conv3d(config.z_dim * 2, config.z_dim * 2, 1)  # -> mean and log-variance
        self.conv2 = nn.Conv3d(config.z_dim, config.z_dim, 1)
        self.decoder = _decoder(config)

    def to_channels_last(self) -> "WanVAE":
        """3D convolution weights, and so the activations, in channels-last (NDHWC) memory. On a
        GPU cuDNN then skips its layout conversions: at 720P the bf16 decode peaks at 7.7 instead of
        9.4 GiB, and decodes frame by frame 13% faster (docs/benchmarks.md)."""
        for module in self.modules():
            if isinstance(module, nn.Conv3d):
                module.weight.data = module.weight.data.contiguous(memory_format=torch.channels_last_3d)
        return self

    def encode_in(self, dtype: torch.dtype) -> "WanVAE":
        """Run the encoder, and only it, in ``dtype`` (the latents still come out in fp32)."""
        self.encoder.to(dtype)
        self.conv1.to(dtype)
        return self

    def decode_in(self, dtype: torch.dtype) -> "WanVAE":
        """Run the decoder, and only it, in ``dtype``: bf16 decodes in about half the time and memory
        of fp32 at a relative difference of ~1e-2, while the encode of the image stays as it was."""
        self.conv2.to(dtype)
        self.decoder.to(dtype)
        return self

    def _latent_stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and 1/std, shaped to broadcast over [B, z_dim, T, H, W]; 1/std as the official code has it."""
        mean = torch.tensor(self.latent_mean, dtype=torch.float32, device=device).view(1, -1, 1, 1, 1)
        std = torch.tensor(self.latent_std, dtype=torch.float32, device=device).view(1, -1, 1, 1, 1)
        return mean, 1.0 / std

    @torch.no_grad()
    def encode(self, video: torch.Tensor, progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """Video [B, 3, F, H, W] in [-1, 1], F = 4n + 1 -> the latents' means, normalized, float32.
        ``progress(done, total)`` is called after each latent frame."""
        step, pixels = self.config.frames_per_latent, self.config.pixels_per_latent
        frames, height, width = video.shape[2:]
        if video.shape[1] != 3 or (frames - 1) % step or height % pixels or width % pixels:
            raise ValueError(
                f"video of shape {tuple(video.shape)}: want [B, 3, {step}n+1 frames, H and W multiples of {pixels}]"
            )
        video = self.encoder_input(video)
        cache: CausalCache = {}
        encoded = []
        for start, end in self.encoder_chunks(frames):
            encoded.append(self.encoder(video[:, :, start:end], cache))
            if progress is not None:
                progress(len(encoded), frames // step + 1)
        return self.latents_of(torch.cat(encoded, dim=2))

    def encoder_input(self, video: torch.Tensor) -> torch.Tensor:
        return video.to(self.conv1.weight.dtype).contiguous(memory_format=layout_of(self.encoder.conv1.weight))

    def encoder_chunks(self, frames: int) -> list[tuple[int, int]]:
        """The frames the encoder takes at a time, as the official code chunks them: the first alone, then 4 by 4."""
        step = self.config.frames_per_latent
        return [(0, 1)] + [(i, i + step) for i in range(1, frames, step)]

    def encoder_stages(self) -> tuple[CausalSequential, CausalSequential]:
        """The encoder in two parts: the downsampling, local in space (it can run on a tile), and
        the middle block, whose attention needs whole frames, with the head."""
        return CausalSequential(self.encoder.conv1, self.encoder.downsamples), CausalSequential(self.encoder.middle, self.encoder.head)

    def latents_of(self, encoded: torch.Tensor) -> torch.Tensor:
        """The encoder's output -> the latents' means, normalized, float32."""
        moments = self.conv1(encoded)
        mean, inv_std = self._latent_stats(encoded.device)
        return (moments[:, : self.config.z_dim].float() - mean) * inv_std

    @torch.no_grad()
    def decode(
        self,
        latents: torch.Tensor,
        progress: Callable[[int, int], None] | None = None,
        frame_by_frame: bool = False,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Normalized latents [B, z_dim, f, h, w] -> video [B, 3, 4(f-1)+1, 8h, 8w] in [-1, 1], float32.

        ``progress(done, total)`` is called after each latent frame. ``frame_by_frame`` runs the
        stages after the last temporal upsampling one output frame at a time: the same result
        (the causal cache makes it exact) with the largest activations a quarter of the size,
        ~20% slower (``whole_decode_bytes`` says what the whole frames need). ``out``, a
        float32 tensor of the video's shape on any device (host memory, say), receives the frames
        as they are decoded, so the whole video never has to fit beside the decoder's activations.
        """
        if out is not None and (tuple(out.shape) != self.video_shape(latents.shape) or out.dtype != torch.float32):
            raise ValueError(f"out is {out.dtype} {tuple(out.shape)}: want float32 {self.video_shape(latents.shape)}")
        x = self.decoder_input(latents)
        whole_frames, to_last_temporal, to_pixels = self.decoder_stages()
        cache: CausalCache = {}
        total = x.shape[2]
        frame = 0
        for i in range(total):
            coarse = to_last_temporal(whole_frames(x[:, :, i : i + 1], cache), cache)
            chunk = 1 if frame_by_frame else coarse.shape[2]
            for j in range(0, coarse.shape[2], chunk):
                pixels = to_pixels(coarse[:, :, j : j + chunk], cache).clamp_(-1, 1)
                if out is None:
                    out = pixels.new_empty(self.video_shape(latents.shape), dtype=torch.float32)
                out[:, :, frame : frame + pixels.shape[2]] = pixels
                frame += pixels.shape[2]
            if progress is not None:
                progress(i + 1, total)
        return out

    def video_shape(self, latent_shape: tuple[int, ...]) -> tuple[int, ...]:
        """[B, z_dim, f, h, w] -> the decoded video's [B, 3, 4(f-1)+1, 8h, 8w] (for the real VAE)."""
        batch, _, frames, height, width = latent_shape
        pixels = self.config.pixels_per_latent
        return (batch, 3, 1 + (frames - 1) * self.config.frames_per_latent, height * pixels, width * pixels)

    def decoder_input(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalized latents -> what the decoder takes: de-normalized as the official code does, then conv2."""
        mean, inv_std = self._latent_stats(latents.device)
        x = self.conv2((latents.float() / inv_std + mean).to(self.conv2.weight.dtype))
        return x.contiguous(memory_format=layout_of(self.decoder.conv1.weight))

    def decoder_stages(self) -> tuple[CausalSequential, CausalSequential, CausalSequential]:
        """The decoder in three parts: the start that needs whole frames (conv1, and the middle block
        with its per-frame attention), the rest up to the last temporal upsampling, and from there to
        pixels, which can run one output frame (or one tile) at a time."""
        upsamples = self.decoder.upsamples
        split = 1 + max((i for i, layer in enumerate(upsamples) if isinstance(layer, Resample) and layer.temporal), default=-1)
        return (
            CausalSequential(self.decoder.conv1, self.decoder.middle),
            CausalSequential(*upsamples[:split]),
            CausalSequential(*upsamples[split:], self.decoder.head),
        )

    def whole_decode_bytes(self, latent_shape: tuple[int, ...]) -> int:
        """The activations of a decode of whole frames (not ``frame_by_frame``) of ``latent_shape``
        latents, in the decoder's dtype."""
        height, width = (side * self.config.pixels_per_latent for side in latent_shape[3:])
        unit = self.config.frames_per_latent * self.config.full_resolution_channels * height * width * self.conv2.weight.element_size()
        return int(self.config.decode_units[0] * unit)


def load_vae(path: Path, *, device: torch.device | str, dtype: torch.dtype, config_class=VAEConfig) -> WanVAE:
    """The VAE from an official ``Wan2.1_VAE.pth`` (another VAE's with its ``config_class``); a
    ``vae_config.json`` beside it overrides the config."""
    path = Path(path)
    source = torch_file_source(path, "VAE weights")
    config_path = path.parent / VAE_CONFIG_FILE
    config = config_class.from_json_file(config_path) if config_path.is_file() else config_class()
    with torch.device("meta"):
        model = config.build()
    load_strict(model, source, device=device, dtype=dtype)
    return model
