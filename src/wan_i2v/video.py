"""Image in, mp4 out."""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import queue
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from wan_i2v.errors import WanError, option

# A 100-megapixel RGB image is 300 MB decoded and far beyond any video size; larger inputs are refused.
MAX_IMAGE_PIXELS = 100_000_000


def load_image(image: str | os.PathLike | bytes | Image.Image, *, name: str | None = None, flag: str = "image") -> Image.Image:
    """An upright RGB image from a path, a file's bytes (``name`` says what they are in errors) or a
    PIL image. ``flag``: the option that gave it (``image``, ``last_image``), which errors name.

    Unlike the official code, EXIF rotation is applied, so a phone photo is not
    sideways; other modes (RGBA, grayscale, palette, 16-bit) become RGB.
    """
    if isinstance(image, bytes):
        image = _decode(io.BytesIO(image), name or "image")
    elif not isinstance(image, Image.Image):
        path = Path(image)
        what = flag.replace("_", " ")
        if path.is_dir():
            raise WanError(f"{what} path {path} is a directory", "give an image file (PNG, JPEG or WebP)")
        if not path.is_file():
            raise WanError(f"{what} not found: {path}", f"check the {option(flag)} path")
        image = _decode(path, f"{what} {path}")
    elif image.width * image.height > MAX_IMAGE_PIXELS:
        raise WanError(f"image of {image.width}x{image.height} is over {MAX_IMAGE_PIXELS // 1_000_000} megapixels", "downscale it first")
    image = ImageOps.exif_transpose(image)
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grayscale: scale to 8 bits instead of clipping.
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Composite transparency over white rather than letting hidden colours show through.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _decode(source, label: str) -> Image.Image:
    """Read an image file whole (a truncated file fails here, not in the middle of a run)."""
    try:
        with Image.open(source) as opened:
            if opened.width * opened.height > MAX_IMAGE_PIXELS:
                raise WanError(
                    f"{label} is {opened.width}x{opened.height}, over {MAX_IMAGE_PIXELS // 1_000_000} megapixels",
                    "downscale it first; the video is at most a few megapixels",
                )
            opened.load()
            return opened.copy()
    except WanError:
        raise
    except UnidentifiedImageError:
        raise WanError(f"cannot read {label}: not an image file", "use a PNG, JPEG or WebP file") from None
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise WanError(f"cannot read {label}: {exc}", "the file is damaged or not an image; use a PNG, JPEG or WebP file") from None


def image_sha256(image: Image.Image) -> str:
    """The SHA-256 of an image's 8-bit RGB pixels, row by row (the same for a file and the PIL image read from it):
    ``hashlib.sha256(numpy.asarray(image).tobytes())``, which the mp4's metadata and a saved state record."""
    return hashlib.sha256(np.asarray(image).tobytes()).hexdigest()


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """[3, H, W] float32 in [-1, 1], as the official preprocessing computes it."""
    return frames_to_tensor(np.array(image, copy=True)[None])[:, 0]


def frames_to_tensor(frames: np.ndarray) -> torch.Tensor:
    """[F, H, W, 3] uint8 RGB -> [3, F, H, W] float32 in [-1, 1], each frame as ``image_to_tensor`` makes an image."""
    return torch.from_numpy(frames).permute(3, 0, 1, 2).float().div(255).sub_(0.5).div_(0.5)


def check_writable(path: Path) -> None:
    """Fail before hours of work, not after, when the output cannot be written."""
    directory = path.parent
    if path.is_dir():
        raise WanError(f"output path {path} is a directory", "give a file name such as out.mp4")
    if not directory.is_dir():
        raise WanError(f"output directory {directory} does not exist", f"create it or choose another {option('save_file')}")
    if not os.access(directory, os.W_OK):
        raise WanError(f"cannot write to {directory}", f"choose another {option('save_file')}")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """A temporary path next to ``path`` to write in the block, renamed into place when the block ends
    without an error: the file appears only when complete (an error removes the temporary)."""
    path = Path(path)
    check_writable(path)
    fd, tmp = tempfile.mkstemp(prefix=_temporary_prefix(path), suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; the file gets what any new file would
        # On the disk before its name is: after a power cut the name holds the whole file or the old one.
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself
    finally:
        os.close(directory)


def write_atomically(path: Path, write) -> Path:
    """Run ``write(temporary_path)``, then rename into place: the file appears only when complete."""
    with atomic_file(path) as tmp:
        write(tmp)
    return Path(path)


def rgb24_frames(video: torch.Tensor) -> np.ndarray:
    """[3, F, H, W] in [-1, 1] (any device) -> [F, H, W, 3] uint8 on the host, as the mp4 stores them."""
    return ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).contiguous().cpu().numpy()


