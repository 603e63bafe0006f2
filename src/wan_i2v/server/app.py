"""The HTTP API (the OpenAI videos API's shape) and the web page, over the job store and the runner."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import random
from urllib.parse import unquote
from dataclasses import dataclass
from importlib.resources import files

from fastapi import FastAPI, Request
from fastapi.exceptions import HTTPException, RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from wan_i2v.config import GenerationSettings
from wan_i2v.errors import WanError, by_keyword
from wan_i2v.server.access import ANYONE, HostCheck, Tokens, cross_site_refusal
from wan_i2v.server.capacity import Capacity
from wan_i2v.server.requests import MAX_IDEMPOTENCY_KEY, TooLarge, check_image, check_openai_fields, check_text_fields, read_limited, replaying, same_request
from wan_i2v.server.queue import QueueUnreachable
from wan_i2v.server.schemas import DeletedVideo, ErrorBody, ErrorDetail, Health, ModelCard, ModelList, Video, VideoList
from wan_i2v.server.store import FINISHED, DiskFull, JobStore, QueueFull

TOKEN_COOKIE = "wan_i2v_token"  # the page keeps the token here: a <video> or EventSource cannot send a header
OPEN_PATHS = {"/", "/health", "/favicon.ico"}
JSON_SAFE_SEEDS = 2**53  # drawn seeds stay exact in JavaScript's numbers (the page, most JSON clients)


@dataclass(frozen=True)
class JobDefaults:
    """What a job gets for the fields its request leaves out (the server's command line sets them;
    otherwise the model card's, as ``GenerationSettings`` has them)."""

    size: str = "720P"
    frame_num: int = GenerationSettings.frame_num
    steps: int = GenerationSettings.steps
    guide_scale: tuple[float, float] = GenerationSettings.guide_scale
    shift: float | None = None  # None: the size preset's
    solver: str = GenerationSettings.solver


ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error", 405: "invalid_request_error",
               413: "invalid_request_error", 422: "idempotency_error", 429: "rate_limit_error", 503: "server_unavailable"}  # fmt: skip
RETRY_AFTER_SECONDS = {429: 30, 503: 5}


