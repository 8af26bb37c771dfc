"""POST /v2/models/{model}/infer: read under the size cap -> decode -> the native problem -> the device worker -> encode.

Every step but the protocol's own decoding and encoding is the native one: `deps.read_body` (size cap,
deadline), `problem.parse_problem` (fields, shapes, limits) and `service.run_problem` (the same
DeviceWorker queue as /forward and /backward), so the V2 endpoint has their limits, 503s, 504s and parity.
"""

from __future__ import annotations

import time

from fastapi import Request, Response
from starlette.concurrency import run_in_threadpool

from app.config import Settings
from app.deps import decimal_int, read_body
from app.metrics import Metrics
from app.parsing import INLINE_MAX_BYTES
from app.problem import Problem, parse_problem
from app.responses import PartsResponse
from app.service import INLINE_ENCODE_ELEMENTS, default_device, refuse_big_body_to_a_full_queue, run_problem
from app.v2.models import Model
from app.v2.protocol import HEADER_LENGTH, V2Request, check_shapes, decode_request, encode_response, split_body, text_elements
from app.worker import DeviceWorker


def decode(
    model: Model, raw: bytes, header_length: str | None, settings: Settings, devices: list[str], default: str
) -> tuple[V2Request, Problem]:
    """Runs off the event loop for all but tiny bodies (JSON parsing and tensor conversion hold the GIL)."""
    header, binary = split_body(raw, header_length)
    request = decode_request(model, header, binary)
    problem = parse_problem(request.body, model.backward, settings, devices, default)
    check_shapes(model, request, problem)
    return request, problem


def _binary_offset(header_length: str | None) -> int:
    """Where the binary section starts, when the header says so (a bad value is reported by split_body)."""
    return decimal_int(header_length) or 0


async def infer(request: Request, model: Model, settings: Settings, workers: dict[str, DeviceWorker], metrics: Metrics) -> Response:
    arrived, arrived_monotonic = time.perf_counter(), time.monotonic()
    deadline = arrived_monotonic + settings.request_timeout_s
    header_length = request.headers.get(HEADER_LENGTH)
    binary_offset = _binary_offset(header_length)
    refuse_big_body_to_a_full_queue(request, settings, workers)
    # V2 clients send JSON, or JSON followed by raw tensor bytes, under any Content-Type.
    with request.app.state.budget.hold() as hold:  # app/admission.py
        raw = await read_body(request, settings, deadline, json_only=False, binary_offset=binary_offset, hold=hold)
        decode_start = time.perf_counter()
        arguments = (model, raw, header_length, settings, list(workers), default_device(settings, workers))
        # Only the JSON part costs time to decode: binary tensors become views of the body.
        json_length = min(len(raw), binary_offset or len(raw))
        v2_request, problem = decode(*arguments) if json_length <= INLINE_MAX_BYTES else await run_in_threadpool(decode, *arguments)
        del raw, arguments
        hold.problem(problem.memory_bytes)
        if problem.options.timeout_s is not None:
            deadline = min(deadline, arrived_monotonic + problem.options.timeout_s)
        timing_ms = {"decode": (time.perf_counter() - decode_start) * 1e3}
        outcome = await run_problem(request, settings, workers, problem, deadline, model.backward, timing_ms, hold)
        metrics.observe_stages(timing_ms)
        # Unlike the native responses, "total" stops before encoding: the figures are part of what is encoded.
        timing_ms["total"] = (time.perf_counter() - arrived) * 1e3
        encode_args = (model, v2_request, outcome, problem, timing_ms)
        # Binary outputs are sent from the tensors' memory: only JSON numbers make encoding worth a thread.
        if text_elements(model, v2_request, outcome) <= INLINE_ENCODE_ELEMENTS:
            parts, header_length = encode_response(*encode_args)
        else:
            parts, header_length = await run_in_threadpool(encode_response, *encode_args)
        if header_length is None:
            return PartsResponse(parts, media_type="application/json", sent=hold.until_sent())
        headers = {HEADER_LENGTH: str(header_length)}
        return PartsResponse(parts, media_type="application/octet-stream", headers=headers, sent=hold.until_sent())
