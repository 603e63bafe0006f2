"""The service's own endpoints: the models served, the server's health and its Prometheus metrics."""

from __future__ import annotations

import dataclasses

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily

from wan_i2v.config import parse_size
from wan_i2v.server.context import Context, RequestClient, refuse
from wan_i2v.server.requests import model_name
from wan_i2v.server.schemas import Health, ModelCard, ModelList
from wan_i2v.server.store import JobStore

router = APIRouter()


@router.get("/v1/models", response_model_exclude_none=True)
def models(context: Context) -> ModelList:
    defaults, spec = context.defaults, context.spec
    height, width = spec.planned_size(parse_size(defaults.size, spec)[0])  # (the shape the server was planned for)
    card = ModelCard(id=model_name(spec), default_size=defaults.size, default_frame_num=defaults.frame_num, fps=spec.fps,
                     text_to_video=not context.needs_image)  # fmt: skip
    if context.capacity is not None:
        card.max_frame_num = {f"{width}x{height}": context.capacity.largest_frame_num(height, width)}
    return ModelList(data=[card])


@router.get("/health", response_model_exclude_none=True)
def health(context: Context, client: RequestClient, response: Response) -> Health:
    status = context.runner.status
    body = Health(status=status, defaults=dataclasses.asdict(context.defaults))
    if context.loopback or client is not None:
        counts = context.store.counts()
        body.queued, body.in_progress = counts["queued"], counts["in_progress"]
    if status == "failed":
        response.status_code = 503
    return body


@router.get("/metrics")
def metrics(context: Context, client: RequestClient):
    if not client.admin:  # (every client's jobs, counted)
        refuse(403, "the metrics are for admin tokens (a line ending in admin in the server's --tokens file)")
    return Response(generate_latest(context.metrics), media_type=CONTENT_TYPE_LATEST)


def metrics_registry(store: JobStore, runner) -> CollectorRegistry:
    """The server's metrics, read from the queue at each scrape (so that every server sharing it agrees)."""

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