def error_response(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    """Every error in one shape, the OpenAI API's: {"error": {"message", "type", "code"}}; a refusal
    that passes with time says when to retry."""
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    body = ErrorBody(error=ErrorDetail(message=message, type=kind, code=status))
    headers = dict(headers or {})
    if status in RETRY_AFTER_SECONDS:
        headers.setdefault("Retry-After", str(RETRY_AFTER_SECONDS[status]))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


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


def job_settings(form, defaults: JobDefaults) -> dict:
    """A request's fields, checked as the CLI checks them, with the seed drawn when not given (or -1)."""
    from wan_i2v.config import DEFAULT_NEGATIVE_PROMPT, guide_pair, parse_size

    size = str(form.get("size") or defaults.size).strip()
    max_area, preset_shift = parse_size(size)
    guide_text = form.get("guide_scale")
    if guide_text is None or not str(guide_text).strip():
        guide = defaults.guide_scale
    else:
        try:
            guide = guide_pair(str(guide_text).split(","))
        except ValueError:
            raise WanError(f"guide_scale must be one number or two separated by a comma, not {guide_text!r}", "e.g. 3.5 or 3.5,3.5") from None
    seed = _number(form, "seed", int, None)
    negative = form.get("negative_prompt")
    settings = GenerationSettings(
        prompt=str(form.get("prompt")),
        negative_prompt=DEFAULT_NEGATIVE_PROMPT if negative is None else str(negative),
        max_area=max_area,
        frame_num=_number(form, "frame_num", int, defaults.frame_num),
        steps=_number(form, "steps", int, defaults.steps),
        shift=_number(form, "shift", float, defaults.shift or preset_shift or 5.0),
        guide_scale=guide,
        seed=random.randint(0, JSON_SAFE_SEEDS - 1) if seed in (None, -1) else seed,
        solver=str(form.get("solver") or defaults.solver),
    )
    return {**settings.as_dict(), "size": size, "negative_prompt": None if negative is None else str(negative)}


def create_app(store: JobStore, runner, *, tokens: Tokens | None = None, max_upload_bytes: int = 50 * 2**20, defaults: JobDefaults = JobDefaults(),
               capacity: Capacity | None = None, allowed_hosts: tuple[str, ...] = (), loopback: bool = True) -> FastAPI:  # fmt: skip
    """The server's app. ``runner`` is told of each new job (``notify``) and reports ``status``;
    ``tokens``: the clients it serves (None: anyone, with no token); ``capacity`` (the loaded plan's)
    refuses the videos that would not fit (None: no limit); ``allowed_hosts``: the names, besides IP
    addresses and localhost, that clients reach it by; ``loopback``: it listens on this machine only."""
    app = FastAPI(title="wan-i2v", docs_url=None, redoc_url=None)

    def fail(status: int, message: str):
        raise HTTPException(status_code=status, detail=message)

    @app.exception_handler(StarletteHTTPException)  # (the router's own 404 and 405 too)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        where = ".".join(str(part) for part in exc.errors()[0]["loc"][1:]) if exc.errors() else "request"
        return error_response(400, f"{where}: {exc.errors()[0]['msg'] if exc.errors() else 'invalid'}")

    @app.exception_handler(QueueUnreachable)
    async def unreachable(request: Request, exc: QueueUnreachable):  # a database restarting: the client may retry (the log says why)
        return error_response(503, "the job queue is unreachable for now; try again in a few seconds")

    @app.exception_handler(DiskFull)
    async def disk_full(request: Request, exc: DiskFull):  # (the operator frees space; reads go on meanwhile)
        return error_response(507, f"{exc}; try again once space is freed")

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception):  # (the traceback goes to the server's log, not to the client)
        return error_response(500, f"internal error: {type(exc).__name__}")

    host_check = HostCheck(allowed_hosts)

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        header = request.headers.get("authorization", "")
        refusal = host_check.refusal(request.headers.get("host"))
        if refusal:
            return error_response(400, refusal)
        bearer = header.lower().startswith("bearer ")
        refusal = cross_site_refusal(request.method, request.headers, bearer)
        if refusal:
            return error_response(403, refusal)
        if tokens is None:
            request.state.client = ANYONE
        else:  # (the page stores the cookie percent-encoded, as cookies must be)
            request.state.client = tokens.client(header[7:] if bearer else unquote(request.cookies.get(TOKEN_COOKIE, "")))
            if request.state.client is None and request.url.path not in OPEN_PATHS:
                return error_response(401, "missing or wrong token (send Authorization: Bearer TOKEN)")
        with by_keyword():  # a request's errors name its fields (frame_num), not generate's flags
            return await call_next(request)

    def found(request: Request, job_id: str):
        """The job, if the request's client may see it: another client's job is not found, as if it did not exist."""
        job = store.get(job_id, client=request.state.client.sees)
        if job is None:
            fail(404, f"no video {job_id}")
        return job

    @app.post("/v1/videos")
    async def create(request: Request) -> Video:
        limit_text = f"the limit of {max_upload_bytes / 2**20:.0f} MiB (the server's --max-upload-mb)"
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_upload_bytes:
            fail(413, f"the upload is {int(length) / 2**20:.1f} MiB, over {limit_text}")
        key = request.headers.get("idempotency-key") or None
        if key is not None and len(key) > MAX_IDEMPOTENCY_KEY:
            fail(400, f"the Idempotency-Key header is {len(key)} characters long; at most {MAX_IDEMPOTENCY_KEY}")
        try:
            body = await read_limited(request, max_upload_bytes)
        except TooLarge as exc:
            fail(413, f"the upload passed {limit_text} after {exc.received / 2**20:.1f} MiB; it was not read further")
        try:
            form = await Request(request.scope, replaying(body)).form()
        except Exception as exc:  # not multipart, or cut short
            fail(400, f"send a multipart form with input_reference (the image) and prompt: {exc}")
        upload = form.get("input_reference")
        if upload is None or isinstance(upload, str):
            fail(400, "input_reference is required: the image file (PNG, JPEG or WebP)")
        if form.get("prompt") is None:
            fail(400, "prompt is required (it may be empty)")
        image = await upload.read()
        try:
            check_text_fields(form)
            check_openai_fields(form)
            settings = job_settings(form, defaults)
            height, width = await check_image(image, upload.filename, settings["max_area"])
        except WanError as exc:
            fail(400, str(exc))
        if capacity is not None and (refusal := await run_in_threadpool(capacity.refusal, settings["frame_num"], height, width)):
            fail(400, refusal)
        try:
            job, created = await run_in_threadpool(store.submit, image, settings, key, request.state.client.name)
        except QueueFull as exc:
            fail(429, f"{exc}; try again later")
        if created:
            runner.notify()
        elif not await run_in_threadpool(_repeats, job, image, settings, _number(form, "seed", int, -1) != -1):
            fail(422, f"the Idempotency-Key {key!r} was used for another request (job {job.id}); use a new key for a new request")
        return Video.of(job)

    def _repeats(job, image: bytes, settings: dict, seed_given: bool) -> bool:
        path = store.image_path(job.id)
        known_image = path.read_bytes() if path.is_file() else None  # (gone once the job is deleted)
        return same_request(job.settings, known_image, json.loads(json.dumps(settings)), image, seed_given)

    @app.get("/v1/videos")
    def listing(request: Request, limit: int = 20, after: str | None = None) -> VideoList:
        if not 1 <= limit <= 100:
            fail(400, f"limit {limit} out of range (1 to 100)")
        try:
            jobs, more = store.list(limit=limit, after=after, client=request.state.client.sees)
        except KeyError:
            fail(404, f"no video {after} (the after= cursor)")
        return VideoList(data=[Video.of(job) for job in jobs], first_id=jobs[0].id if jobs else None,
                         last_id=jobs[-1].id if jobs else None, has_more=more)  # fmt: skip

    @app.get("/v1/videos/{job_id}")
    def retrieve(request: Request, job_id: str) -> Video:
        return Video.of(found(request, job_id))

    @app.api_route("/v1/videos/{job_id}/content", methods=["GET", "HEAD"])
    def content(request: Request, job_id: str, variant: str = "video"):
        if variant != "video":
            fail(400, f"variant {variant!r} is not served: only variant=video (the mp4)")
        job = found(request, job_id)
        if job.status != "completed":
            fail(404, f"video {job_id} has no content: it is {job.status.replace('_', ' ')}")
        try:
            video = open(store.video_path(job_id), "rb")
        except FileNotFoundError:  # deleted since
            fail(404, f"no video {job_id}")
        return OpenedFileResponse(video, media_type="video/mp4", filename=f"{job_id}.mp4")

    @app.delete("/v1/videos/{job_id}")
    def delete(request: Request, job_id: str) -> DeletedVideo | Video:
        job = found(request, job_id)
        if job.status in FINISHED and store.delete(job_id):
            return DeletedVideo(id=job_id)
        cancelled = store.cancel(job_id)
        if cancelled is None:  # deleted meanwhile, by another request
            fail(404, f"no video {job_id}")
        return Video.of(cancelled)

    @app.get("/v1/videos/{job_id}/events")
    async def events(request: Request, job_id: str):
        await run_in_threadpool(found, request, job_id)

        async def stream():
            last = None
            quiet = 0.0
            while True:
                job = await run_in_threadpool(store.get, job_id)
                if job is None:
                    yield "event: error\ndata: {\"error\": {\"message\": \"the video was deleted\"}}\n\n"
                    return
                seen = (job.status, job.step)
                if seen != last:
                    last, quiet = seen, 0.0
                    yield f"event: {'done' if job.status in FINISHED else 'progress'}\ndata: {json.dumps(Video.of(job).model_dump())}\n\n"
                    if job.status in FINISHED:
                        return
                elif quiet > 15:  # a comment now and then keeps proxies from closing a quiet stream
                    quiet = 0.0
                    yield ": waiting\n\n"
                await asyncio.sleep(0.25)
                quiet += 0.25

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.get("/v1/models", response_model_exclude_none=True)
    def models() -> ModelList:
        from wan_i2v.config import parse_size, video_size

        height, width = video_size(720, 1280, parse_size(defaults.size)[0])  # (the shape the server was planned for)
        card = ModelCard(default_size=defaults.size, default_frame_num=defaults.frame_num)
        if capacity is not None:
            card.max_frame_num = {f"{width}x{height}": capacity.largest_frame_num(height, width)}
        return ModelList(data=[card])

    @app.get("/health", response_model_exclude_none=True)
    def health(request: Request, response: Response) -> Health:
        body = Health(status=runner.status, defaults=dataclasses.asdict(defaults))
        if loopback or request.state.client is not None:
            counts = store.counts()
            body.queued, body.in_progress = counts["queued"], counts["in_progress"]
        if runner.status == "failed":
            response.status_code = 503
        return body

    registry = _metrics_registry(store, runner)

    @app.get("/metrics")
    def metrics(request: Request):
        if not request.state.client.admin:  # (every client's jobs, counted)
            fail(403, "the metrics are for admin tokens (a line ending in admin in the server's --tokens file)")
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    page_html = files("wan_i2v.server").joinpath("page.html").read_text(encoding="utf-8")

    @app.get("/")
    def page():
        return HTMLResponse(page_html)

    favicon = _favicon()

    @app.get("/favicon.ico")
    def icon():
        return Response(favicon, media_type="image/x-icon", headers={"Cache-Control": "max-age=86400"})

    return app


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


