"""Every error class: the status code AND a detail that names the field (422: detail[].loc) or the limit."""

from __future__ import annotations

import asyncio
import base64
import math
import threading
from contextlib import asynccontextmanager

import pytest
import torch
import torch.nn.functional as F

import kernels
from app.schemas import FORWARD_EXAMPLE
from kernels.tolerances import tolerance
from tests.app.conftest import running
from tests.app.helpers import from_json

pytestmark = pytest.mark.anyio

X = FORWARD_EXAMPLE["input"]  # (2, 1, 3, 3)
W = FORWARD_EXAMPLE["weight"]  # (2, 1, 3, 3)


def body(**fields) -> dict:
    return {**FORWARD_EXAMPLE, **fields}


def without(*names: str) -> dict:
    return {key: value for key, value in FORWARD_EXAMPLE.items() if key not in names}


UNPROCESSABLE = [
    # (path, body, field that detail[0].loc must name, words in its msg)
    pytest.param("/forward", [1, 2], None, "JSON object", id="not-an-object"),
    pytest.param("/forward", without("input"), "input", "required", id="missing-input"),
    pytest.param("/forward", without("weight"), "weight", "required", id="missing-weight"),
    pytest.param("/forward", body(input=[[1.0, 2.0]]), "input", "rank 3 or 4", id="input-rank"),
    pytest.param("/forward", body(weight=W[0]), "weight", "rank 4", id="weight-rank"),
    pytest.param("/forward", body(bias=[[0.1, 0.2]]), "bias", "rank 1", id="bias-rank"),
    pytest.param("/forward", body(bias=[0.1, 0.2, 0.3]), "bias", "bias", id="bias-length"),
    pytest.param("/forward", body(weight=[[[[1.0]], [[1.0]]]]), "input", "channels", id="channel-mismatch"),
    pytest.param("/forward", body(groups=3), "groups", "groups", id="groups-not-dividing"),
    pytest.param("/forward", body(padding=0, dilation=2), "weight", "Kernel size", id="kernel-larger-than-input"),
    pytest.param("/forward", body(padding="same", stride=2), "padding", "strided", id="same-with-stride"),
    pytest.param("/forward", body(padding=3, padding_mode="reflect"), "padding", "reflect", id="reflect-too-wide"),
    pytest.param("/forward", body(algorithm="fastest"), "algorithm", "im2col", id="unknown-algorithm"),
    pytest.param("/forward", body(padding_mode="mirror"), "padding_mode", "reflect", id="unknown-padding-mode"),
    pytest.param("/forward", body(dtype="int8"), "dtype", "float32", id="unknown-dtype"),
    pytest.param("/forward", body(encoding="hex"), "encoding", "base64", id="unknown-encoding"),
    pytest.param("/forward", body(device="tpu"), "device", "pattern", id="unknown-device"),
    pytest.param("/forward", body(device="cuda:7"), "device", "cpu", id="absent-device"),
    pytest.param("/forward", body(colour="red"), "colour", "Extra", id="unknown-field"),
    pytest.param("/forward", body(stride=0), "stride", "greater than or equal to 1", id="stride-zero"),
    pytest.param("/forward", body(stride=[1, 2, 3]), "stride", "at most 2", id="stride-three"),
    pytest.param("/forward", body(stride="1"), "stride", "integer", id="stride-string"),
    pytest.param("/forward", body(stride=True), "stride", "integer", id="stride-bool"),
    pytest.param("/forward", body(padding=-1), "padding", "greater than or equal to 0", id="padding-negative"),
    pytest.param("/forward", body(padding="full"), "padding", "same", id="padding-unknown"),
    pytest.param("/forward", body(dilation=0), "dilation", "greater than or equal to 1", id="dilation-zero"),
    pytest.param("/forward", body(groups=0), "groups", "greater than or equal to 1", id="groups-zero"),
    pytest.param("/forward", body(atol=-1), "atol", "greater than or equal to 0", id="atol-negative"),
    pytest.param("/forward", body(parity="yes"), "parity", "boolean", id="parity-string"),
    pytest.param("/forward", body(parity=False, exact=True), "exact", "needs parity true", id="exact-without-parity"),
    pytest.param("/forward", body(input=[[[[1.0, 2.0], [3.0]]]]), "input", "ragged", id="ragged"),
    pytest.param("/forward", body(input={"shape": [1, 1, 3, 3], "data": [1.0] * 8}), "input", "needs 9", id="data-length"),
    pytest.param("/forward", body(input={"shape": [1, 1, 3, 3], "dtype": "float", "data": [1.0] * 9}), "input", "dtype", id="object-dtype"),
    pytest.param("/forward", body(loss="sum"), "loss", "Extra", id="loss-on-forward"),
    pytest.param("/backward", body(loss="l1"), "loss", "mean_square", id="unknown-loss"),
    pytest.param("/backward", body(grad_output=[[[[1.0]]]]), "grad_output", "[2, 2, 3, 3]", id="grad-output-shape"),
]


