"""CONV_MAX_INFLIGHT_BYTES (app/admission.py): the memory requests in progress hold together is bounded."""

from __future__ import annotations

import asyncio
import base64

import pytest
import torch

from app.admission import MemoryBudget
from app.errors import Unavailable
from tests.app.conftest import running
from tests.app.test_errors import block, until

MiB = 1 << 20
pytestmark = pytest.mark.anyio


def test_a_request_alone_is_admitted_whatever_its_size() -> None:
    budget = MemoryBudget(limit_bytes=1000)
    with budget.hold() as hold:
        hold.resize(5000)
        assert budget.held_bytes == 5000
    assert budget.held_bytes == 0 and budget.holders == 0


def test_past_the_limit_with_others_holding_is_503_with_retry_after() -> None:
    budget = MemoryBudget(limit_bytes=1000, retry_after_s=7)
    with budget.hold() as first, budget.hold() as second:
        first.resize(600)
        second.resize(400)  # exactly at the limit: admitted
        with pytest.raises(Unavailable, match="CONV_MAX_INFLIGHT_BYTES") as refused:
            second.resize(401)
        assert refused.value.headers == {"Retry-After": "7"}
        assert budget.held_bytes == 1000, "a refused resize keeps what the request held"
        second.resize(10)  # shrinking is always allowed
        first.resize(990)
        assert budget.held_bytes == 1000
    assert budget.held_bytes == 0


def test_the_hold_is_released_when_the_request_fails() -> None:
    budget = MemoryBudget(limit_bytes=1000)
    with pytest.raises(RuntimeError), budget.hold() as hold:
        hold.resize(800)
        raise RuntimeError("the request failed")
    assert budget.held_bytes == 0 and budget.holders == 0


def _b64_input(size: int) -> dict:
    data = torch.randn(1, 1, size, size)
    return {"shape": list(data.shape), "dtype": "float32", "b64": base64.b64encode(data.numpy().tobytes()).decode()}


SMALL_NATIVE = ("/forward", {"input": [[[[1.0]]]], "weight": [[[[2.0]]]]}, "detail")
SMALL_V2 = (
    "/v2/models/conv2d/infer",
    {
        "inputs": [
            {"name": "INPUT", "datatype": "FP32", "shape": [1, 1, 1, 1], "data": [1.0]},
            {"name": "WEIGHT", "datatype": "FP32", "shape": [1, 1, 1, 1], "data": [2.0]},
        ]
    },
    "error",
)


@pytest.mark.parametrize(("path", "body", "error_key"), [SMALL_NATIVE, SMALL_V2], ids=["native", "v2"])
async def test_a_request_past_the_limit_is_503_while_another_holds_memory(path: str, body: dict, error_key: str) -> None:
    # The first request (a 400x400 input: 640 kB, with its output and the oracle's ~1.9 MB) is held in the
    # queue behind a blocked worker; a second, however small, would pass the 1 MiB limit and is refused at once.
    first_body = {"input": _b64_input(400), "weight": [[[[1.0]]]], "encoding": "base64"}
    async with running(max_inflight_bytes=MiB, retry_after_s=3, inline_macs=0) as (app, client):
        worker, budget = app.state.workers["cpu"], app.state.budget
        release = block(worker)
        await until(lambda: worker.busy)
        first = asyncio.create_task(client.post("/forward", json=first_body))
        await until(lambda: worker.queue_depth == 1)
        held = budget.held_bytes
        refused = await client.post(path, json=body)
        metrics = (await client.get("/metrics")).text
        release.set()
        assert (await first).status_code == 200
        after = await client.post(path, json=body)
    assert held > MiB
    assert refused.status_code == 503 and refused.headers["retry-after"] == "3"
    assert "CONV_MAX_INFLIGHT_BYTES" in refused.json()[error_key]
    gauge = next(line for line in metrics.splitlines() if line.startswith("conv_inflight_bytes "))
    assert float(gauge.split()[1]) == held, gauge
    assert after.status_code == 200, after.text
    result = after.json()
    assert (result["output"] if path == "/forward" else result["outputs"][0]["data"]) in ([[[[2.0]]]], [2.0])
    assert budget.held_bytes == 0 and budget.holders == 0


@pytest.mark.parametrize("encoding", ["list", "flat", "base64"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_the_estimate_covers_the_encoded_response_and_the_padded_input(encoding: str, dtype: str) -> None:
    """A 1x1 input padded by 200 with a NaN bias: a 79-byte body whose 160,801-element answer is ~1 MB of
    JSON strings. Problem.memory_bytes, what admission counts (twice), must cover the response's bytes on
    top of its tensors and the padded input."""
    import time

    from app import compute
    from app.config import Settings
    from app.problem import parse_problem
    from app.service import _encode

    body = {"input": [[[[1.0]]]], "weight": [[[[1.0]]]], "bias": ["NaN"], "padding": 200, "encoding": encoding, "dtype": dtype}
    problem = parse_problem(body, False, Settings(), ["cpu"], "cpu")
    outcome = compute.run_forward(problem, torch.device("cpu"))
    response_bytes = sum(len(part) for part in _encode(outcome, problem, {}, time.perf_counter()))
    element_size = 8 if dtype == "float64" else 4
    tensors = element_size * (2 * outcome.tensors["output"].numel() + 401 * 401)  # ours and the oracle's outputs, padded input
    assert problem.memory_bytes >= tensors + response_bytes
