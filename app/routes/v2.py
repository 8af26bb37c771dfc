"""The V2 / Open Inference Protocol (Triton, KServe) REST endpoints, for models conv2d and conv2d_backward.

Health and metadata are open, like /healthz and /info; infer needs the API key, like /forward.
Errors answer {"error": "..."} (app/v2/errors.py) with the native status codes. See docs/v2.md.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from app.deps import BEARER_SECURITY, ParserDep, SettingsDep, WorkersDep, app_state, check_api_key
from app.errors import json_response
from app.parsing import BodyParser
from app.v2 import service
from app.v2.errors import ModelNotFound, V2Route, error_response
from app.v2.models import MODELS, VERSION, Model, server_metadata
from app.worker import DeviceWorker

_ERROR_BODY = {"application/json": {"schema": {"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]}}}
router = APIRouter(
    prefix="/v2",
    tags=["v2"],
    route_class=V2Route,
    responses={404: {"description": 'Unknown model or version: {"error": "..."}', "content": _ERROR_BODY}},
)

_INFER_EXAMPLE = {
    "inputs": [
        {"name": "INPUT", "datatype": "FP32", "shape": [1, 1, 3, 3], "data": [0.5, -1.0, 2.0, 1.5, 0.0, -0.5, 1.0, 2.0, -2.0]},
        {"name": "WEIGHT", "datatype": "FP32", "shape": [1, 1, 3, 3], "data": [0.1, 0.2, 0.3, 0.0, -0.1, 0.2, 0.3, 0.1, -0.2]},
        {"name": "BIAS", "datatype": "FP32", "shape": [1], "data": [0.1]},
    ],
    "parameters": {"padding": 1, "stride": "1,1"},
}
# The body is read raw (JSON, or JSON + binary tensors), so it is declared here for /docs only.
_INFER_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"type": "object"}, "example": _INFER_EXAMPLE},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


def _model(name: str, version: str | None = None) -> Model:
    if name not in MODELS:
        raise ModelNotFound(f"unknown model {name!r}; models: {list(MODELS)}")
    if version is not None and version != VERSION:
        raise ModelNotFound(f"model {name!r} has no version {version!r}; versions: [{VERSION!r}]")
    return MODELS[name]


def _ready(workers: dict[str, DeviceWorker], parser: BodyParser) -> bool:
    """The native /readyz rule: every device worker warmed and healthy, and the body parser up."""
    return bool(workers) and parser.ready and all(worker.ready and worker.healthy for worker in workers.values())


def _readiness(workers: dict[str, DeviceWorker], parser: BodyParser, retry_after_s: int) -> Response:
    if _ready(workers, parser):
        return json_response({"ready": True})
    return error_response(503, "not ready: device workers are warming up or a device is unusable", {"Retry-After": str(retry_after_s)})


@router.get("", summary="Server metadata: name, version, protocol extensions")
async def server() -> dict[str, Any]:
    return server_metadata()


@router.get("/health/live", summary="200 while the process answers")
async def live() -> dict[str, bool]:
    return {"live": True}


@router.get("/health/ready", summary="200 once every device worker is warmed (as /readyz); 503 + Retry-After before")
async def ready(workers: WorkersDep, parser: ParserDep, settings: SettingsDep) -> Response:
    return _readiness(workers, parser, settings.retry_after_s)


@router.get("/models/{model_name}", summary="Model metadata: inputs and outputs")
@router.get("/models/{model_name}/versions/{model_version}", summary="Model metadata for one version")
async def model_metadata(model_name: str, model_version: str | None = None) -> dict[str, Any]:
    return _model(model_name, model_version).metadata()


@router.get("/models/{model_name}/ready", summary="200 when the model's server is ready; 404 for an unknown model")
@router.get("/models/{model_name}/versions/{model_version}/ready", summary="Readiness of one version")
async def model_ready(
    model_name: str, workers: WorkersDep, parser: ParserDep, settings: SettingsDep, model_version: str | None = None
) -> Response:
    _model(model_name, model_version)
    return _readiness(workers, parser, settings.retry_after_s)


@router.post(
    "/models/{model_name}/infer",
    openapi_extra={**_INFER_BODY, **BEARER_SECURITY},
    summary="Inference: conv2d forward or backward, with parity (docs/v2.md)",
)
@router.post(
    "/models/{model_name}/versions/{model_version}/infer",
    openapi_extra={**_INFER_BODY, **BEARER_SECURITY},
    summary="Inference on one version",
)
async def infer(request: Request, model_name: str, model_version: str | None = None) -> Response:
    state = app_state(request)
    check_api_key(request, state.settings)
    return await service.infer(request, _model(model_name, model_version), state.settings, state.workers, state.metrics)
