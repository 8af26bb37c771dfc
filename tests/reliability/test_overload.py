"""Overload: 20x the queue size of concurrent clients for a fixed time, against a server with a queue of 4.

Only 200s and fast 503s with Retry-After; admitted requests keep a bounded p99; /healthz answers
throughout; the process RSS comes back near its baseline afterwards.
"""

from __future__ import annotations

import asyncio
import base64
import json
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator

import httpx
import orjson
import pytest
import torch

from tests.integration.conftest import Server
from tests.reliability.conftest import assert_healthy, record, rss_bytes, seed_body, session_server, tagged_body

pytestmark = pytest.mark.anyio

QUEUE_SIZE = 2
CLIENTS = 20 * QUEUE_SIZE
FLOOD_S = 6.0
MiB = 1 << 20


@pytest.fixture(scope="module")
def overload_server(tmp_path_factory) -> Iterator[Server]:
    # One compute thread: on a 2-core runner torch's default (all cores) would starve the flooding client.
    yield from session_server(tmp_path_factory, "overload", CONV_HOST="127.0.0.1", CONV_QUEUE_SIZE=str(QUEUE_SIZE), OMP_NUM_THREADS="1")


def _b64(tensor: torch.Tensor) -> dict:
    return {"shape": list(tensor.shape), "dtype": "float32", "b64": base64.b64encode(tensor.numpy().tobytes()).decode()}


# 1x16x32x32 input, 32 filters 7x7: 26M MACs (tens of ms with parity) from a 150 kB body, so the queue
# fills while the test's own loop stays light. Serialised once.
BODY = orjson.dumps(
    {"input": _b64(torch.randn(1, 16, 32, 32)), "weight": _b64(torch.randn(32, 16, 7, 7)), "padding": 3, "encoding": "base64"}
)
JSON = {"content-type": "application/json"}
# Latencies are measured by a probe in its own process, one request at a time (GET /healthz, then five
# POST /forward): in the flooding loop they would be the test's own scheduling delay, not the server's.
PROBE = """
import json, sys, time, httpx
url, seconds, body = sys.argv[1], float(sys.argv[2]), open(sys.argv[3], "rb").read()
seen, stop_at = [], time.monotonic() + seconds
with httpx.Client(base_url=url, timeout=30) as client:
    while time.monotonic() < stop_at:
        for method, path in (("GET", "/healthz"), *[("POST", "/forward")] * 5):
            start = time.monotonic()
            try:
                response = client.request(method, path, content=body if method == "POST" else None, headers={"content-type": "application/json"})
                seen.append([path, response.status_code, time.monotonic() - start, response.headers.get("retry-after")])
            except httpx.TransportError as error:
                seen.append([path, type(error).__name__, time.monotonic() - start, None])
        time.sleep(0.05)
print(json.dumps(seen))
"""


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98] if len(values) >= 2 else (values[0] if values else 0.0)


async def _client(client: httpx.AsyncClient, stop_at: float, results: list) -> None:
    while time.monotonic() < stop_at:
        start = time.monotonic()
        try:
            response = await client.post("/forward", content=BODY, headers=JSON)
            results.append((response.status_code, time.monotonic() - start, response.headers.get("retry-after")))
        except httpx.TransportError as error:
            results.append((type(error).__name__, time.monotonic() - start, None))


