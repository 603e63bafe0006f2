"""How the given frames condition the video: a strategy per model family, named by its spec (``models/spec.py``)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from wan_i2v.errors import WanError


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

    @classmethod
    def first_and_last(cls, first: torch.Tensor, last: torch.Tensor, frame_num: int) -> KnownFrames:
        """``first``, ``last``: [3, H, W], the first and the last frame of a video of ``frame_num`` frames."""
        return cls(torch.stack([first, last], dim=1), (0, frame_num - 1))

    def sha256(self) -> str:
        """Of the frames' values and positions: what a saved state of a run they condition must match."""
        digest = hashlib.sha256(self.frames.detach().float().cpu().contiguous().numpy().tobytes())
        digest.update(repr(self.positions).encode())
        return digest.hexdigest()

    def describe(self, frame_num: int) -> str:
        """What conditions the video, in words (``--dry-run``, the mp4's metadata)."""
        return describe_known(self.positions, frame_num)

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


def describe_known(positions: tuple[int, ...], frame_num: int) -> str:
    """The given frames at ``positions`` of a video of ``frame_num`` frames, in words: "first frame",
    "first and last frame", else the positions."""
    if positions == (0,):
        return "first frame"
    if positions == (0, frame_num - 1):
        return "first and last frame"
    if len(positions) > 1 and positions == tuple(range(len(positions))):
        return f"first {len(positions)} frames (a video's end, continued)"
    return "frames " + ", ".join(map(str, positions))


@dataclass(frozen=True)
class FixedFrames:
    """Latent frames the sampling keeps as given: they replace the noise's, their tokens' timestep is 0,
    and they are put back after every step (the official TI2V's ``mask2``)."""

    latents: torch.Tensor  # [1, C, F', H', W']; only the fixed frames' are read
    frames: torch.Tensor  # [F'] bool: the fixed ones

    def put_back(self, latent: torch.Tensor) -> torch.Tensor:
        """[B, C, F', H', W'] -> the same with the fixed frames' latents in their places."""
        return torch.where(self.frames[:, None, None], self.latents, latent)

    def timestep(self, timestep: torch.Tensor) -> torch.Tensor:
        """[B] -> [B, F']: one per latent frame, 0 for the fixed ones."""
        return timestep[:, None].expand(-1, self.frames.shape[0]).masked_fill(self.frames, 0)


@dataclass(frozen=True)
class Condition:
    """What a strategy makes of the known frames, on the run device: ``channels`` the DiT takes beside
    the latents ([C', F', H', W']: I2V's mask and latents), ``fixed`` latent frames (TI2V's image); either,
    both or neither (text-to-video)."""

    channels: torch.Tensor | None = None
    fixed: FixedFrames | None = None


class KnownFramesMask:
    """Wan2.2-I2V's: a mask that marks the known pixel frames, then the VAE latents of the video that has
    them in their places and black frames elsewhere. The mask has one channel per frame of the VAE's
    temporal stride; the first latent frame stands for one pixel frame, so its channels repeat it."""

    needs_image = True
    timestep_per_frame = False  # the DiT takes one timestep per sample

    def condition(self, known: KnownFrames, frame_num: int, temporal_stride: int, encode: Callable[[torch.Tensor], torch.Tensor]) -> Condition:
        """``encode``: [3, F, H, W] video -> [C, F', H', W'] fp32 latents on the run device.
        -> the [temporal_stride + C, F', H', W'] condition channels."""
        latents = encode(known.video(frame_num))
        pixel_mask = known.mask(frame_num)
        per_channel = torch.cat([pixel_mask[:1].repeat(temporal_stride), pixel_mask[1:]]).view(-1, temporal_stride).T
        mask = per_channel[:, :, None, None].expand(-1, -1, *latents.shape[2:]).to(latents.device)
        return Condition(channels=torch.cat([mask, latents]))


class KnownLatentFrames:
    """Wan2.2-TI2V's: the VAE latents of the known frames take the place of the latent frames they
    cover (every pixel frame of it known: with a first frame, latent frame 0), which the sampling
    then keeps fixed (``FixedFrames``). No known frames: text-to-video, no condition at all."""

    needs_image = False
    timestep_per_frame = True  # with known frames, the DiT takes a timestep per latent frame (0 for the fixed ones)

    def condition(self, known: KnownFrames | None, frame_num: int, temporal_stride: int, encode: Callable[[torch.Tensor], torch.Tensor]) -> Condition:
        """``encode`` as ``KnownFramesMask.condition``'s."""
        if known is None:
            return Condition()
        latent_frames = (frame_num - 1) // temporal_stride + 1
        covers = [range(1)] + [range(temporal_stride * j - temporal_stride + 1, temporal_stride * j + 1) for j in range(1, latent_frames)]
        fixed = [all(p in known.positions for p in pixels) for pixels in covers]
        if not any(fixed):
            raise WanError(
                f"the known frames {list(known.positions)} cover no latent frame whole",
                f"give the first frame, or {temporal_stride} frames in a row after it",
            )
        # Only the frames up to the last fixed latent frame are encoded: a first frame alone, as the official code encodes it.
        last = max(j for j, is_fixed in enumerate(fixed) if is_fixed)
        pixel_frames = covers[last][-1] + 1
        kept = [i for i, p in enumerate(known.positions) if p < pixel_frames]
        encoded = encode(KnownFrames(known.frames[:, kept], tuple(known.positions[i] for i in kept)).video(pixel_frames))
        latents = encoded.new_zeros(encoded.shape[0], latent_frames, *encoded.shape[2:])
        latents[:, : last + 1] = encoded
        return Condition(fixed=FixedFrames(latents[None], torch.tensor(fixed, device=encoded.device)))
