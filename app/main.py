"""The ASGI app: wiring only. Settings -> kernels' limits, one worker per device, routers, error handlers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException

import app as package
import kernels
from app import compute, errors, memory
from app.admission import MemoryBudget
from app.config import Settings, get_settings
from app.deps import BEARER_SCHEME
from app.metrics import Metrics, MetricsMiddleware, keep_gauges_current
from app.parsing import BodyParser
from app.routes import backward, forward, health, info, v2
from app.schemas import BackwardRequest, ForwardRequest
from app.v2 import errors as v2_errors
from app.worker import DeviceWorker
from kernels import compiled, gemm

log = logging.getLogger("app")

DESCRIPTION = """Our own Conv2d forward and backward (package `kernels`), with parity figures against torch.nn.Conv2d.

Tensors travel as nested lists, `{"shape", "dtype", "data"}` or `{"shape", "dtype", "b64"}`; NaN and
infinities are the strings "NaN", "Infinity", "-Infinity" in the first two forms. See the README.
"""


def available_devices() -> list[str]:
    return ["cpu", *(f"cuda:{index}" for index in range(torch.cuda.device_count()))]


def _check_device(settings: Settings, devices: list[str]) -> None:
    wanted = {"auto": "cpu", "cuda": "cuda:0"}.get(settings.device, settings.device)
    if wanted not in devices:
        raise ValueError(f"CONV_DEVICE={settings.device!r} but this host has only {devices}")


def _add_request_schemas(app: FastAPI) -> None:
    """Declare ForwardRequest / BackwardRequest and the bearer scheme in components, where the routes point."""
    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        schema = generate()
        _, definitions = models_json_schema(
            [(ForwardRequest, "validation"), (BackwardRequest, "validation")], ref_template="#/components/schemas/{model}"
        )
        components = schema.setdefault("components", {})
        components.setdefault("schemas", {}).update(definitions["$defs"])
        components.setdefault("securitySchemes", {}).update(BEARER_SCHEME)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    devices = available_devices()
    _check_device(settings, devices)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        kernels.set_limits(reference_max_macs=settings.reference_max_macs, im2col_workspace_bytes=settings.workspace_bytes)
        compiled.set_mode(settings.compile)
        gemm.set_backend(settings.gemm)
        if settings.malloc_reuse:
            memory.keep_freed_memory()
        workers = {name: DeviceWorker(torch.device(name), settings.queue_size, settings.retry_after_s) for name in devices}
        parser = BodyParser(settings.parse_processes)
        app.state.workers, app.state.parser = workers, parser
        # Warm-up runs in the background: /healthz answers at once, /readyz turns 200 when it is done.
        set_up = [worker.start(compute.warm_up if settings.warmup else None) for worker in workers.values()]
        set_up.append(asyncio.create_task(parser.start(), name="parser-start"))
        if app.state.metrics.shared_dir:  # several processes: any of them may answer /metrics (app/metrics.py)
            refresh = keep_gauges_current(app.state.metrics, workers.values(), app.state.budget)
            set_up.append(asyncio.create_task(refresh, name="metrics-refresh"))
        try:
            yield
        finally:
            for task in set_up:
                task.cancel()
            await asyncio.gather(parser.stop(), *(worker.stop() for worker in workers.values()), return_exceptions=True)

    app = FastAPI(title="conv-as-a-service", version=package.__version__, description=DESCRIPTION, lifespan=lifespan)
    app.state.settings = settings
    app.state.metrics = Metrics()
    app.state.workers = {}
    app.state.parser = BodyParser(0)
    app.state.budget = MemoryBudget(settings.max_inflight_bytes, settings.retry_after_s)
    errors.install(app)
    app.add_exception_handler(HTTPException, v2_errors.routing_error)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    for router in (forward.router, backward.router, health.router, info.router, v2.router):
        app.include_router(router)
    _add_request_schemas(app)
    return app


app = create_app()
