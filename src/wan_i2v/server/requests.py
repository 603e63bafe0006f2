"""Reading a job's request safely: a body cut off at the upload limit even without Content-Length,
form fields that must be text, an image measured from its header before it is decoded (and only a
few decoded at a time), and an idempotency key reused only for the same request."""

from __future__ import annotations

import asyncio
import io
from concurrent.futures import ThreadPoolExecutor
import warnings

from wan_i2v.errors import WanError
from wan_i2v.models.spec import DEFAULT_SPEC, spec_for

MAX_IMAGE_PIXELS = 64_000_000  # phone photos reach 50 MP; a decoded 64 MP image is 192 MB of RGB


def model_name(spec=DEFAULT_SPEC) -> str:
    """The name the OpenAI API gives a model (``spec``, or its name)."""
    return spec_for(spec).name.lower()


MODEL = model_name()  # a job's model where it names none (queued before servers served other models)
MAX_IDEMPOTENCY_KEY = 255  # as Stripe's
TEXT_FIELDS = ("model", "seconds", "prompt", "negative_prompt", "size", "height", "width", "frame_num", "steps", "guide_scale", "shift", "seed", "solver", "fps",
               "step_cache")
# Each decode holds up to ~200 MB, and a thread's malloc arena keeps what it once held: two threads
# of their own (not a semaphore in the request pool's many threads) bound both the decodes and the arenas.
_decoders = ThreadPoolExecutor(2, thread_name_prefix="image-decode")


class TooLarge(Exception):
    """The body passed the upload limit; ``received`` bytes were read before stopping."""

    def __init__(self, received: int):
        super().__init__(received)
        self.received = received


async def read_limited(request, limit: int) -> bytes:
    """The request's body, reading no more than ``limit`` bytes (a chunked upload has no
    Content-Length to refuse it by, so the count is kept as it arrives)."""
    chunks, received = [], 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise TooLarge(received)
        chunks.append(chunk)
    return b"".join(chunks)


def replaying(body: bytes):
    """An ASGI ``receive`` that hands ``body`` over once, so that a request read already can be parsed."""
    sent = False

    async def receive():
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


def check_text_fields(form) -> None:
    """A field sent as a file (``-F prompt=@file.png``) would become its object's text: refuse it."""
    for name in TEXT_FIELDS:
        if any(not isinstance(value, str) for value in form.getlist(name)):
            raise WanError(f"{name} must be a text field, not a file (with curl: -F {name}=VALUE, not -F {name}=@FILE)")


def check_openai_fields(form, spec=DEFAULT_SPEC) -> None:
    """The OpenAI fields this server does not honour are refused rather than silently ignored; a
    ``model`` other than the one served (``spec``), by any of its names, is refused."""
    spec = spec_for(spec)
    if form.get("seconds") is not None:
        frames = spec.defaults.frame_num
        raise WanError(f"seconds is not read by this server: give frame_num instead ({spec.fps} frames a second, 4n+1 frames: "
                       f"{frames} is {(frames - 1) / spec.fps:g} s)")  # fmt: skip
    model = form.get("model")
    if model is not None and model.lower() not in (spec.name.lower(), *spec.aliases):
        raise WanError(f"model {model!r} is not served here: only {model_name(spec)!r} (or leave model out)")


async def check_image(image: bytes, filename: str | None, settings, field: str = "input_reference", spec=DEFAULT_SPEC) -> tuple[int, int]:
    """Refuse an image too large to decode from its header's size alone, then decode it (two at a
    time at most) to check that it is a whole image of a usable shape; returns the video's (height,
    width) for it as the first frame of ``settings``' video (a ``GenerationSettings``) of the model
    ``spec``. ``field``: the form's field it came in."""
    return await asyncio.get_running_loop().run_in_executor(_decoders, _check_image, image, filename, settings, field, spec)


def _check_image(image: bytes, filename: str | None, settings, field: str, spec) -> tuple[int, int]:
    from PIL import Image

    from wan_i2v.video import load_image

    name = f"image {filename or field}"
    limit = f"over the limit of {MAX_IMAGE_PIXELS / 1e6:.0f} MP"
    hint = "scale it down first; the video is made at the size field's resolution anyway"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # (our own limit, lower, is checked below)
            with Image.open(io.BytesIO(image)) as header:  # (reads the header only)
                width, height = header.size
    except Image.DecompressionBombError:  # (Pillow refuses to open twice its own limit)
        raise WanError(f"{name} is {limit}", hint) from None
    except Exception:
        width = height = 0  # not an image Pillow knows: load_image says so in its own words
    if width * height > MAX_IMAGE_PIXELS:
        raise WanError(f"{name} is {width}x{height} ({width * height / 1e6:.0f} MP), {limit}", hint)
    picture = load_image(image, name=name)
    return settings.video_size(picture.height, picture.width, spec)


def same_request(known_settings: dict, known_image: bytes | None, settings: dict, image: bytes, seed_given: bool) -> bool:
    """Whether a request repeats the one its idempotency key was first used with (a seed drawn for
    either is not part of the request)."""
    ignored = set() if seed_given else {"seed"}
    kept = [{key: value for key, value in values.items() if key not in ignored} for values in (known_settings, settings)]
    return kept[0] == kept[1] and (known_image is None or known_image == image)
