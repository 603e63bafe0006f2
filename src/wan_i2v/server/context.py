"""What the routers share, as FastAPI dependencies: the server's parts (on the app's state) and the
client a request comes from (which the app's middleware has named)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.exceptions import HTTPException

from wan_i2v.config import SamplingDefaults
from wan_i2v.models.spec import ModelSpec, spec_for
from wan_i2v.server.access import Client
from wan_i2v.server.capacity import Capacity
from wan_i2v.server.events import JobEvents
from wan_i2v.server.store import Job, JobStore
from wan_i2v.transforms.step_cache_config import StepCacheConfig


@dataclass(frozen=True)
class ServerContext:
    """The server's parts (``create_app``'s arguments). ``runner`` is told of each new job (``notify``) and reports
    ``status``; ``capacity`` (the loaded plan's) refuses the videos that would not fit (None: no limit);
    ``loopback``: the server listens on this machine only."""

    store: JobStore
    runner: Any
    events: JobEvents  # the jobs' changes, pushed to their event streams
    defaults: SamplingDefaults
    capacity: Capacity | None
    max_upload_bytes: int
    loopback: bool
    metrics: Any  # prometheus_client's registry, read from the queue at each scrape
    step_cache: StepCacheConfig | None = None  # the loaded pipeline's (its threshold: the jobs' default)

    @property
    def spec(self) -> ModelSpec:
        """The model served (the defaults are its own)."""
        return spec_for(self.defaults.model)

    @property
    def needs_image(self) -> bool:
        """The served model makes videos from an image only (its conditioning says): a job without one is refused."""
        return self.spec.conditioning.target.needs_image


def refuse(status: int, message: str):
    """End the request with the API's error body (``app.error_response``)."""
    raise HTTPException(status_code=status, detail=message)


def server_context(request: Request) -> ServerContext:
    return request.app.state.context


def request_client(request: Request) -> Client | None:
    """The client the request's token names (None on the open paths, without a valid token)."""
    return request.state.client


Context = Annotated[ServerContext, Depends(server_context)]
RequestClient = Annotated[Client, Depends(request_client)]


def visible_job(job_id: str, context: Context, client: RequestClient) -> Job:
    """The job, if the request's client may see it: another client's job is not found, as if it did not exist."""
    job = context.store.get(job_id, client=client.sees)
    if job is None:
        refuse(404, f"no video {job_id}")
    return job


VisibleJob = Annotated[Job, Depends(visible_job)]
