"""A job's form (``POST /v1/videos``), read within the upload limit and checked as the command line
checks its flags, into the image and the job's settings.

The form is read and checked here rather than declared as FastAPI ``Form`` fields: the body must be
counted as it arrives (a chunked upload has no Content-Length to refuse it by), and each field's
message and status are the ones clients know (``frame_num must be a whole number, not 'many'``),
which FastAPI's validation would word its own way."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from wan_i2v.config import GenerationSettings, SamplingDefaults, guide_pair
from wan_i2v.errors import WanError
from wan_i2v.server.context import Context, refuse
from wan_i2v.server.requests import MAX_IDEMPOTENCY_KEY, TooLarge, check_image, check_openai_fields, check_text_fields, read_limited, replaying

def _number(form, name: str, kind, default):
    text = form.get(name)
    if text is None or str(text).strip() == "":
        return default
    try:
        written = str(text).strip()
        if "_" in written:  # Python reads 1_7 as 17; no client means that
            raise ValueError(written)
        return kind(written)
    except ValueError:
        raise WanError(f"{name} must be {'a whole number' if kind is int else 'a number'}, not {text!r}") from None


def job_settings(form, defaults: SamplingDefaults) -> dict:
    """A request's fields, checked as the CLI checks them, with the seed drawn when not given (or -1)."""
    size = str(form.get("size") or defaults.size).strip()
    guide_text = form.get("guide_scale")
    if guide_text is None or not str(guide_text).strip():
        guide = None
    else:
        try:
            guide = guide_pair(str(guide_text).split(","))
        except ValueError:
            raise WanError(f"guide_scale must be one number or two separated by a comma, not {guide_text!r}", "e.g. 3.5 or 3.5,3.5") from None
    negative = form.get("negative_prompt")
    settings = GenerationSettings.of(
        str(form.get("prompt")), None if negative is None else str(negative), defaults=defaults, size=size,
        frame_num=_number(form, "frame_num", int, None), steps=_number(form, "steps", int, None), shift=_number(form, "shift", float, None),
        guide_scale=guide, seed=_number(form, "seed", int, None), solver=str(form.get("solver") or "") or None,
    )  # fmt: skip
    return {**settings.as_dict(), "size": size, "negative_prompt": None if negative is None else str(negative)}


@dataclass(frozen=True)
class JobRequest:
    """A checked request for a video."""

    image: bytes
    settings: dict
    idempotency_key: str | None
    seed_given: bool  # (a seed drawn for the job is not part of the request)
    height: int  # the video's
    width: int


async def job_request(request: Request, context: Context) -> JobRequest:
    """The request's job, or its refusal: 413 past the upload limit, 400 for anything else."""
    limit = context.max_upload_bytes
    limit_text = f"the limit of {limit / 2**20:.0f} MiB (the server's --max-upload-mb)"
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        refuse(413, f"the upload is {int(length) / 2**20:.1f} MiB, over {limit_text}")
    key = request.headers.get("idempotency-key") or None
    if key is not None and len(key) > MAX_IDEMPOTENCY_KEY:
        refuse(400, f"the Idempotency-Key header is {len(key)} characters long; at most {MAX_IDEMPOTENCY_KEY}")
    try:
        body = await read_limited(request, limit)
    except TooLarge as exc:
        refuse(413, f"the upload passed {limit_text} after {exc.received / 2**20:.1f} MiB; it was not read further")
    try:
        form = await Request(request.scope, replaying(body)).form()
    except Exception as exc:  # not multipart, or cut short
        refuse(400, f"send a multipart form with input_reference (the image) and prompt: {exc}")
    upload = form.get("input_reference")
    if upload is None or isinstance(upload, str):
        refuse(400, "input_reference is required: the image file (PNG, JPEG or WebP)")
    if form.get("prompt") is None:
        refuse(400, "prompt is required (it may be empty)")
    image = await upload.read()
    try:
        check_text_fields(form)
        check_openai_fields(form)
        settings = job_settings(form, context.defaults)
        height, width = await check_image(image, upload.filename, settings["max_area"])
        seed_given = _number(form, "seed", int, -1) != -1
    except WanError as exc:
        refuse(400, str(exc))
    return JobRequest(image, settings, key, seed_given, height, width)
