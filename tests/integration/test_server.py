"""A real uvicorn on loopback, driven with httpx.AsyncClient: the seed end to end, encodings, errors, load, auth."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import socket
import time

import httpx
import orjson
import pytest
import torch

from app.schemas import FORWARD_EXAMPLE
from kernels.tolerances import tolerance
from tests.app.helpers import from_json, nn_conv_grads, seed_body, seed_problem, to_json
from tests.integration.conftest import API_KEY, start, stop, wait_ready
from tests.kernels.cases import has_cxx

pytestmark = pytest.mark.anyio

ENCODINGS = ["list", "flat", "base64"]
KEY = {"authorization": f"Bearer {API_KEY}"}


def close(actual, expected) -> None:
    torch.testing.assert_close(from_json(actual), expected, atol=1e-6, rtol=1e-5)


async def post(url: str, path: str, body, headers: dict | None = None, timeout: float = 60) -> httpx.Response:
    async with httpx.AsyncClient(base_url=url, timeout=timeout) as client:
        return await client.post(path, json=body, headers=headers)


async def test_seed_notebook_example_end_to_end(plain) -> None:
    """The notebook: x (2, 1, 3, 3), Conv2d(1, 2, 3, padding=1); forward, then y.square().mean() backward."""
    x, conv = seed_problem()
    expected = nn_conv_grads(x, conv, loss="mean_square")
    forward = await post(plain.url, "/forward", seed_body(x, conv))
    assert forward.status_code == 200, forward.text
    close(forward.json()["output"], expected["output"])
    assert forward.json()["parity"]["ok"]
    backward = await post(plain.url, "/backward", seed_body(x, conv, loss="mean_square"))
    assert backward.status_code == 200, backward.text
    result = backward.json()
    for name in ("grad_input", "grad_weight", "grad_bias"):
        close(result[name], expected[name])
    assert result["parity"]["ok"] and set(result["parity"]["tensors"]) == {"grad_input", "grad_weight", "grad_bias"}


@pytest.mark.parametrize("encoding", ENCODINGS)
async def test_every_encoding(plain, encoding: str) -> None:
    x, conv = seed_problem(3)
    grad_output = torch.randn(2, 2, 3, 3)
    expected = nn_conv_grads(x, conv, grad_output=grad_output)
    forward = (await post(plain.url, "/forward", seed_body(x, conv, encoding))).json()
    close(forward["output"], expected["output"])
    body = seed_body(x, conv, encoding, grad_output=to_json(grad_output, encoding), return_output=True)
    backward = (await post(plain.url, "/backward", body)).json()
    for name in ("output", "grad_input", "grad_weight", "grad_bias"):
        close(backward[name], expected[name])
        if encoding != "list":
            assert backward[name]["dtype"] == "float32"


@pytest.mark.parametrize("loss", ["sum", "mean_square"])
async def test_backward_without_grad_output(plain, loss: str) -> None:
    x, conv = seed_problem(4)
    expected = nn_conv_grads(x, conv, loss=loss)
    result = (await post(plain.url, "/backward", seed_body(x, conv, loss=loss))).json()
    for name in ("grad_input", "grad_weight", "grad_bias"):
        close(result[name], expected[name])


async def test_non_finite_round_trip(plain) -> None:
    x, conv = seed_problem()
    x[0, 0, 1, 1] = float("nan")
    result = (await post(plain.url, "/forward", seed_body(x, conv, "flat"))).json()
    assert "NaN" in result["output"]["data"] and result["parity"]["ok"]


async def test_32_concurrent_requests(plain) -> None:
    problems = [seed_problem(seed) for seed in range(32)]
    async with httpx.AsyncClient(base_url=plain.url, timeout=60) as client:
        responses = await asyncio.gather(*(client.post("/forward", json=seed_body(x, conv)) for x, conv in problems))
    for (x, conv), response in zip(problems, responses):
        assert response.status_code == 200, response.text
        close(response.json()["output"], conv(x).detach())


async def test_healthz_stays_prompt_while_a_big_body_is_handled(plain) -> None:
    """/healthz keeps answering while a ~13 MB body is read, parsed, computed and a list response encoded.

    On a loaded 2-core machine absolute latencies vary, so the bound is relative: no /healthz waits
    for more than a fraction of the big request, and several complete while it runs.
    """
    x = torch.randn(16, 64, 56, 56)
    body = orjson.dumps({"input": to_json(x, "base64"), "weight": to_json(torch.randn(8, 64, 3, 3), "base64"), "encoding": "list"})
    async with httpx.AsyncClient(base_url=plain.url, timeout=120) as client:
        assert (await client.get("/healthz")).status_code == 200  # the connection for the probes is open
        started = time.perf_counter()
        big = asyncio.create_task(client.post("/forward", content=body, headers={"content-type": "application/json"}))
        latencies = []
        while not big.done():
            start = time.perf_counter()
            assert (await client.get("/healthz")).status_code == 200
            latencies.append(time.perf_counter() - start)
            await asyncio.sleep(0.02)
        assert (await big).status_code == 200
        elapsed = time.perf_counter() - started
    assert len(latencies) > 3 and max(latencies) < max(0.5, elapsed / 3), (elapsed, sorted(latencies)[-5:])


ERRORS = [
    # (server, path, raw body or JSON, headers, status, words in the detail)
    pytest.param("plain", "/forward", b'{"input": [', {"content-type": "application/json"}, 400, "not valid JSON", id="400-json"),
    pytest.param(
        "plain",
        "/forward",
        {"input": {"shape": [1, 1, 3, 3], "b64": "*" * 48}, "weight": [[[[1.0]]]]},
        {},
        400,
        "base64",
        id="400-base64",
    ),
    pytest.param("strict", "/forward", {"input": [[[[1.0]]]], "weight": [[[[1.0]]]]}, {}, 401, "API key", id="401"),
    pytest.param(
        "strict",
        "/forward",
        b"[" + b"0.0," * 1_200_000 + b"0.0]",
        {**KEY, "content-type": "application/json"},
        413,
        "CONV_MAX_BODY_BYTES",
        id="413-body",
    ),
    pytest.param(
        "plain",
        "/forward",
        {"input": {"shape": [4096, 4096, 2], "b64": ""}, "weight": [[[[1.0]]]]},
        {},
        413,
        "CONV_MAX_TENSOR_ELEMENTS",
        id="413-elements",
    ),
    pytest.param(
        "plain",
        "/backward",
        {"input": {"shape": [64, 256, 64, 64], "b64": ""}, "weight": {"shape": [256, 256, 3, 3], "b64": ""}},
        {},
        413,
        "CONV_MAX_TENSOR_ELEMENTS",
        id="413-elements-first",
    ),
    pytest.param("plain", "/forward", b"{}", {"content-type": "text/plain"}, 415, "application/json", id="415"),
    pytest.param("plain", "/forward", {"input": [[1.0]], "weight": [[[[1.0]]]]}, {}, 422, "input", id="422-rank"),
    pytest.param("plain", "/forward", {"input": [[[[1.0]]]], "weight": [[[[1.0]]]], "groups": 2}, {}, 422, "groups", id="422-groups"),
    pytest.param(
        "plain", "/forward", {"input": [[[[1.0]]]], "weight": [[[[1.0]]]], "padding_mode": "x"}, {}, 422, "padding_mode", id="422-name"
    ),
]


@pytest.mark.parametrize("server, path, payload, headers, status, words", ERRORS)
async def test_error_classes(servers, server: str, path: str, payload, headers: dict, status: int, words: str) -> None:
    async with httpx.AsyncClient(base_url=servers[server].url, timeout=30) as client:
        if isinstance(payload, bytes):
            response = await client.post(path, content=payload, headers=headers)
        else:
            response = await client.post(path, json=payload, headers=headers)
    assert response.status_code == status, response.text
    assert words in str(response.json()["detail"])


async def test_413_streamed_body(strict) -> None:
    async def chunks():
        for _ in range(100):
            yield b" " * 65536

    async with httpx.AsyncClient(base_url=strict.url, timeout=30) as client:
        response = await client.post("/forward", content=chunks(), headers={**KEY, "content-type": "application/json"})
    assert response.status_code == 413 and "CONV_MAX_BODY_BYTES" in response.json()["detail"]


def heavy_body(seed: int, **fields) -> dict:
    generator = torch.Generator().manual_seed(seed)
    x, w = torch.randn(4, 32, 48, 48, generator=generator), torch.randn(32, 32, 3, 3, generator=generator)
    return {"input": to_json(x, "base64"), "weight": to_json(w, "base64"), "padding": 1, "encoding": "base64", **fields}


async def test_503_when_the_queue_is_full(strict) -> None:
    async with httpx.AsyncClient(base_url=strict.url, timeout=60, headers=KEY) as client:
        responses = await asyncio.gather(*(client.post("/backward", json=heavy_body(seed)) for seed in range(8)))
    statuses = sorted(response.status_code for response in responses)
    assert 200 in statuses and 503 in statuses and set(statuses) <= {200, 503}, statuses
    refused = next(response for response in responses if response.status_code == 503)
    assert int(refused.headers["retry-after"]) >= 1 and "queue is full" in refused.json()["detail"]


async def test_504_past_the_deadline(plain) -> None:
    response = await post(plain.url, "/backward", heavy_body(0, timeout_s=0.001))
    assert response.status_code == 504 and "deadline" in response.json()["detail"]


async def test_api_key_on_and_off(plain, strict) -> None:
    x, conv = seed_problem()
    assert (await post(plain.url, "/forward", seed_body(x, conv))).status_code == 200
    assert (await post(strict.url, "/forward", seed_body(x, conv))).status_code == 401
    assert (await post(strict.url, "/forward", seed_body(x, conv), {"authorization": "Bearer nope"})).status_code == 401
    assert (await post(strict.url, "/forward", seed_body(x, conv), KEY)).status_code == 200
    async with httpx.AsyncClient(base_url=strict.url) as client:
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/info")).json()["auth"] is True


async def test_base64_survives_the_wire_bit_for_bit(plain) -> None:
    x = torch.randn(1, 1, 4, 4, dtype=torch.float64)
    result = (
        await post(
            plain.url,
            "/forward",
            {"input": to_json(x, "base64"), "weight": to_json(torch.ones(1, 1, 1, 1, dtype=torch.float64), "base64"), "encoding": "base64"},
        )
    ).json()
    assert base64.b64decode(result["output"]["b64"]) == x.numpy().tobytes()


async def test_a_large_response_arrives_whole(plain) -> None:
    """A response over app/responses.JOIN_MAX_BYTES is sent in parts (tensor JSON, then the report): over a
    real socket it must still be one JSON object of the declared length, the tensor bit for bit."""
    x = torch.randn(1, 1, 96, 96, dtype=torch.float64)  # 72 KiB raw, ~98 KiB of base64
    body = {"input": to_json(x, "base64"), "weight": to_json(torch.ones(1, 1, 1, 1, dtype=torch.float64), "base64"), "encoding": "base64"}
    async with httpx.AsyncClient(base_url=plain.url, timeout=60) as client:
        response = await client.post("/forward", json=body)
    assert response.status_code == 200, response.text
    assert int(response.headers["content-length"]) == len(response.content) > 96 * 1024
    result = orjson.loads(response.content)
    assert base64.b64decode(result["output"]["b64"]) == x.numpy().tobytes()
    assert result["parity"]["ok"] and set(result["timing_ms"]) >= {"decode", "compute", "encode", "total"}


async def test_an_idle_keep_alive_connection_outlives_the_clients_pool_expiry(plain) -> None:
    """CONV_KEEP_ALIVE_S (75 s) reaches uvicorn: a connection idle for 6 s, past httpx's pool expiry and
    uvicorn's own default (5 s), still answers. Closing it at the client's expiry races the client's reuse,
    and a request sent into the close is reset (the flood in tests/reliability saw two)."""
    host, port = plain.url.removeprefix("http://").split(":")
    request = f"GET /healthz HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        for pause in (0.0, 6.0):
            await asyncio.sleep(pause)
            writer.write(request)
            await writer.drain()
            status = await asyncio.wait_for(reader.readline(), 10)
            assert status.startswith(b"HTTP/1.1 200"), (pause, status)
            headers = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            length = int(next(line.split(b":")[1] for line in headers.split(b"\r\n") if line.lower().startswith(b"content-length")))
            await asyncio.wait_for(reader.readexactly(length), 10)
    finally:
        writer.close()


async def test_zz_no_server_error_was_ever_answered(servers) -> None:
    """Runs last in this module: no request above got a 5xx other than the documented 503 / 504 / 507."""
    for server in servers.values():
        async with httpx.AsyncClient(base_url=server.url) as client:
            metrics = (await client.get("/metrics")).text
        statuses = {line.split('status="')[1].split('"')[0] for line in metrics.splitlines() if line.startswith("conv_requests_total{")}
        assert statuses and not {status for status in statuses if status.startswith("5")} - {"503", "504", "507"}, statuses
        assert server.process.poll() is None, server.log_tail()


def _children(pid: int) -> list[int]:
    """Process ids whose parent is `pid` (from /proc)."""
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()  # noqa: SIM115 - read at once
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                children.append(int(entry))
    return children


def _cmdline(pid: int) -> bytes:
    with open(f"/proc/{pid}/cmdline", "rb") as file:
        return file.read()


def _environ(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as file:
        pairs = (item.split(b"=", 1) for item in file.read().split(b"\0") if b"=" in item)
        return {key.decode(): value.decode() for key, value in pairs}


def _forward_counts(metrics_text: str) -> dict[str, float]:
    """conv_requests_total for /forward by status, from an exposition text."""
    counts: dict[str, float] = {}
    for line in metrics_text.splitlines():
        if line.startswith("conv_requests_total{") and 'endpoint="/forward"' in line:
            status = line.split('status="', 1)[1].split('"', 1)[0]
            counts[status] = counts.get(status, 0) + float(line.rsplit(" ", 1)[1])
    return counts


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc (Linux)")
async def test_two_processes_share_the_port_the_cores_and_their_metrics(tmp_path) -> None:
    """CONV_PROCESSES=2: two uvicorn worker processes under one supervisor, each with cores/2 torch threads,
    both answering on the one port (fresh connections are spread by the kernel); whichever answers /metrics
    reports both processes' requests, from a directory the supervisor removes when it stops."""
    server = start(tmp_path, "two", CONV_PROCESSES="2")
    try:
        wait_ready(server)
        # The supervisor's children: multiprocessing's resource tracker and the workers (spawned; each has its parser).
        workers = [pid for pid in _children(server.process.pid) if b"spawn_main" in _cmdline(pid)]
        threads = str(max(1, len(os.sched_getaffinity(0)) // 2))
        assert len(workers) == 2, workers
        assert [_environ(pid).get("OMP_NUM_THREADS") for pid in workers] == [threads, threads]
        shared = {_environ(pid).get("PROMETHEUS_MULTIPROC_DIR") for pid in workers}
        assert len(shared) == 1 and os.path.isdir(shared_dir := shared.pop()), shared
        statuses = []
        for _ in range(12):  # one connection each, so both processes take some
            statuses.append((await post(server.url, "/forward", FORWARD_EXAMPLE)).status_code)
        for _ in range(3):
            statuses.append((await post(server.url, "/forward", {"input": 1})).status_code)
        # Until each process has counted a request (its counter file), so that one process's figures cannot pass.
        while not all(os.path.exists(os.path.join(shared_dir, f"counter_{pid}.db")) for pid in workers) and len(statuses) < 200:
            statuses.append((await post(server.url, "/forward", FORWARD_EXAMPLE)).status_code)
        assert all(os.path.exists(os.path.join(shared_dir, f"counter_{pid}.db")) for pid in workers), os.listdir(shared_dir)
        assert statuses.count(422) == 3 and statuses.count(200) == len(statuses) - 3, statuses
        for _ in range(4):  # fresh connections: both processes answer some of the scrapes
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
                scraped = (await client.get("/metrics")).text
            assert _forward_counts(scraped) == {"200": len(statuses) - 3, "422": 3}
            assert "conv_in_flight_requests 0.0" in scraped.splitlines()
    finally:
        stop(server)
    assert not os.path.exists(shared_dir)


@pytest.mark.skipif(not has_cxx(), reason="no C++ compiler here: Inductor cannot compile")
async def test_depthwise_compiles_in_the_background_then_serves_compiled_code(plain) -> None:
    """CONV_COMPILE=background (the default): the first stride-1 depthwise request is answered by the eager path
    while its exact shapes compile; once /info counts them, the same requests run the compiled code, same numbers."""
    torch.manual_seed(12)
    x, conv = torch.randn(1, 32, 32, 32), torch.nn.Conv2d(32, 32, 3, padding=1, groups=32)  # 295K MACs: past MIN_MACS
    grad_output = torch.randn(1, 32, 32, 32)
    expected = nn_conv_grads(x, conv, grad_output=grad_output)
    forward_body = {**seed_body(x, conv, "base64"), "groups": 32}
    backward_body = {**forward_body, "grad_output": to_json(grad_output, "base64")}

    async def check() -> None:
        forward = await post(plain.url, "/forward", forward_body)
        assert forward.status_code == 200, forward.text
        assert forward.json()["parity"]["ok"]
        close(forward.json()["output"], expected["output"])
        backward = await post(plain.url, "/backward", backward_body)
        assert backward.status_code == 200, backward.text
        assert backward.json()["parity"]["ok"]
        atol, rtol = tolerance(torch.float32)  # sums over 1,024 pixels: the float32 row, not close()'s 1e-6
        for name in ("grad_input", "grad_weight", "grad_bias"):
            torch.testing.assert_close(from_json(backward.json()[name]), expected[name], atol=atol, rtol=rtol)

    async with httpx.AsyncClient(base_url=plain.url, timeout=30) as client:
        before = (await client.get("/info")).json()["compiled_kernels"]
        assert before["mode"] == "background" and before["failed"] is None, before
        await check()  # eager, and queues the compiles
        deadline = time.monotonic() + 240
        while (stats := (await client.get("/info")).json()["compiled_kernels"])["pending"] and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
        assert stats["failed"] is None, stats
        assert stats["pending"] == 0, f"compiles still pending after 240 s: {stats}"
        assert stats["compiled"] >= before["compiled"] + 2, stats  # forward and backward
        await check()
        after = (await client.get("/info")).json()["compiled_kernels"]
        assert after["calls"] >= stats["calls"] + 2, f"the compiled code did not run in the server: {after}"


def _gauge(metrics_text: str, name: str) -> float:
    return next(float(line.rsplit(" ", 1)[1]) for line in metrics_text.splitlines() if line.startswith(name + " "))


async def test_a_client_that_stops_reading_its_response_is_cut_off_and_its_memory_freed(tmp_path) -> None:
    """A response waits in the socket for a client that reads nothing: its memory stays counted in
    CONV_MAX_INFLIGHT_BYTES until sent, and after CONV_BODY_TIMEOUT_S with nothing read the server cuts the
    connection and frees it (before: counted as freed once built, yet held until the client closed, no timeout)."""
    server = start(tmp_path, "stalled", CONV_BODY_TIMEOUT_S="2")
    try:
        wait_ready(server)
        x, w = torch.randn(1, 1, 256, 256), torch.randn(32, 1, 1, 1)  # 2M output elements: 11 MB of base64
        body = orjson.dumps({"input": to_json(x, "base64"), "weight": to_json(w, "base64"), "encoding": "base64", "parity": False})
        port = int(server.url.rsplit(":", 1)[1])
        stalled = socket.socket()
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.connect(("127.0.0.1", port))
        head = f"POST /forward HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
        stalled.sendall(head.encode() + body)
        assert stalled.recv(12) == b"HTTP/1.1 200"  # then it reads nothing more
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            held = _gauge((await client.get("/metrics")).text, "conv_inflight_bytes")
            assert held > 11e6, held  # the response's bytes, while it waits to be sent
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and _gauge((await client.get("/metrics")).text, "conv_inflight_bytes") > 0:
                await asyncio.sleep(0.2)
            scraped = (await client.get("/metrics")).text
        assert _gauge(scraped, "conv_inflight_bytes") == 0 and _gauge(scraped, "conv_in_flight_requests") == 0
        stalled.settimeout(10)
        received = 12
        with contextlib.suppress(ConnectionResetError):
            while chunk := stalled.recv(1 << 20):
                received += len(chunk)
        assert received < 11e6, received  # cut off: the rest of the response was dropped
        stalled.close()
        assert (await post(server.url, "/forward", FORWARD_EXAMPLE)).status_code == 200
    finally:
        stop(server)


async def test_the_gemm_backend_a_server_runs_and_pins(plain, tmp_path) -> None:
    """GET /info says which GEMM backend the server's warm-up chose (kernels/gemm.py); CONV_GEMM=torch pins torch's.
    A layer whose GEMMs are big enough for either backend (im2col, 64 channels: 9.4M multiply-adds per product)
    gives nn.Conv2d's output and gradients from both servers."""
    torch.manual_seed(14)
    x, conv = torch.randn(1, 64, 16, 16), torch.nn.Conv2d(64, 64, 3, padding=1)
    grad_output = torch.randn(1, 64, 16, 16)
    expected = nn_conv_grads(x, conv, grad_output=grad_output)
    body = {**seed_body(x, conv, "base64"), "algorithm": "im2col", "grad_output": to_json(grad_output, "base64")}
    atol, rtol = tolerance(torch.float32)
    pinned = start(tmp_path, "gemm_torch", CONV_GEMM="torch")
    try:
        wait_ready(pinned)
        for server, wanted in ((plain, ("onednn", "torch")), (pinned, ("torch",))):
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
                assert (await client.get("/info")).json()["cpu_gemm"] in wanted
            answer = await post(server.url, "/backward", body)
            assert answer.status_code == 200, answer.text
            assert answer.json()["parity"]["ok"]
            for name in ("grad_input", "grad_weight", "grad_bias"):
                torch.testing.assert_close(from_json(answer.json()[name]), expected[name], atol=atol, rtol=rtol)
    finally:
        stop(pinned)
