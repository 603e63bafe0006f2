"""``/v1/videos``: the OpenAI videos API's shape, over the job store."""

from __future__ import annotations

import asyncio
import json
import os
from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import FileResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from wan_i2v.server.context import Context, RequestClient, VisibleJob, refuse, visible_job
from wan_i2v.server.job_form import JobRequest, job_request
from wan_i2v.server.requests import same_request
from wan_i2v.server.schemas import DeletedVideo, Video, VideoList
from wan_i2v.server.store import FINISHED, Job, JobStore, QueueFull

router = APIRouter(prefix="/v1/videos")
QUIET_SECONDS = 15  # an event stream's longest silence


@router.post("")
async def create(asked: Annotated[JobRequest, Depends(job_request)], context: Context, client: RequestClient) -> Video:
    settings = asked.settings
    if context.capacity is not None and (refusal := await run_in_threadpool(context.capacity.refusal, settings["frame_num"], asked.height, asked.width)):
        refuse(400, refusal)
    try:
        job, created = await run_in_threadpool(context.store.submit, asked.image, settings, asked.idempotency_key, client.name, asked.last_image)
    except QueueFull as exc:
        refuse(429, f"{exc}; try again later")
    if created:
        context.runner.notify()
    elif not await run_in_threadpool(_repeats, context.store, job, asked):
        refuse(422, f"the Idempotency-Key {asked.idempotency_key!r} was used for another request (job {job.id}); use a new key for a new request")
    return Video.of(job)


def _repeats(store: JobStore, job: Job, asked: JobRequest) -> bool:
    path = store.image_path(job.id)
    known_image = path.read_bytes() if path.is_file() else None  # (gone once the job is deleted)
    return same_request(job.settings, known_image, json.loads(json.dumps(asked.settings)), asked.image, asked.seed_given)


@router.get("")
def listing(context: Context, client: RequestClient, limit: int = 20, after: str | None = None) -> VideoList:
    if not 1 <= limit <= 100:
        refuse(400, f"limit {limit} out of range (1 to 100)")
    try:
        jobs, more = context.store.list(limit=limit, after=after, client=client.sees)
    except KeyError:
        refuse(404, f"no video {after} (the after= cursor)")
    return VideoList(data=[Video.of(job) for job in jobs], first_id=jobs[0].id if jobs else None,
                     last_id=jobs[-1].id if jobs else None, has_more=more)  # fmt: skip


@router.get("/{job_id}")
def retrieve(job: VisibleJob) -> Video:
    return Video.of(job)


@router.api_route("/{job_id}/content", methods=["GET", "HEAD"])
def content(job_id: str, context: Context, client: RequestClient, variant: str = "video"):
    if variant != "video":  # (before the job is looked up: a wrong variant is refused whatever the job)
        refuse(400, f"variant {variant!r} is not served: only variant=video (the mp4)")
    job = visible_job(job_id, context, client)
    if job.status != "completed":
        refuse(404, f"video {job_id} has no content: it is {job.status.replace('_', ' ')}")
    try:
        video = open(context.store.video_path(job_id), "rb")
    except FileNotFoundError:  # deleted since
        refuse(404, f"no video {job_id}")
    return OpenedFileResponse(video, media_type="video/mp4", filename=f"{job_id}.mp4")


@router.delete("/{job_id}")
def delete(job: VisibleJob, context: Context) -> DeletedVideo | Video:
    if job.status in FINISHED and context.store.delete(job.id):
        return DeletedVideo(id=job.id)
    cancelled = context.store.cancel(job.id)
    if cancelled is None:  # deleted meanwhile, by another request
        refuse(404, f"no video {job.id}")
    return Video.of(cancelled)


@router.get("/{job_id}/events")
async def events(job: VisibleJob, context: Context):
    async def stream():
        with context.events.watching(job) as watch:
            current: Job | None = job
            while current is not None:
                yield f"event: {'done' if current.status in FINISHED else 'progress'}\ndata: {json.dumps(Video.of(current).model_dump())}\n\n"
                if current.status in FINISHED:
                    return
                while True:
                    try:
                        current = await asyncio.wait_for(watch.next(), QUIET_SECONDS)
                        break
                    except asyncio.TimeoutError:  # a comment now and then keeps proxies from closing a quiet stream
                        yield ": waiting\n\n"
            yield "event: error\ndata: {\"error\": {\"message\": \"the video was deleted\"}}\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


class OpenedFileResponse(FileResponse):
    """A file opened as its request came (FileResponse opens it by name after sending the headers): a
    DELETE meanwhile removes the name, and the open file still gives every byte the headers promised.
    Range requests (a <video> seeking) read through the open file too (/dev/fd reopens the same file)."""

    def __init__(self, handle, **kwargs):
        self._handle = handle
        super().__init__(f"/dev/fd/{handle.fileno()}", stat_result=os.fstat(handle.fileno()), **kwargs)

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._handle.close()
