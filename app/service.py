"""The request path shared by /forward and /backward: read -> decode -> queue on the device -> encode.

Decoding runs in the parser (a helper process for big bodies, the threadpool for medium ones),
encoding in the threadpool and the conv on the device worker's thread, so the event loop only moves
bytes and /healthz stays prompt while big payloads are handled. Tiny bodies, responses and CPU convs
(well under a millisecond of work each) are handled inline: a thread hop would cost more than the work.
"""

from __future__ import annotations

import time

import orjson
from fastapi import Request, Response
from starlette.concurrency import run_in_threadpool

from app import compute
from app.admission import Hold
from app.codec import encode_tensor
from app.config import Settings
from app.deps import app_state, check_api_key, decimal_int, read_body
from app.problem import Problem
from app.responses import Buffer, PartsResponse
from app.worker import DeviceWorker

# Responses this small encode in well under a millisecond: cheaper on the event loop than a thread hop.
INLINE_ENCODE_ELEMENTS = 16_384


def default_device(settings: Settings, workers: dict[str, DeviceWorker]) -> str:
    if settings.device == "auto":
        return "cuda:0" if "cuda:0" in workers else "cpu"
    return "cuda:0" if settings.device == "cuda" else settings.device


def _encode(outcome: compute.Outcome, problem: Problem, timing_ms: dict[str, float], arrived: float) -> list[Buffer]:
    """Tensors first, then the report; the tensors are serialised before `encode` and `total` are known,
    so the two JSON objects are built separately and sent as parts of one object (no joined copy)."""
    start = time.perf_counter()
    encoding = problem.options.encoding
    tensors = {name: None if value is None else encode_tensor(value, encoding) for name, value in outcome.tensors.items()}
    tensor_json = orjson.dumps(tensors, option=orjson.OPT_SERIALIZE_NUMPY)
    timing_ms["encode"] = (time.perf_counter() - start) * 1e3
    timing_ms["total"] = (time.perf_counter() - arrived) * 1e3
    report = {
        "algorithm": outcome.algorithm,
        "device": problem.device,
        "dtype": problem.dtype_name,
        "parity": outcome.parity,
        "timing_ms": timing_ms,
    }
    return [memoryview(tensor_json)[:-1], b",", memoryview(orjson.dumps(report))[1:]]


async def run_problem(
    request: Request,
    settings: Settings,
    workers: dict[str, DeviceWorker],
    problem: Problem,
    deadline: float,
    backward: bool,
    timing_ms: dict[str, float],
    hold: Hold | None = None,
) -> compute.Outcome:
    """Queue the checked problem on its device's worker and wait; adds queue / compute / reference to
    `timing_ms`. Shared by /forward, /backward and the V2 infer route. Raises ClientGone, 503, 504, 507.

    Tiny CPU problems with algorithm "auto" (CONV_INLINE_MACS: MACs plus the padded input's and the output's
    elements, so a few MACs over a huge padding do not count as tiny) run right here on the event loop: a
    few hundred microseconds of work, less than the two thread hand-offs and the GIL contention that
    queueing them costs. Named algorithms always queue: they may be slow by design (e.g. "reference")."""
    run = compute.run_backward if backward else compute.run_forward
    worker = workers[problem.device]
    small = problem.macs + problem.moved_elements <= settings.inline_macs
    if problem.device == "cpu" and problem.options.algorithm == "auto" and small:
        outcome = worker.run_inline(lambda device: run(problem, device, deadline), deadline)
        queue_ms = 0.0
    else:
        started: list[float] = []

        def job(device):
            started.append(time.perf_counter())
            return run(problem, device, deadline)

        queued = time.perf_counter()
        # A conv still running when the request leaves keeps its memory held until it ends.
        outcome = await worker.run(job, deadline, request.is_disconnected, hold.keep_until if hold is not None else None)
        queue_ms = ((started[0] if started else queued) - queued) * 1e3
    request.state.algorithm = outcome.algorithm
    timing_ms["queue"] = queue_ms
    timing_ms.update(outcome.timing_ms)
    return outcome


# A body this big cannot be a problem small enough to run inline (CONV_INLINE_MACS), so it will queue.
EARLY_QUEUE_CHECK_BYTES = 1 << 20


def refuse_big_body_to_a_full_queue(request: Request, settings: Settings, workers: dict[str, DeviceWorker]) -> None:
    """503 before a big body is read when its device's queue is already full: otherwise the refusal came
    only after reading and decoding it (1-6 s into a burst of base64 bodies, each decode holding the GIL)."""
    declared = decimal_int(request.headers.get("content-length"))
    worker = workers.get(default_device(settings, workers))
    if declared is not None and declared >= EARLY_QUEUE_CHECK_BYTES and worker is not None:
        worker.check_room()


async def serve_conv(request: Request, backward: bool) -> Response:
    arrived, arrived_monotonic = time.perf_counter(), time.monotonic()
    state = app_state(request)
    settings, workers, parser, metrics = state.settings, state.workers, state.parser, state.metrics
    check_api_key(request, settings)
    deadline = arrived_monotonic + settings.request_timeout_s
    refuse_big_body_to_a_full_queue(request, settings, workers)
    # Held from before the body is read until the response is sent (app/admission.py).
    with state.budget.hold() as hold:
        body = await read_body(request, settings, deadline, hold=hold)
        decode_start = time.perf_counter()
        problem = await parser.parse(body, backward, settings, list(workers), default_device(settings, workers))
        del body
        hold.problem(problem.memory_bytes)
        if problem.options.timeout_s is not None:
            deadline = min(deadline, arrived_monotonic + problem.options.timeout_s)
        timing_ms = {"decode": (time.perf_counter() - decode_start) * 1e3}
        outcome = await run_problem(request, settings, workers, problem, deadline, backward, timing_ms, hold)
        elements = sum(tensor.numel() for tensor in outcome.tensors.values() if tensor is not None)
        if elements <= INLINE_ENCODE_ELEMENTS:
            parts = _encode(outcome, problem, timing_ms, arrived)
        else:
            parts = await run_in_threadpool(_encode, outcome, problem, timing_ms, arrived)
        metrics.observe_stages(timing_ms)
        return PartsResponse(parts, media_type="application/json", sent=hold.until_sent())
