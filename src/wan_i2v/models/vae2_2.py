"""The Wan2.2 video VAE (the VAE of Wan2.2-TI2V-5B), with the official parameter names.

It compresses 4x16x16 into 48 channels: the video is first folded 2x2 in space into 12 channels
(``patchify``), then goes through the Wan2.1 VAE's causal blocks (``models/vae.py``, whose chunking
and ``CausalCache`` it shares), each stage of which adds a parameter-free shortcut: an average over
the pixels a downsampling merges, or a copy into the pixels an upsampling makes.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from wan_i2v.errors import WanError
from wan_i2v.loading.checkpoint import read_config
from wan_i2v.models.vae import CausalCache, CausalConv3d, CausalModule, CausalSequential, Resample, ResidualBlock, WanVAE, _head, _middle
from wan_i2v.models import vae as wan21

# Per-channel statistics of the latents (official Wan2_2_VAE); encode returns (mu - mean) / std.
LATENT_MEAN = (-0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813, 0.0891,
               0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
               -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313, -0.1649, 0.0117, 0.0723,
               -0.2839, -0.2083, -0.0520, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667)  # fmt: skip
LATENT_STD = (0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
              0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
              0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
              0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744)  # fmt: skip
PATCH = 2  # pixels folded into channels per side before the encoder (and unfolded after the decoder)


@dataclass(frozen=True)
class VAE22Config:
    """The official Wan2_2_VAE's shape by default (the encoder's width ``dim``, the decoder's ``dec_dim``)."""

    dim: int = 160
    dec_dim: int = 256
    z_dim: int = 48
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temperal_downsample: tuple[bool, ...] = (False, True, True)  # the official spelling

    def __post_init__(self):
        for name in ("dim_mult", "temperal_downsample"):  # JSON gives lists
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.z_dim != len(LATENT_MEAN):
            raise WanError(f"VAE z_dim is {self.z_dim}", f"the Wan2.2 VAE's latent statistics are for z_dim {len(LATENT_MEAN)}")
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise WanError(
                f"VAE temperal_downsample has {len(self.temperal_downsample)} entries for {len(self.dim_mult)} stages",
                "it needs one entry per downsampling, len(dim_mult) - 1",
            )

    @classmethod
    def from_json_file(cls, path) -> "VAE22Config":
        return read_config(cls, path, "VAE config")

    @property
    def frames_per_latent(self) -> int:
        return 2 ** sum(self.temperal_downsample)

    @property
    def pixels_per_latent(self) -> int:
        return PATCH * 2 ** (len(self.dim_mult) - 1)

    @property
    def full_resolution_channels(self) -> int:
        """As ``VAEConfig``'s: its outermost stages run at half the resolution (the 2x2 fold), the
        decoder's (the wider) with ``dec_dim`` channels, a quarter of that per full-resolution pixel."""
        return self.dec_dim // (PATCH * PATCH)

    # As ``VAEConfig.decode_units``. Whole chunks: 14.2 from a 50-step 720P video on one H200 (its
    # 24.2 GiB peak less the weights the planner counts; docs/benchmarks.md); frame by frame: that
    # scaled by the ratio of the two measured on the CPU in fp32 (0.77 and 0.84 in two runs of
    # bench/vae_units.py: 0.80). Not yet measured on a GPU.
    decode_units: ClassVar[tuple[float, float]] = (14.2, 11.4)

    def build(self) -> "WanVAE22":
        return WanVAE22(self)


