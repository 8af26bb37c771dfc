"""Faults: a client gone while queued, a kernel that raises, a CUDA OOM, SIGTERM with work in flight, a slow client.

The faulty algorithms (tests/reliability/faulty.py) exist only in the test server's process; each run
is written to the fault record as "<algorithm> <input width>", the width tagging the request.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import httpx
import pytest
import torch

from app.errors import OutOfDeviceMemory
from app.worker import DeviceWorker
from tests.integration.conftest import Server, stop, wait_ready
from tests.reliability.conftest import assert_clean, assert_healthy, launch, read_response, record, seed_body, tagged_body

pytestmark = pytest.mark.anyio


def runs(record_path: Path) -> list[str]:
    return record_path.read_text().splitlines() if record_path.exists() else []


async def wait_for_run(record_path: Path, line: str, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while line not in runs(record_path):
        assert time.monotonic() < deadline, f"{line!r} never ran; runs: {runs(record_path)}"
        await asyncio.sleep(0.05)


def dropped_jobs(server: Server) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("conv_jobs_dropped{"))


async def raw_request(url: str, path: str, body: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    head = f"POST {path} HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
    writer.write(head.encode() + body)
    await writer.drain()
    return reader, writer


async def test_client_gone_while_queued_frees_its_slot_without_running(faulty_server, fault_record) -> None:
    """Queue of one: A runs (1.5 s), B waits and hangs up, C must take B's slot at once; B never runs."""
    dropped_before = dropped_jobs(faulty_server)
    async with httpx.AsyncClient(base_url=faulty_server.url, timeout=60) as client:
        first = asyncio.create_task(client.post("/forward", json=tagged_body("fault_sleep", 11)))
        await wait_for_run(fault_record, "fault_sleep 11")
        _, gone_writer = await raw_request(
            faulty_server.url, "/forward", httpx.Request("POST", "/", json=tagged_body("fault_sleep", 12)).read()
        )
        await asyncio.sleep(0.3)
        gone_writer.close()
        await asyncio.sleep(0.4)  # the server polls for disconnects every 0.1 s
        third = await client.post("/forward", json=tagged_body("fault_sleep", 13))
        assert third.status_code == 200, f"the slot was not freed: {third.status_code} {third.text}"
        assert (await first).status_code == 200
    await asyncio.sleep(0.2)
    assert "fault_sleep 12" not in runs(fault_record), runs(fault_record)
    assert dropped_jobs(faulty_server) >= dropped_before + 1
    assert_healthy(faulty_server)


@pytest.mark.parametrize(
    ("fault", "status", "phrase"),
    [("fault_raise", 500, "internal error"), ("fault_oom", 507, "out of memory")],
    ids=["kernel-exception-500", "out-of-memory-507"],
)
async def test_a_failed_kernel_is_a_clean_error_and_the_worker_serves_the_next_request(
    faulty_server, fault: str, status: int, phrase: str
) -> None:
    async with httpx.AsyncClient(base_url=faulty_server.url, timeout=60) as client:
        for route in ("/forward", "/backward"):
            failed = await client.post(route, json=tagged_body(fault, 3))
            assert failed.status_code == status, failed.text
            assert phrase in failed.json()["detail"]
            assert_clean(failed)
            # A named algorithm goes through the device worker (a tiny "auto" one would run inline).
            after = await client.post(route, json=seed_body(algorithm="im2col"))
            assert after.status_code == 200, after.text
        assert (await client.get("/readyz")).status_code == 200


async def test_out_of_memory_on_cuda_frees_the_cache(monkeypatch) -> None:
    """The worker's OOM path on a CUDA device, without a GPU: the allocator's cache is freed once."""
    freed: list[bool] = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: freed.append(True))
    worker = DeviceWorker(torch.device("cuda:0"), queue_size=2)
    worker.start(None)
    try:

        def allocate(device: torch.device) -> None:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

        with pytest.raises(OutOfDeviceMemory):
            await worker.run(allocate, time.monotonic() + 10)
        assert freed == [True]
        assert worker.healthy
        assert await worker.run(lambda device: "next", time.monotonic() + 10) == "next"
    finally:
        await worker.stop()