async def test_flood_gets_only_200s_and_fast_503s(overload_server, tmp_path) -> None:
    async with httpx.AsyncClient(base_url=overload_server.url, timeout=60) as client:
        alone = []
        for _ in range(5):  # warm up, and the single-request latency the p99 bound is built on
            start = time.monotonic()
            assert (await client.post("/forward", content=BODY, headers=JSON)).status_code == 200
            alone.append(time.monotonic() - start)
    await asyncio.sleep(1.0)
    rss_before = rss_bytes(overload_server.process.pid)

    results: list = []
    body_file = tmp_path / "body.json"
    body_file.write_bytes(BODY)
    probe = subprocess.Popen(
        [sys.executable, "-c", PROBE, overload_server.url, str(FLOOD_S), str(body_file)], stdout=subprocess.PIPE, text=True
    )
    await asyncio.sleep(0.5)  # the probe's interpreter starts before the flood does
    limits = httpx.Limits(max_connections=CLIENTS + 2, max_keepalive_connections=CLIENTS + 2)
    async with httpx.AsyncClient(base_url=overload_server.url, timeout=60, limits=limits) as client:
        stop_at = time.monotonic() + FLOOD_S
        await asyncio.gather(*(_client(client, stop_at, results) for _ in range(CLIENTS)))
    probed = json.loads((await asyncio.to_thread(probe.communicate, timeout=60))[0])
    health_statuses = [status for path, status, _, _ in probed if path == "/healthz"]
    health_latencies = [seconds for path, _, seconds, _ in probed if path == "/healthz"]
    probe_admitted = [seconds for path, status, seconds, _ in probed if path == "/forward" and status == 200]
    probe_refused = [seconds for path, status, seconds, _ in probed if path == "/forward" and status == 503]
    results += [(status, seconds, retry_after) for path, status, seconds, retry_after in probed if path == "/forward"]
    await asyncio.sleep(2.0)
    rss_after = rss_bytes(overload_server.process.pid)

    by_status = Counter(status for status, _, _ in results)
    admitted = [seconds for status, seconds, _ in results if status == 200]
    refused = [(seconds, retry_after) for status, seconds, retry_after in results if status == 503]
    refused_seconds = [seconds for seconds, _ in refused]
    single = statistics.median(alone)
    bound_s = max(5.0, 10 * (QUEUE_SIZE + 1) * single)
    record(
        "overload",
        clients=CLIENTS,
        queue_size=QUEUE_SIZE,
        seconds=FLOOD_S,
        requests=len(results),
        by_status={str(status): count for status, count in sorted(by_status.items(), key=str)},
        single_request_ms=round(single * 1e3, 1),
        flood_admitted_p50_ms=round(statistics.median(admitted) * 1e3, 1) if admitted else None,
        flood_admitted_p99_ms=round(p99(admitted) * 1e3, 1),
        admitted_p99_bound_ms=round(bound_s * 1e3),
        flood_refused_p50_ms=round(statistics.median(refused_seconds) * 1e3, 1) if refused else None,
        flood_refused_p99_ms=round(p99(refused_seconds) * 1e3, 1),
        probe_admitted=len(probe_admitted),
        probe_admitted_p99_ms=round(p99(probe_admitted) * 1e3, 1),
        probe_refused=len(probe_refused),
        probe_refused_max_ms=round(max(probe_refused, default=0) * 1e3, 1),
        healthz_checks=len(health_statuses),
        healthz_max_ms=round(max(health_latencies) * 1e3, 1),
        rss_before_mib=round(rss_before / MiB, 1),
        rss_after_mib=round(rss_after / MiB, 1),
    )
    assert set(by_status) <= {200, 503}, by_status
    assert by_status[200] >= QUEUE_SIZE and by_status[503] > 0, f"the flood never filled the queue: {by_status}"
    assert all(retry_after == "1" for _, retry_after in refused)
    assert probe_admitted, "the probe was never admitted"
    # Where the probe met a full queue, the 503 came at once (test_full_queue_answers_503_at_once pins it down).
    assert max(probe_refused, default=0) < 1.0
    assert p99(probe_admitted) < bound_s
    assert health_statuses and set(health_statuses) == {200}, Counter(health_statuses)
    assert max(health_latencies) < 2.0
    assert rss_after < rss_before + 200 * MiB, f"RSS {rss_before / MiB:.0f} MiB -> {rss_after / MiB:.0f} MiB"
    assert_healthy(overload_server)


async def test_full_queue_answers_503_at_once(faulty_server) -> None:
    """Queue of one: A holds the device for 1.5 s, B waits; C is refused with Retry-After while A still runs."""
    async with httpx.AsyncClient(base_url=faulty_server.url, timeout=60) as client:
        first = asyncio.create_task(client.post("/forward", json=tagged_body("fault_sleep", 31)))
        await asyncio.sleep(0.5)
        second = asyncio.create_task(client.post("/forward", json=tagged_body("fault_sleep", 32)))
        await asyncio.sleep(0.3)
        start = time.monotonic()
        # A named algorithm queues: a tiny "auto" problem would run inline, past the full queue (CONV_INLINE_MACS).
        refused = await client.post("/forward", json=seed_body(algorithm="im2col"))
        elapsed = time.monotonic() - start
        still_running = not first.done()
        statuses = [(await first).status_code, (await second).status_code]
    record("full_queue_refusal", refusal_ms=round(elapsed * 1e3, 1), retry_after=refused.headers.get("retry-after"))
    assert refused.status_code == 503, refused.text
    assert refused.headers["retry-after"] == "1" and "queue is full" in refused.json()["detail"]
    assert still_running and elapsed < 1.0, f"the 503 took {elapsed:.2f} s"
    assert statuses == [200, 200]