@pytest.mark.parametrize("path, payload, field, words", UNPROCESSABLE)
async def test_422_names_the_field(client, path: str, payload, field: str | None, words: str) -> None:
    response = await client.post(path, json=payload)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, list) and detail
    entry = detail[0]
    assert entry["loc"][0] == "body"
    if field is not None:
        assert field in entry["loc"], detail
    assert words in entry["msg"], detail


@pytest.mark.parametrize(
    "content, words",
    [
        pytest.param(b'{"input": [1, 2', "not valid JSON", id="truncated-json"),
        pytest.param(b'{"input": NaN}', "not valid JSON", id="bare-nan"),
        pytest.param(b"\xff\xfe", "not valid JSON", id="not-utf8"),
    ],
)
async def test_400_malformed_json(client, content: bytes, words: str) -> None:
    response = await client.post("/forward", content=content, headers={"content-type": "application/json"})
    assert response.status_code == 400 and words in response.json()["detail"]


async def test_400_malformed_base64(client) -> None:
    response = await client.post("/forward", json=body(input={"shape": [1, 1, 3, 3], "b64": "!" * 48}))
    assert response.status_code == 400 and "input.b64" in response.json()["detail"]


@pytest.mark.parametrize(
    "headers, words",
    [
        pytest.param({"content-type": "text/plain"}, "application/json", id="text"),
        pytest.param({"content-type": "application/x-www-form-urlencoded"}, "application/json", id="form"),
        pytest.param({"content-type": "application/json", "content-encoding": "gzip"}, "Content-Encoding", id="gzip"),
    ],
)
async def test_415_media_type(client, headers: dict, words: str) -> None:
    response = await client.post("/forward", content=b"{}", headers=headers)
    assert response.status_code == 415 and words in response.json()["detail"]


async def test_415_without_content_type(client) -> None:
    response = await client.post("/forward", content=b"{}")
    assert response.status_code == 415


LIMITS = {"max_body_bytes": 65536, "max_tensor_elements": 1000, "max_macs": 50_000, "reference_max_macs": 100}


def zeros(*shape: int) -> dict:
    """A float32 tensor of zeros in base64 form: small on the wire whatever its shape."""
    return {"shape": list(shape), "b64": base64.b64encode(bytes(4 * math.prod(shape))).decode()}


async def chunks(payload: bytes):
    for start in range(0, len(payload), 10_000):
        yield payload[start : start + 10_000]


@pytest.mark.parametrize(
    "path, payload, words",
    [
        pytest.param("/forward", body(input=[[[[0.0] * 40] * 40]]), "CONV_MAX_TENSOR_ELEMENTS", id="elements"),
        pytest.param("/forward", body(input={"shape": [10, 10, 10, 10], "b64": "AAAA"}), "CONV_MAX_TENSOR_ELEMENTS", id="elements-b64"),
        pytest.param(
            "/forward",
            {"input": zeros(1, 1, 30, 30), "weight": zeros(16, 1, 1, 1)},
            "output would have",
            id="output-elements",
        ),
        pytest.param(
            "/backward",
            {"input": zeros(1, 4, 12, 12), "weight": zeros(8, 4, 3, 3)},
            "CONV_MAX_MACS",
            id="macs-backward",
        ),
        pytest.param("/forward", body(algorithm="reference"), "CONV_REFERENCE_MAX_MACS", id="reference-macs"),
        # A 2x2 kernel dilated 80 with padding 40 on one pixel: a 1x1 output, an 81x81 = 6,561-element padded input.
        pytest.param(
            "/forward",
            {"input": zeros(1, 1, 1, 1), "weight": zeros(1, 1, 2, 2), "padding": 40, "dilation": 80},
            "padding: the padded input would have 6,561 elements (shape [1, 1, 81, 81]); the limit is 4,000",
            id="padded-input",
        ),
        pytest.param(
            "/backward",
            {"input": zeros(1, 1, 1, 1), "weight": zeros(1, 1, 2, 2), "padding": 40, "dilation": 80, "padding_mode": "replicate"},
            "CONV_MAX_TENSOR_ELEMENTS",
            id="padded-input-replicate",
        ),
    ],
)
async def test_413_limits(path: str, payload: dict, words: str) -> None:
    async with running(**LIMITS) as (_, client):
        response = await client.post(path, json=payload)
    assert response.status_code == 413, response.text
    assert words in response.json()["detail"]


