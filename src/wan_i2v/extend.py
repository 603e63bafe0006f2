"""Longer videos: a video continued by new clips, each conditioned on the last frames before it.

A clip of ``frame_num`` frames is sampled with its first k = ``context_frames`` frames known: the last
k frames of the video so far, at positions 0..k-1 (``KnownFrames``). Wan2.2-I2V's mask gives the
first latent frame to pixel frame 0 and each later one to the next 4 pixel frames, so k = 4m+1 known
frames are exactly the first m+1 latent frames, none of them half known. The clip's first k frames
reproduce the context and are dropped when joining: no frame repeats.

Resuming: each segment's denoising state goes to a state file of its own in ``state_dir`` and is
kept once the segment is done (it then holds every step), so the same extension run again decodes
the finished segments from their files and goes on with the one that was running. Which saved state
is resumed is decided as for one video (``sampling/resume.py``'s run identity), and the context's
pixels are part of it: a segment that comes out otherwise makes the ones after it start over."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path

import torch

from wan_i2v.cache.manifest import hash_stream
from wan_i2v.config import DRAWN_SEEDS, MAX_AREA, MIN_SIDE, OFFICIAL, GenerationSettings, SamplingDefaults
from wan_i2v.errors import WanError, option
from wan_i2v.models.conditioning import KnownFrames
from wan_i2v.models.spec import ModelSpec
from wan_i2v.video import frames_to_tensor, read_mp4, rgb24_frames

CONTEXT_FRAMES = 5


@dataclass(frozen=True)
class Source:
    """The video an extension continues."""

    frames: torch.Tensor  # [3, F, H, W] float32 on the CPU, in [-1, 1]
    fps: Fraction | int
    sha256: str | None = None  # the file's (None: given as a tensor)
    chain: list = field(default_factory=list)  # the extensions that made it, oldest first (its mp4's metadata)

    @property
    def name(self) -> str:
        return "the video" if self.sha256 is None else "the source video"


def read_source(video: str | Path | torch.Tensor, spec: ModelSpec, *, fps: Fraction | int | None = None) -> Source:
    """``video``: an mp4's path (its frames as the file holds them, its frame rate, the chain its
    metadata records) or a [3, F, H, W] tensor in [-1, 1] (at ``fps``, else the model's)."""
    if isinstance(video, torch.Tensor):
        if video.ndim != 4 or video.shape[0] != 3:
            raise WanError(f"a video tensor of shape {list(video.shape)}", "give [3, frames, height, width] in [-1, 1]")
        return Source(video.detach().float().cpu(), fps or spec.fps)
    mp4 = read_mp4(video)
    digest = hashlib.sha256()
    with open(video, "rb") as file:
        hash_stream(digest, file)
    chain = mp4.metadata.get("chain")
    return Source(frames_to_tensor(mp4.frames), mp4.fps, digest.hexdigest(), chain if isinstance(chain, list) else [])


def check_size(source: Source, spec: ModelSpec) -> None:
    """The clips are at the source's size (it is not resized): one the model takes, or a one-line refusal."""
    height, width = source.frames.shape[2:]
    multiple = spec.size_multiple
    if height % multiple or width % multiple or min(height, width) < MIN_SIDE or height * width > MAX_AREA:
        raise WanError(f"{source.name} is {width}x{height}, a size the model does not take",
                       f"resize it to sides that are multiples of {multiple}, at least {MIN_SIDE} and at most 2048*2048 pixels in all, "
                       "such as 1280x720 or 832x480")  # fmt: skip


def source_size(source: Source, spec: ModelSpec) -> str:
    """The ``size`` setting of a clip at the source's size: the preset of that area (its shift), else H*W."""
    check_size(source, spec)
    height, width = source.frames.shape[2:]
    presets = [name for name, preset in spec.presets.items() if preset.max_area == height * width]
    return presets[0] if presets else f"{height}*{width}"


def source_settings(source: Source, spec: ModelSpec, prompt: str, negative_prompt: str | None = None, *,
                    defaults: SamplingDefaults = OFFICIAL, **given) -> GenerationSettings:  # fmt: skip
    """The first segment's settings: ``GenerationSettings.of`` at the source's size."""
    return GenerationSettings.of(prompt, negative_prompt, defaults=defaults, size=source_size(source, spec), **given)


def check_extension(source: Source, context_frames: int, frame_num: int, times: int, spec: ModelSpec) -> None:
    """One-line refusals of an extension that cannot run as asked."""
    check_size(source, spec)
    stride = spec.vae_stride[0]
    if context_frames < 1 or (context_frames - 1) % stride:
        below = max(1, (context_frames - 1) // stride * stride + 1)
        raise WanError(f"{option('context_frames', context_frames)} is not of the form {stride}m+1",
                       f"so that the context fills whole latent frames: use {below} or {below + stride}")  # fmt: skip
    if context_frames >= frame_num:
        raise WanError(f"{option('context_frames', context_frames)} leaves no new frame in a clip of {option('frame_num', frame_num)}",
                       "give fewer context frames or more frames")  # fmt: skip
    if source.frames.shape[1] < context_frames:
        raise WanError(f"{source.name} has {source.frames.shape[1]} frames, fewer than {option('context_frames', context_frames)}",
                       "give fewer context frames or a longer video")  # fmt: skip
    if times < 1:
        raise WanError(f"{option('extend_times', times)}: extend at least once", f"give {option('extend_times', 1)} or more")


def context(video: torch.Tensor, context_frames: int) -> KnownFrames:
    """The last ``context_frames`` frames of ``video``, as the first frames of the next clip."""
    return KnownFrames(video[:, -context_frames:], tuple(range(context_frames)))


def join(video: torch.Tensor, clip: torch.Tensor, context_frames: int) -> torch.Tensor:
    """``video`` then ``clip`` without its first ``context_frames`` frames (they reproduce the context)."""
    return torch.cat([video, clip[:, context_frames:]], dim=1)


def as_stored(video: torch.Tensor) -> torch.Tensor:
    """``video`` at the 8-bit levels the mp4 stores: what the next segment is conditioned on is then what
    a file would give (and the same again when a resumed run decodes the segment anew)."""
    return frames_to_tensor(rgb24_frames(video))


def segment_settings(first: GenerationSettings, index: int) -> GenerationSettings:
    """Segment ``index``'s settings: the first's with a seed of its own (the given seed + index, else
    drawn; a drawn seed is then the saved state's when the segment resumes)."""
    if index == 0:
        return first
    return replace(first, seed=random.randrange(DRAWN_SEEDS) if first.seed_drawn else first.seed + index)


@dataclass
class ExtensionResult:
    video: torch.Tensor | None  # [3, F, H, W] in [-1, 1]: the source's frames, then each segment's new ones; None on ranks other than 0
    fps: Fraction | int  # the source's
    segments: list = field(default_factory=list)  # each segment's GenerationResult (its video left out: it is in ``video``)
    metadata: dict = field(default_factory=dict)  # what the mp4 records: the chain of extensions


def chain_metadata(source: Source, context_frames: int, segments: list) -> dict:
    """The source's chain with this extension added: the source's SHA-256 and frames, the context, and
    each segment's settings (prompt, seed, ...) and LoRAs."""
    link = {"source_sha256": source.sha256, "source_frames": source.frames.shape[1], "context_frames": context_frames,
            "segments": [segment.metadata for segment in segments]}  # fmt: skip
    return {"chain": [*source.chain, link]}


def segment_state_file(state_dir: str | Path, index: int) -> Path:
    """Where segment ``index`` (from 0) keeps its denoising state."""
    return Path(state_dir) / f"segment-{index + 1}.state.pt"


def extend_video(
    generate: Callable, source: Source, settings: GenerationSettings, *, context_frames: int = CONTEXT_FRAMES, times: int = 1,
    spec: ModelSpec, state_dir: str | Path | None = None,
) -> ExtensionResult:  # fmt: skip
    """``times`` clips after ``source``, each conditioned on the end of the video before it.
    ``generate(known_frames, settings, state_file)`` samples one clip (``I2VPipeline.generate``,
    ``RunSession.generate``); ``state_dir`` holds each segment's state file."""
    check_extension(source, context_frames, settings.frame_num, times, spec)
    if state_dir is not None:
        Path(state_dir).mkdir(parents=True, exist_ok=True)
    video, segments, main = source.frames, [], True
    for index in range(times):
        state_file = None if state_dir is None else segment_state_file(state_dir, index)
        result = generate(context(video, context_frames), segment_settings(settings, index), state_file)
        if result.video is None:  # a rank other than 0 of a parallel run: rank 0's context is the one sampled
            main = False
        else:
            video = join(video, as_stored(result.video), context_frames)
        segments.append(replace(result, video=None))
    return ExtensionResult(video if main else None, source.fps, segments, chain_metadata(source, context_frames, segments))