def _favicon() -> bytes:
    """A plain blue square with a white play triangle, drawn once (browsers ask for it on every page)."""
    import io

    from PIL import Image, ImageDraw

    picture = Image.new("RGBA", (32, 32), (53, 83, 209, 255))
    ImageDraw.Draw(picture).polygon([(11, 8), (11, 24), (24, 16)], fill="white")
    buffer = io.BytesIO()
    picture.save(buffer, format="ICO", sizes=[(32, 32)])
    return buffer.getvalue()


def _metrics_registry(store: JobStore, runner):
    """The server's metrics, read from the queue at each scrape (so that every server sharing it agrees)."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import GaugeMetricFamily

    class QueueCollector:
        def collect(self):
            counts = store.counts()
            yield GaugeMetricFamily("wan_i2v_queue_length", "Jobs waiting to run", value=counts["queued"])
            jobs = GaugeMetricFamily("wan_i2v_jobs", "Jobs in the state directory, by status", labels=["status"])
            for status, count in counts.items():
                jobs.add_metric([status], count)
            yield jobs
            yield GaugeMetricFamily("wan_i2v_ready", "1 once the pipeline is loaded", value=float(runner.status == "ready"))
            seconds, memory = store.latest_measures()
            if seconds is not None:
                yield GaugeMetricFamily("wan_i2v_seconds_per_step", "Seconds per denoising step of the latest job", value=seconds)
            if memory is not None:
                yield GaugeMetricFamily("wan_i2v_gpu_peak_memory_gib", "Peak GPU memory allocated by the latest completed job", value=memory)

    registry = CollectorRegistry()
    registry.register(QueueCollector())
    return registry
