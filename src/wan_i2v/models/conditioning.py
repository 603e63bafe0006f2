"""How the given frames condition the video: a strategy per model family, named by its spec (``models/spec.py``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KnownFrames:
    """The pixel frames a video is given before sampling, at the video's size, in [-1, 1]: ``frames[:, i]``
    is the video's frame ``positions[i]`` (a first frame; first and last; the context of an extension)."""

    frames: torch.Tensor  # [3, k, H, W]
    positions: tuple[int, ...]

    def __post_init__(self):
        if self.frames.shape[1] != len(self.positions):
            raise ValueError(f"{self.frames.shape[1]} known frames for {len(self.positions)} positions")

    @classmethod
    def first(cls, image: torch.Tensor) -> KnownFrames:
        """``image``: [3, H, W], the first frame."""
        return cls(image[:, None], (0,))

    def video(self, frame_num: int) -> torch.Tensor:
        """[3, frame_num, H, W]: the known frames in their places, black (zeros) elsewhere."""
        video = torch.zeros(3, frame_num, *self.frames.shape[2:], dtype=self.frames.dtype)
        video[:, list(self.positions)] = self.frames
        return video

    def mask(self, frame_num: int) -> torch.Tensor:
        """[frame_num] float: 1 at the known frames."""
        mask = torch.zeros(frame_num)
        mask[list(self.positions)] = 1
        return mask


class KnownFramesMask:
    """Wan2.2-I2V's: a mask that marks the known pixel frames, then the VAE latents of the video that has
    them in their places and black frames elsewhere. The mask has one channel per frame of the VAE's
    temporal stride; the first latent frame stands for one pixel frame, so its channels repeat it."""

    def condition(self, known: KnownFrames, frame_num: int, temporal_stride: int, encode: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``encode``: [3, F, H, W] video -> [C, F', H', W'] fp32 latents on the run device.
        -> the [temporal_stride + C, F', H', W'] condition."""
        latents = encode(known.video(frame_num))
        pixel_mask = known.mask(frame_num)
        per_channel = torch.cat([pixel_mask[:1].repeat(temporal_stride), pixel_mask[1:]]).view(-1, temporal_stride).T
        mask = per_channel[:, :, None, None].expand(-1, -1, *latents.shape[2:]).to(latents.device)
        return torch.cat([mask, latents])
