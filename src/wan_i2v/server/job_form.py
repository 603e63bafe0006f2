"""A job's form (``POST /v1/videos``), read within the upload limit and checked as the command line
checks its flags, into the image and the job's settings.

The body is read here, by the route's dependency, rather than by FastAPI ``Form`` fields: it must be
counted as it arrives (a chunked upload has no Content-Length to refuse it by). Its text fields are
then a pydantic model, ``JobFields``, whose validators read each value as the command line reads its
flag and word a refusal as clients know it (``frame_num must be a whole number, not 'many'``), where
pydantic's own parsing would take ``1_7`` for 17 and ``1.0`` for 1."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import Annotated

from fastapi import Request
from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationInfo

from wan_i2v.config import GenerationSettings, SamplingDefaults, guide_pair
from wan_i2v.errors import WanError, option
from wan_i2v.server.context import Context, refuse
from wan_i2v.server.requests import (
    MAX_IDEMPOTENCY_KEY, TooLarge, check_image, check_openai_fields, check_text_fields, model_name, read_limited, replaying,
)
from wan_i2v.transforms.step_cache_config import StepCacheConfig


def _written(value) -> str | None:
    """A field's text, None when it is absent or blank (the default then applies)."""
    text = None if value is None else str(value).strip()
    return text or None


def _number_of(kind):
    def read(value, info: ValidationInfo):
        text = _written(value)
        try:
            if text is None:
                return None
            if "_" in text:  # Python reads 1_7 as 17; no client means that
                raise ValueError(text)
            return kind(text)
        except ValueError:
            raise WanError(f"{info.field_name} must be {'a whole number' if kind is int else 'a number'}, not {value!r}") from None

    return read


def _guide_scales(value):
    text = _written(value)
    if text is None:
        return None
    try:
        return guide_pair(text.split(","))
    except ValueError:
        raise WanError(f"guide_scale must be one number or two separated by a comma, not {value!r}", "e.g. 3.5 or 3.5,3.5") from None


WholeNumber = Annotated[int | None, BeforeValidator(_number_of(int))]
Number = Annotated[float | None, BeforeValidator(_number_of(float))]
Text = Annotated[str | None, BeforeValidator(_written)]


class JobFields(BaseModel):
    """The text fields of a job's form, typed; absent or blank ones take the server's defaults."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    prompt: str
    negative_prompt: str | None = None  # (kept as sent: an empty negative prompt is one)
    size: Text = None
    height: WholeNumber = None  # an exact size: both or neither, not with size
    width: WholeNumber = None
    frame_num: WholeNumber = None
    steps: WholeNumber = None
    shift: Number = None
    guide_scale: Annotated[tuple[float, float] | None, BeforeValidator(_guide_scales)] = None
    seed: WholeNumber = None  # None or -1: drawn
    solver: Text = None
    fps: WholeNumber = None  # the mp4's frame rate
    step_cache: Number = None  # the job's threshold for the server's step cache (0: off); None: the server's

    @classmethod
    def of(cls, form) -> "JobFields":
        return cls.model_validate({name: form.get(name) for name in cls.model_fields if form.get(name) is not None})

    @property
    def seed_given(self) -> bool:
        return self.seed not in (None, -1)

    def settings(self, defaults: SamplingDefaults, step_cache: StepCacheConfig | None = None) -> dict:
        """The job's settings, checked as the CLI checks them, with the seed drawn when not given (or -1),
        and the step cache's threshold it runs with: its own, else that of the server's ``step_cache``
        (None: the server loaded none, and a job cannot turn one on)."""
        return self.stored(self.generation_settings(defaults), defaults, step_cache)

    def generation_settings(self, defaults: SamplingDefaults) -> GenerationSettings:
        exact = self.height is not None or self.width is not None
        return GenerationSettings.of(self.prompt, self.negative_prompt, defaults=defaults, size=self.size or (None if exact else defaults.size),
                                     frame_num=self.frame_num, steps=self.steps, shift=self.shift, guide_scale=self.guide_scale, seed=self.seed,
                                     solver=self.solver, height=self.height, width=self.width, fps=self.fps)  # fmt: skip

    def stored(self, settings: GenerationSettings, defaults: SamplingDefaults, step_cache: StepCacheConfig | None = None) -> dict:
        """``settings`` as the queue stores them: with the size as asked (an exact one as WIDTH*HEIGHT), the negative prompt as sent
        and the model that runs them (the server's)."""
        size = self.size or (f"{settings.width}*{settings.height}" if settings.height is not None else defaults.size)
        return {**settings.as_dict(), "size": size, "negative_prompt": self.negative_prompt, "model": model_name(defaults.model),
                **self._step_cache(step_cache)}  # fmt: skip

    def _step_cache(self, server: StepCacheConfig | None) -> dict:
        loaded = server is not None and server.on
        if self.step_cache is None:
            return {"step_cache": server.threshold} if loaded else {}
        StepCacheConfig(threshold=self.step_cache)  # refused in the command line's words
        if self.step_cache > 0 and not loaded:
            raise WanError(f"{option('step_cache', self.step_cache)}: this server runs without the step cache",
                           "leave step_cache out, or start the server with --step-cache (its threshold is then the jobs' default)")  # fmt: skip
        return {"step_cache": self.step_cache}


def job_settings(form, defaults: SamplingDefaults, step_cache: StepCacheConfig | None = None) -> dict:
    """A request's fields (a form, or a dict of its texts), checked as the CLI checks them, with the seed drawn when not given (or -1)."""
    return JobFields.of(form).settings(defaults, step_cache)


@dataclass(frozen=True)
class JobRequest:
    """A checked request for a video."""

    image: bytes | None  # None: text-to-video (the settings say "text_to_video"), for a model that makes it
    settings: dict  # with "last_image_file_sha256", the SHA-256 of the last image's file, when one is given
    idempotency_key: str | None
    seed_given: bool  # (a seed drawn for the job is not part of the request)
    height: int  # the video's
    width: int
    last_image: bytes | None = None  # the video's last frame, when given


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
    spec = context.spec
    upload = form.get("input_reference")
    if isinstance(upload, str) or (upload is None and context.needs_image):
        refuse(400, "input_reference is required: the image file (PNG, JPEG or WebP)")
    if form.get("prompt") is None:
        refuse(400, "prompt is required (it may be empty)")
    last_upload = form.get("last_image")
    if isinstance(last_upload, str):
        refuse(400, "last_image must be a file, the video's last frame (with curl: -F last_image=@FILE)")
    if last_upload is not None and upload is None:
        refuse(400, "last_image needs input_reference, the first frame: give both, or neither for text-to-video")
    image = None if upload is None else await upload.read()
    last_image = None if last_upload is None else await last_upload.read()
    try:
        check_text_fields(form)
        check_openai_fields(form, spec)
        fields = JobFields.of(form)
        generation = fields.generation_settings(context.defaults)
        if image is not None:  # its aspect rules: the size's text-to-video shape is no setting of this video
            generation = replace(generation, text_to_video_shape=None)
        settings = fields.stored(generation, context.defaults, context.step_cache)
        if image is None:
            height, width = generation.video_size(spec=spec)
            settings["text_to_video"] = True
        else:
            height, width = await check_image(image, upload.filename, generation, spec=spec)
        if last_image is not None:
            await check_image(last_image, last_upload.filename, generation, "last_image", spec)
            settings["last_image_file_sha256"] = hashlib.sha256(last_image).hexdigest()
    except WanError as exc:
        refuse(400, str(exc))
    return JobRequest(image, settings, key, fields.seed_given, height, width, last_image)
