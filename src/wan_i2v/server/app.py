"""The server's app: the routers (``server.routes``) over the job store and the runner, behind one
middleware that says who may reach them, with every error in the API's one shape."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from urllib.parse import unquote

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from wan_i2v.config import OFFICIAL, SamplingDefaults
from wan_i2v.errors import by_keyword
from wan_i2v.server.access import ANYONE, HostCheck, Tokens, cross_site_refusal
from wan_i2v.server.capacity import Capacity
from wan_i2v.server.context import ServerContext
from wan_i2v.server.events import JobEvents
from wan_i2v.server.queue import QueueUnreachable
from wan_i2v.server.routes import page, service, videos
from wan_i2v.server.schemas import ErrorBody, ErrorDetail
from wan_i2v.server.store import DiskFull, JobStore
from wan_i2v.transforms.step_cache_config import StepCacheConfig

log = logging.getLogger("wan_i2v.server")

TOKEN_COOKIE = "wan_i2v_token"  # the page keeps the token here: a <video> or EventSource cannot send a header
OPEN_PATHS = {"/", "/health", "/favicon.ico"}
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


async def _http_error(request: Request, exc: StarletteHTTPException):  # (the router's own 404 and 405 too)
    return error_response(exc.status_code, str(exc.detail), exc.headers)


async def _invalid(request: Request, exc: RequestValidationError):
    where = ".".join(str(part) for part in exc.errors()[0]["loc"][1:]) if exc.errors() else "request"
    return error_response(400, f"{where}: {exc.errors()[0]['msg'] if exc.errors() else 'invalid'}")


async def _unreachable(request: Request, exc: QueueUnreachable):  # a database restarting: the client may retry (the log says why)
    return error_response(503, "the job queue is unreachable for now; try again in a few seconds")


async def _disk_full(request: Request, exc: DiskFull):  # (the operator frees space; reads go on meanwhile)
    return error_response(507, f"{exc}; try again once space is freed")


async def _internal(request: Request, exc: Exception):  # (the traceback goes to the server's log, not to the client)
    return error_response(500, f"internal error: {type(exc).__name__}")


EXCEPTION_HANDLERS = {StarletteHTTPException: _http_error, RequestValidationError: _invalid, QueueUnreachable: _unreachable,
                      DiskFull: _disk_full, Exception: _internal}  # fmt: skip


def create_app(store: JobStore, runner, *, tokens: Tokens | None = None, max_upload_bytes: int = 50 * 2**20, defaults: SamplingDefaults = OFFICIAL,
               capacity: Capacity | None = None, allowed_hosts: tuple[str, ...] = (), loopback: bool = True,
               step_cache: StepCacheConfig | None = None) -> FastAPI:  # fmt: skip
    """The server's app. ``runner`` runs while the app does (``start`` and ``stop``, in its lifespan), is
    told of each new job (``notify``) and reports ``status``; ``tokens``: the clients it serves (None:
    anyone, with no token); ``capacity`` (the loaded plan's) refuses the videos that would not fit
    (None: no limit); ``allowed_hosts``: the names, besides IP addresses and localhost, that clients
    reach it by; ``loopback``: it listens on this machine only; ``step_cache``: the loaded pipeline's,
    whose threshold each job may set for itself."""
    events = JobEvents(store)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        runner.start()
        pushing = asyncio.create_task(events.run())
        try:
            yield
        finally:
            pushing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pushing
            if runner.status != "failed":
                log.info("stopping (a running job stops after its current step and resumes at the next start)")
            await run_in_threadpool(runner.stop)

    app = FastAPI(title="wan-i2v", docs_url=None, redoc_url=None, exception_handlers=EXCEPTION_HANDLERS, lifespan=lifespan)
    app.state.context = ServerContext(store, runner, events, defaults, capacity, max_upload_bytes, loopback, service.metrics_registry(store, runner),
                                      step_cache)  # fmt: skip
    for router in (videos.router, service.router, page.router):
        app.include_router(router)

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

    return app