async def test_padding_up_to_four_times_the_tensor_limit_runs() -> None:
    # 1x1x20x20 input (400 of the 1,000 allowed), padding 21: 62x62 = 3,844 padded elements, under 4,000.
    generator = torch.Generator().manual_seed(0)
    x, w = torch.randn(1, 1, 20, 20, generator=generator), torch.randn(1, 1, 3, 3, generator=generator)
    payload = {"input": x.tolist(), "weight": w.tolist(), "padding": 21, "dilation": 20}
    async with running(**LIMITS) as (_, client):
        response = await client.post("/forward", json=payload)
    assert response.status_code == 200, response.text
    expected = F.conv2d(x.double(), w.double(), padding=21, dilation=20)
    atol, rtol = tolerance(torch.float32)
    torch.testing.assert_close(from_json(response.json()["output"]).double(), expected, atol=atol, rtol=rtol)


async def test_413_declared_content_length() -> None:
    async with running(**LIMITS) as (_, client):
        response = await client.post("/forward", content=b" " * 70_000, headers={"content-type": "application/json"})
    assert response.status_code == 413 and "CONV_MAX_BODY_BYTES" in response.json()["detail"]


async def test_413_streamed_body_without_content_length() -> None:
    async with running(**LIMITS) as (_, client):
        response = await client.post("/forward", content=chunks(b" " * 200_000), headers={"content-type": "application/json"})
    assert response.status_code == 413 and "CONV_MAX_BODY_BYTES" in response.json()["detail"]


def block(worker) -> threading.Event:
    """Occupy a worker's thread until the returned event is set."""
    release = threading.Event()
    worker.submit(lambda device: release.wait(10), deadline=float("inf"))
    return release