def patchify(video: torch.Tensor) -> torch.Tensor:
    """[B, C, F, 2H, 2W] -> [B, 4C, F, H, W], channels in the official (c, w offset, h offset) order."""
    b, c, f, h, w = video.shape
    x = video.view(b, c, f, h // PATCH, PATCH, w // PATCH, PATCH)
    return x.permute(0, 1, 6, 4, 2, 3, 5).reshape(b, c * PATCH * PATCH, f, h // PATCH, w // PATCH)


class Unpatchify(nn.Module):
    """The inverse of ``patchify``: [B, 4C, F, H, W] -> [B, C, F, 2H, 2W]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c4, f, h, w = x.shape
        x = x.view(b, c4 // (PATCH * PATCH), PATCH, PATCH, f, h, w)
        return x.permute(0, 1, 4, 5, 3, 6, 2).reshape(b, c4 // (PATCH * PATCH), f, h * PATCH, w * PATCH)


class AverageDown(nn.Module):
    """The downsampling stage's shortcut: each output channel is the mean of a group of the input's
    channels and the pixels (and frames) merged into one; a chunk of an odd frame count is preceded
    by zero frames, as the official AvgDown3D does."""

    def __init__(self, in_dim: int, out_dim: int, factor_t: int, factor_s: int):
        super().__init__()
        self.out_dim, self.factor_t, self.factor_s = out_dim, factor_t, factor_s
        self.group = in_dim * factor_t * factor_s * factor_s // out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (0, 0, 0, 0, (-x.shape[2]) % self.factor_t, 0))
        b, c, t, h, w = x.shape
        ft, fs = self.factor_t, self.factor_s
        x = x.view(b, c, t // ft, ft, h // fs, fs, w // fs, fs).permute(0, 1, 3, 5, 7, 2, 4, 6)
        return x.reshape(b, self.out_dim, self.group, t // ft, h // fs, w // fs).mean(dim=2)


class DuplicateUp(nn.Module):
    """The upsampling stage's shortcut: each input channel copied into the pixels (and frames) it
    becomes; of the first chunk's frames only the last is kept, as the main path keeps one."""

    def __init__(self, in_dim: int, out_dim: int, factor_t: int, factor_s: int):
        super().__init__()
        self.out_dim, self.factor_t, self.factor_s = out_dim, factor_t, factor_s
        self.repeats = out_dim * factor_t * factor_s * factor_s // in_dim

    def forward(self, x: torch.Tensor, first_chunk: bool) -> torch.Tensor:
        b, _, t, h, w = x.shape
        ft, fs = self.factor_t, self.factor_s
        x = x.repeat_interleave(self.repeats, dim=1).view(b, self.out_dim, ft, fs, fs, t, h, w)
        x = x.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, self.out_dim, t * ft, h * fs, w * fs)
        return x[:, :, ft - 1 :] if first_chunk else x


class DownStage(CausalModule):
    """Residual blocks then a downsampling (but for the last stage), plus the averaging shortcut."""

    def __init__(self, in_dim: int, out_dim: int, num_blocks: int, temporal: bool, down: bool):
        super().__init__()
        blocks = [ResidualBlock(in_dim if i == 0 else out_dim, out_dim) for i in range(num_blocks)]
        if down:
            blocks.append(Resample(out_dim, up=False, temporal=temporal))
        self.downsamples = CausalSequential(*blocks)
        self.avg_shortcut = AverageDown(in_dim, out_dim, 2 if temporal else 1, 2 if down else 1)

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        return self.downsamples(x, cache) + self.avg_shortcut(x)


class UpStage(CausalModule):
    """Residual blocks then an upsampling that keeps the channels (but for the last stage), plus the copying shortcut."""

    def __init__(self, in_dim: int, out_dim: int, num_blocks: int, temporal: bool, up: bool):
        super().__init__()
        blocks = [ResidualBlock(in_dim if i == 0 else out_dim, out_dim) for i in range(num_blocks)]
        if up:
            blocks.append(Resample(out_dim, up=True, temporal=temporal, out_dim=out_dim))
        self.upsamples = CausalSequential(*blocks)
        self.avg_shortcut = DuplicateUp(in_dim, out_dim, 2 if temporal else 1, 2) if up else None
        self.temporal = up and temporal

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        # The first chunk is the one the temporal upsampling has not seen yet (it passes it through as one frame).
        first_chunk = self.temporal and self.upsamples[-1].time_conv not in cache
        out = self.upsamples(x, cache)
        return out if self.avg_shortcut is None else out + self.avg_shortcut(x, first_chunk)


def _encoder(config: VAE22Config) -> CausalSequential:
    """Folded video [B, 12, T, H/2, W/2] -> mean and log-variance [B, 2 * z_dim, T', H/16, W/16]."""
    dims = [config.dim * m for m in (1, *config.dim_mult)]
    last = len(config.dim_mult) - 1
    stages = [
        DownStage(in_dim, out_dim, config.num_res_blocks, stage < last and config.temperal_downsample[stage], stage < last)
        for stage, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:]))
    ]
    return CausalSequential(OrderedDict(
        conv1=CausalConv3d(3 * PATCH * PATCH, dims[0]),
        downsamples=CausalSequential(*stages),
        middle=_middle(dims[-1]),
        head=_head(dims[-1], config.z_dim * 2),
    ))  # fmt: skip


def _decoder(config: VAE22Config) -> CausalSequential:
    """Latents [B, z_dim, T', h, w] -> folded video [B, 12, T, 8h, 8w]; the mirror image of the encoder."""
    dims = [config.dec_dim * m for m in (config.dim_mult[-1], *config.dim_mult[::-1])]
    temporal = config.temperal_downsample[::-1]
    last = len(config.dim_mult) - 1
    stages = [
        UpStage(in_dim, out_dim, config.num_res_blocks + 1, stage < last and temporal[stage], stage < last)
        for stage, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:]))
    ]
    return CausalSequential(OrderedDict(
        conv1=CausalConv3d(config.z_dim, dims[0]),
        middle=_middle(dims[0]),
        upsamples=CausalSequential(*stages),
        head=_head(dims[-1], 3 * PATCH * PATCH),
    ))  # fmt: skip


class WanVAE22(WanVAE):
    """Video <-> normalized latents, 4x16x16 with 48 channels; chunked, cast and split as ``WanVAE``."""

    latent_mean, latent_std = LATENT_MEAN, LATENT_STD

    def __init__(self, config: VAE22Config):
        nn.Module.__init__(self)
        self.config = config
        self.encoder = _encoder(config)
        self.conv1 = nn.Conv3d(config.z_dim * 2, config.z_dim * 2, 1)  # -> mean and log-variance
        self.conv2 = nn.Conv3d(config.z_dim, config.z_dim, 1)
        self.decoder = _decoder(config)

    def encoder_input(self, video: torch.Tensor) -> torch.Tensor:
        return super().encoder_input(patchify(video))

    def decoder_stages(self) -> tuple[CausalSequential, CausalSequential, CausalSequential]:
        """As ``WanVAE``'s, split after the last stage that upsamples in time; the last part unfolds the pixels."""
        stages = self.decoder.upsamples
        split = 1 + max((i for i, stage in enumerate(stages) if stage.temporal), default=-1)
        return (
            CausalSequential(self.decoder.conv1, self.decoder.middle),
            CausalSequential(*stages[:split]),
            CausalSequential(*stages[split:], self.decoder.head, Unpatchify()),
        )


load_vae = functools.partial(wan21.load_vae, config_class=VAE22Config)