async def test_sigterm_drains_in_flight_requests(tmp_path) -> None:
    """Four 1 s computations in flight (one running, three queued) when SIGTERM comes: all four answered."""
    record_path = tmp_path / "runs.txt"
    server = launch(
        tmp_path,
        "drain",
        "tests.reliability.serve_faulty",
        CONV_QUEUE_SIZE="8",
        CONV_PARSE_PROCESSES="0",
        FAULTY_SLEEP_S="1.0",
        FAULTY_RECORD=str(record_path),
    )
    try:
        wait_ready(server)
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            in_flight = [asyncio.create_task(client.post("/forward", json=tagged_body("fault_sleep", 20 + index))) for index in range(4)]
            await wait_for_run(record_path, "fault_sleep 20")
            await asyncio.sleep(0.2)
            server.process.send_signal(signal.SIGTERM)
            answers = await asyncio.gather(*in_flight, return_exceptions=True)
        statuses = [getattr(answer, "status_code", repr(answer)) for answer in answers]
        exit_code = await asyncio.to_thread(server.process.wait, 30)
        record("sigterm_drain", in_flight=len(in_flight), answered_200=statuses.count(200), exit_code=exit_code)
        assert statuses == [200] * 4, f"{statuses}\n{server.log_tail()}"
        # uvicorn re-raises the SIGTERM it caught once shutdown has finished, so a clean exit reads -15.
        assert exit_code in (0, -signal.SIGTERM), server.log_tail()
        assert "Traceback" not in server.log_tail()
        assert sorted(runs(record_path)) == [f"fault_sleep {20 + index}" for index in range(4)]
    finally:
        stop(server)


async def test_slow_client_cannot_hold_the_server(faulty_server) -> None:
    """A body sent a byte every 0.25 s is cut off at CONV_BODY_TIMEOUT_S (2 s) with 408; others are served meanwhile."""
    host, port = faulty_server.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"POST /forward HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n")
    await writer.drain()
    start = time.monotonic()
    answer = asyncio.ensure_future(read_response(reader))
    served = 0
    async with httpx.AsyncClient(base_url=faulty_server.url, timeout=30) as client:
        for _ in range(60):  # 15 s at most
            if answer.done():
                break
            try:
                writer.write(b" ")
                await writer.drain()
            except ConnectionError:
                break
            if (await client.post("/forward", json=seed_body())).status_code == 200:
                served += 1
            await asyncio.sleep(0.25)
        data = await asyncio.wait_for(answer, 10)
    elapsed = time.monotonic() - start
    writer.close()
    record("slow_client", cut_off_after_s=round(elapsed, 2), others_served_meanwhile=served)
    assert data.startswith(b"HTTP/1.1 408"), data[:300]
    assert b"CONV_BODY_TIMEOUT_S" in data and b"connection: close" in data.lower()
    assert elapsed < 8, f"the slow client held its connection for {elapsed:.1f} s"
    assert served >= 2
    # The server closes the socket after the 408, though the client keeps trickling bytes (before, it kept it).
    closed = False
    for _ in range(20):
        try:
            writer.write(b" ")
            await writer.drain()
            closed = await asyncio.wait_for(reader.read(1), 0.25) == b""
        except ConnectionError:
            closed = True
        except TimeoutError:
            pass
        if closed:
            break
    assert closed, "the connection stayed open after the 408"
    assert_healthy(faulty_server)


async def test_an_oversized_request_head_is_refused_before_it_is_parsed(main_server) -> None:
    """app/http.py: a head over 64 KiB (one huge header, or thousands) gets 431 and a closed connection; a
    60 KB one is served. Before, 10 MB headers were accepted, parsed on the event loop."""
    from app.http import MAX_HEAD_BYTES

    host, port = main_server.url.removeprefix("http://").split(":")
    heads = {
        "one huge header": b"x-big: " + b"a" * (MAX_HEAD_BYTES + 10) + b"\r\n",
        "many headers": b"".join(b"x-h%d: v\r\n" % index for index in range(MAX_HEAD_BYTES // 8)),
        "60 KB header": b"x-big: " + b"a" * 60_000 + b"\r\n",
    }
    for name, headers in heads.items():
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"GET /healthz HTTP/1.1\r\nhost: x\r\n" + headers + b"\r\n")
        await writer.drain()
        answer = await asyncio.wait_for(read_response(reader), 10)
        writer.close()
        expected = b"HTTP/1.1 200" if name == "60 KB header" else b"HTTP/1.1 431"
        assert answer.startswith(expected), (name, answer[:200])
    assert_healthy(main_server)


async def test_a_request_head_that_never_ends_is_cut_off(faulty_server) -> None:
    """Half a head, then silence: closed at CONV_BODY_TIMEOUT_S (2 s here), as a slow body is. Before, such
    connections stayed open until the client left, and enough of them exhausted the file limit."""
    host, port = faulty_server.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"POST /forward HTTP/1.1\r\nhost: x\r\ncontent-type: appl")
    await writer.drain()
    start = time.monotonic()
    assert await asyncio.wait_for(reader.read(100), 15) == b""
    elapsed = time.monotonic() - start
    writer.close()
    assert 1.5 < elapsed < 6, f"closed after {elapsed:.1f} s"
    assert_healthy(faulty_server)
