"""How far one video is from another: PSNR and SSIM per frame and overall (``wan-i2v compare A B``),
to measure what a fast mode (the step cache, FP8, a bf16 decode) costs on one's own prompts.

The frames are compared as the files hold them, decoded to 8-bit RGB; the metrics are
scikit-image's. Overall PSNR is the whole video's (its mean squared error over every frame), overall
SSIM the mean of the frames'. Torch-free: the command line imports it without the model's stack."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from wan_i2v.errors import WanError


@dataclass(frozen=True)
class FrameScore:
    psnr: float  # dB; inf where the frames are equal
    ssim: float  # 1 where the frames are equal


@dataclass(frozen=True)
class Comparison:
    frames: list[FrameScore]
    psnr: float  # the whole video's, in dB (inf: equal videos)
    ssim: float  # the frames' mean


def read_frames(path: str | os.PathLike) -> np.ndarray:
    """A video file's frames as [F, H, W, 3] uint8 RGB."""
    import av

    try:
        with av.open(str(path)) as container:
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    except FileNotFoundError:
        raise WanError(f"no video at {path}", "check the path") from None
    except (av.FFmpegError, IndexError, ValueError) as exc:
        raise WanError(f"{path} is not a video that can be read ({exc})", "give an mp4 as wan-i2v writes it") from None
    if not frames:
        raise WanError(f"{path} has no frames", "give an mp4 as wan-i2v writes it")
    return np.stack(frames)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    from skimage.metrics import peak_signal_noise_ratio

    with np.errstate(divide="ignore"):  # equal images: a mean squared error of 0 is an infinite PSNR
        return float(peak_signal_noise_ratio(a, b, data_range=255))


def _ssim(a: np.ndarray, b: np.ndarray) -> float:
    from skimage.metrics import structural_similarity

    return float(structural_similarity(a, b, channel_axis=-1, data_range=255))


def compare_frames(a: np.ndarray, b: np.ndarray, names: tuple[str, str] = ("A", "B")) -> Comparison:
    """Two videos' [F, H, W, 3] uint8 frames compared; they must have the same count and size."""
    if len(a) != len(b):
        raise WanError(f"{names[0]} has {len(a)} frames and {names[1]} {len(b)}", "compare videos of the same length")
    if a.shape[1:3] != b.shape[1:3]:
        (ha, wa), (hb, wb) = a.shape[1:3], b.shape[1:3]
        raise WanError(f"{names[0]} is {wa}x{ha} and {names[1]} {wb}x{hb}", "compare videos of the same size")
    if min(a.shape[1:3]) < 7:
        raise WanError(f"the frames of {names[0]} are {a.shape[2]}x{a.shape[1]}: SSIM needs 7x7 at least", "compare larger videos")
    frames = [FrameScore(_psnr(x, y), _ssim(x, y)) for x, y in zip(a, b)]
    return Comparison(frames, _psnr(a, b), float(np.mean([frame.ssim for frame in frames])))


def compare_videos(path_a: str | os.PathLike, path_b: str | os.PathLike) -> Comparison:
    """PSNR and SSIM of ``path_b``'s frames against ``path_a``'s, per frame and overall."""
    return compare_frames(read_frames(path_a), read_frames(path_b), (str(path_a), str(path_b)))


def _db(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.2f}"


def format_report(report: Comparison) -> str:
    """The comparison as the command line prints it: a line per frame, then the overall figures."""
    lines = ["frame  PSNR (dB)  SSIM"]
    lines += [f"{index:5d}  {_db(frame.psnr):>9}  {frame.ssim:.4f}" for index, frame in enumerate(report.frames)]
    lines.append(f"  all  {_db(report.psnr):>9}  {report.ssim:.4f}")
    return "\n".join(lines)