@contextmanager
def mp4_writer(path: Path, *, fps: int | Fraction, metadata: dict | None = None) -> Iterator[Callable[[torch.Tensor], None]]:
    """An H.264 yuv420p mp4 that common players open, written as its frames come: the block gets
    ``write(frames)`` for consecutive runs of [3, n, H, W] frames in [-1, 1], which a thread of its own
    converts and encodes while the caller (a decode) goes on. The file appears at ``path`` when the
    block ends, complete; an error in the block or in the encoding leaves nothing there. The frames
    handed over must stay unchanged until the block ends (the decode's output buffer does)."""
    import av

    waiting: queue.SimpleQueue = queue.SimpleQueue()
    failures: list[BaseException] = []
    with atomic_file(path) as tmp, av.open(str(tmp), mode="w", format="mp4") as container:
        if metadata:
            container.metadata["comment"] = json.dumps(metadata, ensure_ascii=False)
        stream = container.add_stream("libx264", rate=fps)
        stream.pix_fmt = "yuv420p"
        # x264's macroblock-tree rate control made other bytes (frames up to ~30 levels apart) from
        # the same frames now and then, even on one thread; without it the same frames make the same
        # file every time, at about the same speed and ~15% more bytes at this quality.
        stream.options = {"crf": "17", "preset": "medium", "x264-params": "mbtree=0"}

        def encode() -> None:
            try:
                sized = False
                while (frames := waiting.get()) is not None:
                    if not sized:  # the encoder opens at the first frame: the video's size is known by then
                        stream.height, stream.width = frames.shape[2], frames.shape[3]
                        sized = True
                    for frame in rgb24_frames(frames):
                        container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            except BaseException as exc:  # (a full disk): the caller's next write, or the block's end, raises it
                failures.append(exc)

        def write(frames: torch.Tensor) -> None:
            if failures:
                raise failures[0]
            waiting.put(frames)

        encoder = threading.Thread(target=encode, name="wan-i2v-mp4", daemon=True)
        encoder.start()
        try:
            yield write
        finally:
            waiting.put(None)
            encoder.join()
        if failures:
            raise failures[0]
        container.mux(stream.encode())  # what the encoder still holds


def _temporary_prefix(path: Path) -> str:
    return f".{path.stem}."


def leftover_temporaries(path: Path) -> list[Path]:
    """The temporaries of ``write_atomically(path)`` that a process killed mid-write left (mkstemp's
    names: the prefix, 8 characters, the suffix). Only for a caller that knows no one else writes ``path``."""
    path, prefix = Path(path), _temporary_prefix(Path(path))
    length = len(prefix) + 8 + len(path.suffix)
    return [p for p in path.parent.glob(f"{glob.escape(prefix)}*{glob.escape(path.suffix)}") if len(p.name) == length]


def write_mp4(video: torch.Tensor, path: Path, *, fps: int | Fraction, metadata: dict | None = None) -> Path:
    """[3, F, H, W] in [-1, 1] -> H.264 yuv420p mp4 that common players open (``mp4_writer``'s, whole)."""
    with mp4_writer(path, fps=fps, metadata=metadata) as write:
        write(video)
    return Path(path)


@dataclass(frozen=True)
class Mp4:
    """An mp4 as read back: its frames, its frame rate and what its metadata records (``mp4_writer``'s)."""

    frames: np.ndarray  # [F, H, W, 3] uint8 RGB
    fps: Fraction
    metadata: dict  # the JSON of its comment; empty when it has none (a video not made here)


# The demuxer's names for an ISO media file (mp4, mov and kin), as FFmpeg reports them.
MP4_FORMATS = {"mov", "mp4", "m4a", "3gp", "3g2", "mj2"}


def read_mp4(path: str | os.PathLike) -> Mp4:
    """An mp4 file's frames, frame rate and metadata; anything else is a one-line error."""
    import av

    path = Path(path)
    if not path.is_file():
        raise WanError(f"video not found: {path}", "give the path of an mp4 file")
    try:
        with av.open(str(path)) as container:
            if not MP4_FORMATS & set(container.format.name.split(",")) or not container.streams.video:
                raise WanError(f"{path} is not an mp4 video", "give an mp4 file, such as one wan-i2v wrote")
            stream = container.streams.video[0]
            fps = stream.average_rate or stream.guessed_rate
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
            comment = container.metadata.get("comment")
    except (av.FFmpegError, UnicodeDecodeError, ValueError) as exc:
        raise WanError(f"cannot read {path}: {exc}", "give an mp4 file, such as one wan-i2v wrote") from None
    if not frames or not fps:
        raise WanError(f"{path} has no frames" if not frames else f"{path} has no frame rate", "give an mp4 video that plays")
    try:
        metadata = json.loads(comment) if comment else {}
    except json.JSONDecodeError:  # another program's comment: not ours to read
        metadata = {}
    return Mp4(np.stack(frames), Fraction(fps), metadata if isinstance(metadata, dict) else {})


def demo_image(width: int = 320, height: int = 192) -> Image.Image:
    """A built-in picture for the demo: a sky gradient over a dark ground with a sun."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    sky = np.stack([90 + 80 * y / height, 140 + 60 * y / height, 230 - 40 * y / height], axis=-1)
    ground = np.stack([40 + 20 * x / width, 90 + 30 * x / width, 40 + 0 * x], axis=-1)
    pixels = np.where((y > height * 0.65)[..., None], ground, sky)
    sun = (x - width * 0.7) ** 2 + (y - height * 0.3) ** 2 < (height * 0.12) ** 2
    pixels[sun] = (250, 220, 120)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8), mode="RGB")
