"""The VAE decode split over ranks, exact: every rank runs the decoder's start on whole latent
frames, then its own spatial tile, with a halo, through the upsampling stages.

Why spatial tiles and not time chunks. Time chunks would be exact only with a warm-up: the
causal decoder's temporal receptive field is finite, but it is long. Each 3-frame causal
convolution looks 2 frames back at its own frame rate; the real decoder has 12 of them at the
latent rate (conv1, the middle block, stage 0 and its time upsampler), 7 at twice it and 13 at
four times it: 24 + 7 + 6.5 = 37.5, so a rank would need to re-decode the preceding 38 latent
frames (``tests/test_parallel.py`` measures it), more than the 21 of an 81-frame video: every rank would decode
(almost) everything. Nor is a shorter, inexact warm-up close: with 8 frames the first frames of a
chunk are still off by ~1 (on a [-1, 1] scale).

Spatial tiles are exact where the decoder is local in space. Its one global operation, the
attention over each frame's pixels, is in the middle block, at latent resolution: every rank
runs ``conv1`` and ``middle`` on whole frames (a few percent of the work), then cuts its tile
along the longer side with a halo as wide as the spatial receptive field of the rest
(``spatial_halo``: 13 latent pixels for the real decoder) and runs the upsampling stages and the
head on it alone. The causal cache of the tile is kept per rank; it never mixes tiles. Each
latent frame's tiles are gathered on rank 0 as they are made.

Measured (bench-like run on the CPU, real decoder depth at 1/6 of its channels, one 720P latent
frame; compute only): the slowest rank takes 1/1.68 of the single decode on 2 ranks, 1/2.34 on 4,
1/4.14 on 8. The halo is what keeps it from N: 13 of 160 latent columns on each inner side.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from wan_i2v.models.vae import AttentionBlock, CausalCache, WanVAE, layout_of


def _footprint(layers, where: str) -> tuple[float, float]:
    """How far, in the input's pixels, an output pixel of ``layers`` sees to each side, and how many
    input pixels it stands for per side: each convolution adds its kernel's half at the resolution
    it runs at (a stride-2 one also its one pixel of right and bottom padding), upsampling and
    striding change that resolution."""
    reach, scale = 0.0, 1.0  # scale: input pixels per pixel at the current layer
    for module in [module for layer in layers for module in layer.modules()]:
        if isinstance(module, AttentionBlock):
            raise ValueError(f"this VAE has attention {where}: spatial tiles would not be exact")
        if isinstance(module, nn.Upsample):
            scale /= module.scale_factor[-1]
        elif isinstance(module, (nn.Conv2d, nn.Conv3d)):
            stride = module.stride[-1]
            reach += (module.kernel_size[-1] // 2 + (stride > 1)) * scale
            scale *= stride
    return reach, scale


def spatial_halo(vae: WanVAE) -> int:
    """Latent pixels of context a tile needs on each side for the decoder after its middle block."""
    return math.ceil(_footprint([vae.decoder.upsamples, vae.decoder.head], "after its middle block")[0])


def tiles(size: int, parts: int) -> list[tuple[int, int]]:
    """[start, end) of ``parts`` near-equal spans of ``size`` (empty ones where size < parts)."""
    return [(i * size // parts, (i + 1) * size // parts) for i in range(parts)]


def _my_tile(shape: torch.Size, columns: int, ranks: int, me: int) -> tuple[int, list[tuple[int, int]], int, int]:
    """The axis to tile ([B, C, T, H, W]: the longer side), every rank's span of its ``columns``, and
    this rank's (start, end): a dummy last column where there are more ranks than columns, so that
    the collectives stay uniform."""
    axis = 3 if shape[3] > shape[4] else 4
    spans = tiles(columns, ranks)
    start, end = spans[me]
    if end == start:
        start, end = columns - 1, columns
    return axis, spans, start, end


def _padded(x: torch.Tensor, axis: int, width: int) -> torch.Tensor:
    """``x`` zero-padded along ``axis`` to ``width``: every rank sends a tile of one size."""
    return F.pad(x, [0, 0] * (4 - axis) + [0, width - x.shape[axis]]).contiguous()


def _joined(parts: list[torch.Tensor], spans: list[tuple[int, int]], axis: int, per_column: int) -> torch.Tensor:
    """The gathered tiles, their padding cut off, side by side."""
    return torch.cat([part.narrow(axis, 0, (end - start) * per_column) for part, (start, end) in zip(parts, spans)], dim=axis)


@torch.no_grad()
def decode_tiled(
    vae: WanVAE, latents: torch.Tensor, group, progress: Callable[[int, int], None] | None = None,
    on_frames: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor | None:  # fmt: skip
    """``WanVAE.decode`` of [B, z, f, h, w] split over ``group``: the video (float32, on the CPU) on
    the group's rank 0, None on the others. ``progress(done, total)`` after each latent frame; on
    rank 0, ``on_frames`` gets each latent frame's [3, n, H, W] frames of the first video as they come."""
    ranks, me = dist.get_world_size(group), dist.get_rank(group)
    up = vae.config.pixels_per_latent
    size = max(latents.shape[3], latents.shape[4])
    axis, spans, start, end = _my_tile(latents.shape, size, ranks, me)
    halo = spatial_halo(vae)
    lo, hi = max(0, start - halo), min(size, end + halo)
    width = max(e - s for s, e in spans) * up  # every rank sends this much, zero-padded

    # As WanVAE.decode does: after the last temporal upsampling, one video frame at a time.
    whole_frames, per_latent, per_frame = vae.decoder_stages()
    x = vae.decoder_input(latents)
    cache: CausalCache = {}
    total, frames = x.shape[2], []
    for i in range(total):
        whole = whole_frames(x[:, :, i : i + 1], cache)
        coarse = per_latent(whole.narrow(axis, lo, hi - lo), cache)
        out = torch.cat([per_frame(coarse[:, :, j : j + 1], cache).float().clamp_(-1, 1) for j in range(coarse.shape[2])], dim=2)
        padded = _padded(out.narrow(axis, (start - lo) * up, (end - start) * up), axis, width)
        parts = [torch.empty_like(padded) for _ in range(ranks)] if me == 0 else None
        dist.gather(padded, parts, group_dst=0, group=group)
        if me == 0:  # to the host at once: the whole video need not fit on the GPU as well
            frames.append(_joined(parts, spans, axis, up).cpu())
            if on_frames is not None:
                on_frames(frames[-1][0])
        if progress is not None:
            progress(i + 1, total)
    return torch.cat(frames, dim=2) if me == 0 else None