async def until(condition, timeout_s: float = 5.0) -> None:
    for _ in range(int(timeout_s / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


@asynccontextmanager
async def full_queue():
    """An app whose CPU worker is busy and whose one queue slot is taken; the waiting request is served after.
    inline_macs=0: the seed problem would otherwise run on the event loop, past the queue."""
    async with running(queue_size=1, retry_after_s=3, inline_macs=0) as (app, client):
        worker = app.state.workers["cpu"]
        release = block(worker)
        await until(lambda: worker.busy)
        waiting = asyncio.create_task(client.post("/forward", json=FORWARD_EXAMPLE))
        await until(lambda: worker.queue_depth == 1)
        try:
            yield app, client
        finally:
            release.set()
        assert (await waiting).status_code == 200


async def test_503_queue_full_with_retry_after() -> None:
    async with full_queue() as (_, client):
        response = await client.post("/forward", json=FORWARD_EXAMPLE)
    assert response.status_code == 503 and response.headers["retry-after"] == "3"
    assert "queue is full" in response.json()["detail"]


async def test_a_big_body_to_a_full_queue_is_refused_before_it_is_parsed() -> None:
    """Past 1 MiB a body cannot hold an inline-sized problem: with its device's queue full it is answered 503
    before it is read and decoded (in a burst, decoding first made the 503 take seconds)."""
    async with full_queue() as (app, client):
        parses = []
        parse = app.state.parser.parse
        app.state.parser.parse = lambda *args: parses.append(args) or parse(*args)
        big = {"input": [[[[0.5] * 512] * 512]], "weight": [[[[1.0]]]]}  # ~1.3 MB of JSON
        response = await client.post("/forward", json=big)
    assert response.status_code == 503 and response.headers["retry-after"] == "3" and "queue is full" in response.json()["detail"]
    assert parses == []


async def test_tiny_auto_problems_run_inline_past_a_busy_worker() -> None:
    """CONV_INLINE_MACS: a seed-sized "auto" request is answered while the device worker is occupied
    (it runs on the event loop); a named algorithm still queues."""
    async with running(inline_macs=1000) as (app, client):
        worker = app.state.workers["cpu"]
        release = block(worker)
        await until(lambda: worker.busy)
        inline = await client.post("/forward", json=FORWARD_EXAMPLE)  # 324 MACs
        queued = asyncio.create_task(client.post("/forward", json=body(algorithm="im2col")))
        await until(lambda: worker.queue_depth == 1)
        assert not queued.done()
        release.set()
        assert (await queued).status_code == 200
    assert inline.status_code == 200 and inline.json()["timing_ms"]["queue"] == 0.0
    assert inline.json()["parity"]["ok"] is True


async def test_few_macs_over_a_huge_padding_queue_instead_of_running_inline() -> None:
    """CONV_INLINE_MACS counts the padded input's and the output's elements too: 4 MACs over a 201x201
    padded input (a 64M-element one held the event loop for 6 s) go through the device queue."""
    sparse = {"input": [[[[1.0]]]], "weight": [[[[1.0, 1.0], [1.0, 1.0]]]], "padding": 100, "dilation": 100, "stride": 1000}
    async with running(inline_macs=1000) as (app, client):
        worker = app.state.workers["cpu"]
        release = block(worker)
        await until(lambda: worker.busy)
        queued = asyncio.create_task(client.post("/forward", json=sparse))
        await until(lambda: worker.queue_depth == 1)
        release.set()
        response = await queued
    assert response.status_code == 200 and response.json()["output"] == [[[[1.0]]]]


async def test_504_while_running_keeps_its_memory_held_and_skips_the_reference(monkeypatch) -> None:
    """A conv cannot be interrupted: past the deadline the client gets its 504 at once, the request's bytes
    stay held (CONV_MAX_INFLIGHT_BYTES) until the conv ends, and no parity reference starts after it."""
    import app.compute as compute

    started, release, references = threading.Event(), threading.Event(), []
    original_ours = compute._ours

    def slow_ours(algorithm):
        conv = original_ours(algorithm)

        def run(*args):
            started.set()
            release.wait(10)
            return conv(*args)

        return run

    monkeypatch.setattr(compute, "_ours", slow_ours)
    monkeypatch.setattr(compute.parity, "reference_conv", lambda *args: references.append(args))
    async with running(inline_macs=0) as (app, client):
        budget = app.state.budget
        response = await client.post("/forward", json=body(timeout_s=0.3))
        assert started.is_set() and budget.held_bytes > 0
        release.set()
        await until(lambda: budget.held_bytes == 0 and not app.state.workers["cpu"].busy)
    assert response.status_code == 504 and "still running on cpu" in response.json()["detail"]
    assert references == []


async def test_504_for_an_inline_problem_past_its_deadline() -> None:
    async with running() as (_, client):
        response = await client.post("/forward", json=body(timeout_s=1e-9))  # tiny "auto": would run inline
    assert response.status_code == 504 and "deadline" in response.json()["detail"]


async def test_504_past_the_deadline_and_the_job_is_dropped() -> None:
    async with running(inline_macs=0) as (app, client):
        worker = app.state.workers["cpu"]
        release = block(worker)
        response = await client.post("/forward", json=body(timeout_s=0.2))
        release.set()
        await until(lambda: worker.queue_depth == 0 and not worker.busy)
        assert worker.dropped == 1
    assert response.status_code == 504 and "deadline" in response.json()["detail"]


@pytest.mark.parametrize(
    "error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"), MemoryError()], ids=["cuda-oom", "cpu-oom"]
)
async def test_507_out_of_memory_then_keeps_serving(monkeypatch, error: Exception) -> None:
    import app.compute as compute

    original = compute.run_forward
    calls = {"count": 0}

    def first_fails(problem, device, deadline=None):
        calls["count"] += 1
        if calls["count"] == 1:
            raise error
        return original(problem, device, deadline)

    monkeypatch.setattr(compute, "run_forward", first_fails)
    async with running() as (_, client):
        failed = await client.post("/forward", json=FORWARD_EXAMPLE)
        after = await client.post("/forward", json=FORWARD_EXAMPLE)
    assert failed.status_code == 507 and "out of memory" in failed.json()["detail"]
    assert after.status_code == 200


async def test_unexpected_bug_is_a_logged_500_without_internals(monkeypatch) -> None:
    import app.compute as compute

    def broken(problem, device, deadline=None):
        raise KeyError("secret internals")

    monkeypatch.setattr(compute, "run_forward", broken)
    async with running() as (app, _):
        import httpx

        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            response = await client.post("/forward", json=FORWARD_EXAMPLE)
    assert response.status_code == 500 and "secret" not in response.text


async def test_unknown_route_is_404(client) -> None:
    response = await client.get("/nope")
    assert response.status_code == 404 and "detail" in response.json()


async def test_algorithm_that_refuses_the_problem_is_422(client) -> None:
    refusing = next((name for name in kernels.names() if name == "pointwise"), None)
    if refusing is None:
        pytest.skip("no algorithm with a shape restriction is registered")
    response = await client.post("/forward", json=body(algorithm=refusing))
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == ["body", "algorithm"]


@pytest.mark.parametrize("field", ["stride", "dilation", "padding", "groups"])
async def test_huge_arguments_are_422_not_overflow(client, field: str) -> None:
    response = await client.post("/forward", json=body(**{field: [1, 2**62] if field != "groups" else 2**62}))
    assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["body", field]
