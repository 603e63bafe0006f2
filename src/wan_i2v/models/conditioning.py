"""How the image conditions the video: a strategy per model family, named by its spec (``models/spec.py``)."""

from __future__ import annotations

from collections.abc import Callable

import torch


class FirstFrameMask:
    """Wan2.2-I2V's: the VAE latents of the first frame followed by black frames, after a mask that
    marks the first frame as given (one mask channel per frame of the VAE's temporal stride)."""

    def condition(self, first: torch.Tensor, frame_num: int, temporal_stride: int, encode: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``first``: the [3, H, W] first frame in [-1, 1]; ``encode``: [3, F, H, W] video -> [C, F', H', W']
        fp32 latents on the run device. -> the [temporal_stride + C, F', H', W'] condition."""
        video = torch.cat([first[:, None], torch.zeros(3, frame_num - 1, *first.shape[1:])], dim=1)
        latents = encode(video)
        mask = torch.zeros(temporal_stride, *latents.shape[1:], device=latents.device)
        mask[:, 0] = 1
        return torch.cat([mask, latents])