def _encoder_tiling(vae: WanVAE) -> tuple[int, int]:
    """The encoder input's pixels per latent pixel (the Wan2.2 VAE's input is its video folded 2x2
    into channels: 8, not 16) and the halo of them a tile needs on each side for the downsampling
    stages, rounded up to whole latent pixels (so that every tile's stride-2 grids fall where the
    whole frame's do)."""
    reach, per_latent = _footprint([vae.encoder.conv1, vae.encoder.downsamples], "before its middle block")
    per_latent = round(per_latent)
    return per_latent, math.ceil(reach / per_latent) * per_latent


def encoder_halo(vae: WanVAE) -> int:
    """Pixels of the encoder's input a tile needs on each side (see ``_encoder_tiling``)."""
    return _encoder_tiling(vae)[1]


@torch.no_grad()
def encode_tiled(vae: WanVAE, video: torch.Tensor, group, progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """``WanVAE.encode`` of [B, 3, F, H, W] split over ``group``; every rank gets the latents. Each
    rank runs the downsampling stages on its own tile of the frames (with a halo of
    ``encoder_halo`` pixels), the tiles are gathered at latent size, and every rank runs the middle
    block (its attention needs whole frames) and the head on them: a few percent of the work."""
    ranks, me = dist.get_world_size(group), dist.get_rank(group)
    per_latent, halo = _encoder_tiling(vae)
    inputs = vae.encoder_input(video)
    size = max(inputs.shape[3], inputs.shape[4]) // per_latent  # in latent columns
    axis, spans, start, end = _my_tile(inputs.shape, size, ranks, me)
    lo, hi = max(0, start * per_latent - halo), min(size * per_latent, end * per_latent + halo)
    width = max(e - s for s, e in spans)  # latent columns every rank sends, zero-padded
    tile = inputs.narrow(axis, lo, hi - lo)
    downsampling, rest = vae.encoder_stages()
    cache: CausalCache = {}
    chunks, encoded = vae.encoder_chunks(video.shape[2]), []
    for first, last in chunks:
        features = downsampling(tile[:, :, first:last], cache)
        padded = _padded(features.narrow(axis, start - lo // per_latent, end - start), axis, width)
        parts = [torch.empty_like(padded) for _ in range(ranks)]
        dist.all_gather(parts, padded, group=group)
        whole = _joined(parts, spans, axis, 1)
        encoded.append(rest(whole.contiguous(memory_format=layout_of(features)), cache))
        if progress is not None:
            progress(len(encoded), len(chunks))
    return vae.latents_of(torch.cat(encoded, dim=2))
