"""POST /v2/models/{model}/infer: read under the size cap -> decode -> the native problem -> the device worker -> encode.

The steps after reading are the native ones: `parse_problem` validates the request (fields, shapes,
limits), the job runs on the same DeviceWorker queue as /forward and /backward (`compute.run_forward`
/ `run_backward`), so the V2 endpoint has the same limits, deadlines, 503s and parity as theirs.
"""

from __future__ import annotations

import asyncio
import time

from fastapi import Request, Response
from starlette.concurrency import run_in_threadpool

from app import compute
from app.config import Settings
from app.deps import _read_capped
from app.errors import DeadlineExceeded, MalformedBody, TooLarge, UnsupportedMediaType
from app.metrics import Metrics
from app.parsing import INLINE_MAX_BYTES
from app.problem import Problem, parse_problem
from app.service import CLIENT_CLOSED, INLINE_ENCODE_ELEMENTS, default_device
from app.v2.models import Model
from app.v2.protocol import V2Request, check_shapes, decode_request, encode_response, split_body
from app.worker import ClientGone, DeviceWorker

HEADER_LENGTH = "Inference-Header-Content-Length"


def _check_headers(request: Request, max_body_bytes: int) -> None:
    """As the native routes' checks, except the media type: V2 clients send JSON or JSON + raw bytes."""
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise UnsupportedMediaType(f"Content-Encoding {encoding!r} is not accepted; send the body uncompressed (identity)")
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise MalformedBody(f"Content-Length must be a non-negative integer, got {declared!r}")
        if int(declared) > max_body_bytes:
            raise TooLarge(f"the body is {int(declared):,} bytes; the limit is {max_body_bytes:,} (CONV_MAX_BODY_BYTES)")


async def read_body(request: Request, settings: Settings, deadline: float) -> bytes:
    _check_headers(request, settings.max_body_bytes)
    try:
        async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
            return await _read_capped(request, settings.max_body_bytes)
    except TimeoutError:
        raise DeadlineExceeded("the request body did not arrive within the request deadline") from None


def decode(
    model: Model, raw: bytes, header_length: str | None, settings: Settings, devices: list[str], default: str
) -> tuple[V2Request, Problem]:
    """Runs off the event loop for all but tiny bodies (JSON parsing and tensor conversion hold the GIL)."""
    header, binary = split_body(raw, header_length)
    request = decode_request(model, header, binary)
    problem = parse_problem(request.body, model.backward, settings, devices, default)
    check_shapes(model, request, problem)
    return request, problem


async def infer(request: Request, model: Model, settings: Settings, workers: dict[str, DeviceWorker], metrics: Metrics) -> Response:
    arrived, arrived_monotonic = time.perf_counter(), time.monotonic()
    deadline = arrived_monotonic + settings.request_timeout_s
    raw = await read_body(request, settings, deadline)
    decode_start = time.perf_counter()
    arguments = (model, raw, request.headers.get(HEADER_LENGTH), settings, list(workers), default_device(settings, workers))
    v2_request, problem = decode(*arguments) if len(raw) <= INLINE_MAX_BYTES else await run_in_threadpool(decode, *arguments)
    del raw, arguments
    if problem.options.timeout_s is not None:
        deadline = min(deadline, arrived_monotonic + problem.options.timeout_s)
    timing_ms = {"decode": (time.perf_counter() - decode_start) * 1e3}
    run = compute.run_backward if model.backward else compute.run_forward
    started: list[float] = []

    def job(device):
        started.append(time.perf_counter())
        return run(problem, device)

    queued = time.perf_counter()
    try:
        outcome = await workers[problem.device].run(job, deadline, request.is_disconnected)
    except ClientGone:
        return Response(status_code=CLIENT_CLOSED)
    request.state.algorithm = outcome.algorithm
    timing_ms["queue"] = ((started[0] if started else queued) - queued) * 1e3
    timing_ms.update(outcome.timing_ms)
    metrics.observe_stages(timing_ms)
    elements = sum(tensor.numel() for tensor in outcome.tensors.values() if tensor is not None)
    encode_args = (model, v2_request, outcome, problem, timing_ms)
    if elements <= INLINE_ENCODE_ELEMENTS:
        content, header_length = encode_response(*encode_args)
    else:
        content, header_length = await run_in_threadpool(encode_response, *encode_args)
    if header_length is None:
        return Response(content=content, media_type="application/json")
    return Response(content=content, media_type="application/octet-stream", headers={HEADER_LENGTH: str(header_length)})
