"""GET /healthz (the process answers), /readyz (workers up and warmed), /metrics (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from app.deps import MetricsDep, ParserDep, SettingsDep, WorkersDep
from app.errors import json_response

router = APIRouter()


@router.get("/healthz", summary="Liveness: the process is up and its event loop answers")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Readiness: 200 once every device worker is warmed and the body parser is up; 503 + Retry-After before, or after a device fault",
    responses={503: {"description": "Not ready yet, or a device is unusable"}},
)
async def readyz(workers: WorkersDep, parser: ParserDep, settings: SettingsDep) -> Response:
    devices = {
        name: {"ready": worker.ready, "healthy": worker.healthy, "queue_depth": worker.queue_depth} for name, worker in workers.items()
    }
    ready = bool(workers) and parser.ready and all(worker.ready and worker.healthy for worker in workers.values())
    report = {
        "status": "ready" if ready else "not ready",
        "devices": devices,
        "parser": {"ready": parser.ready, "processes": parser.processes},
    }
    if ready:
        return json_response(report)
    return json_response(report, 503, {"Retry-After": str(settings.retry_after_s)})


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request, registry: MetricsDep, workers: WorkersDep) -> Response:
    return Response(registry.render(workers.values(), request.app.state.budget), media_type=CONTENT_TYPE_LATEST)
