"""The API's JSON, as pydantic models: the video object (the OpenAI videos API's fields, and ours),
the lists, the error body, the models list and the health answer. The store holds ``Job`` rows; these
say how a client sees them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel

from wan_i2v.models.spec import spec_for
from wan_i2v.server.requests import MODEL
from wan_i2v.server.store import Job


class VideoError(BaseModel):
    message: str


class Video(BaseModel):
    """A job as the API shows it."""

    id: str
    object: Literal["video"] = "video"
    model: str
    status: str
    progress: int  # percent
    created_at: int
    completed_at: int | None
    error: VideoError | None
    prompt: str
    seconds: str  # the video's length, as the OpenAI API writes it
    size: str
    seed: int
    step: int
    seconds_per_step: float | None
    eta_seconds: float | None
    settings: dict[str, Any]  # the checked request, with the seed drawn at submission

    @classmethod
    def of(cls, job: Job) -> Video:
        settings = job.settings
        completed = job.status == "completed"
        remaining = None
        if job.status == "in_progress" and job.seconds_per_step is not None:
            remaining = round((settings["steps"] - job.step) * job.seconds_per_step, 1)
        return cls(
            id=job.id,
            status=job.status,
            progress=100 if completed else int(100 * job.step / settings["steps"]),
            created_at=int(job.created_at),
            completed_at=None if job.completed_at is None else int(job.completed_at),
            error=None if job.error is None else VideoError(message=job.error),
            prompt=settings["prompt"],
            model=settings.get("model", MODEL),
            seconds=f"{(settings['frame_num'] - 1) / settings.get('fps', spec_for(settings.get('model', MODEL)).fps):g}",  # (a job queued before the fps setting: the model's)
            size=settings["size"],
            seed=settings["seed"],
            step=settings["steps"] if completed else job.step,  # (its last step's write may have been missed)
            seconds_per_step=None if job.seconds_per_step is None else round(job.seconds_per_step, 3),
            eta_seconds=remaining,
            settings=settings,
        )


class VideoList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Video]
    first_id: str | None
    last_id: str | None
    has_more: bool


class DeletedVideo(BaseModel):
    id: str
    object: Literal["video"] = "video"
    deleted: Literal[True] = True


class ErrorDetail(BaseModel):
    message: str
    type: str
    code: int  # the HTTP status


class ErrorBody(BaseModel):
    """Every error in one shape, the OpenAI API's."""

    error: ErrorDetail


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    owned_by: str = "wan-i2v"
    default_size: str
    default_frame_num: int
    fps: int  # the videos' frame rate unless a job gives its own
    text_to_video: bool  # a job may leave out the image
    max_frame_num: dict[str, int] | None = None  # at the default size ("WIDTHxHEIGHT"), when the loaded plan limits it


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: str  # the runner's: loading, ready or failed
    defaults: dict[str, Any]  # what a request's missing fields become (the page shows them)
    queued: int | None = None  # how busy the server is: only to its clients once it is on a network
    in_progress: int | None = None
