"""503 + Retry-After: retried after at least the server's delay, bounded; a response cut mid-message or a
connection reset: sent again, bounded. Tested on a loopback stub server."""

from __future__ import annotations

import base64
import json
import socket
import struct
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import numpy as np
import pytest

from app.client import AsyncClient, Client, ServiceUnavailable

OUTPUT = np.arange(6, dtype=np.float32).reshape(1, 1, 2, 3)
PAYLOAD = {
    "output": {"shape": [1, 1, 2, 3], "dtype": "float32", "b64": base64.b64encode(OUTPUT.tobytes()).decode()},
    "algorithm": "im2col",
    "device": "cpu",
    "dtype": "float32",
    "parity": None,
    "timing_ms": {},
}


class Stub:
    """Answers 503 with Retry-After `retry_after` to the first `failures` POSTs, then 200 with PAYLOAD.

    retry_after "cut": the failures are 200 headers with a Content-Length, then the connection closed
    before the body (what a client sees when a replica dies mid-answer behind a load balancer).
    retry_after "reset": the failures are the connection reset (RST) with no answer (what a client sees
    when it reuses a pooled connection just as the server closes it as idle)."""

    def __init__(self, failures: int, retry_after: str) -> None:
        self.failures, self.retry_after, self.arrivals = failures, retry_after, []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["content-length"]))
                stub.arrivals.append(time.monotonic())
                failing = len(stub.arrivals) <= stub.failures
                if failing and stub.retry_after == "reset":
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.connection.close()  # linger 0: RST, not FIN
                    self.close_connection = True
                    return
                if failing and stub.retry_after == "cut":
                    self.send_response(200)
                    self.send_header("Content-Length", "261")
                    self.end_headers()
                    self.wfile.flush()
                    self.close_connection = True
                    return
                body = json.dumps({"detail": "the cpu queue is full (1 waiting); retry later"} if failing else PAYLOAD).encode()
                self.send_response(503 if failing else 200)
                if failing:
                    self.send_header("Retry-After", stub.retry_after)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def stub(request) -> Iterator[Stub]:
    failures, retry_after = request.param
    server = Stub(failures, retry_after)
    yield server
    server.server.shutdown()
    server.server.server_close()


ARGS = (np.zeros((1, 1, 2, 3), np.float32), np.zeros((1, 1, 1, 1), np.float32))


@pytest.mark.parametrize("stub", [(2, "1")], indirect=True)
def test_retries_after_retry_after(stub) -> None:
    with Client(stub.url) as client:
        result = client.forward(*ARGS)
    np.testing.assert_array_equal(result.output, OUTPUT)
    assert len(stub.arrivals) == 3
    waits = np.diff(stub.arrivals)
    assert all(1.0 <= wait < 1.5 for wait in waits), waits  # Retry-After 1 s, plus at most 20% jitter


@pytest.mark.parametrize("stub", [(5, "0")], indirect=True)
def test_gives_up_after_bounded_attempts(stub) -> None:
    with Client(stub.url, retries=2) as client, pytest.raises(ServiceUnavailable) as error:
        client.forward(*ARGS)
    assert len(stub.arrivals) == 3 and error.value.retry_after == 0 and "queue is full" in error.value.detail


@pytest.mark.parametrize("stub", [(1, "0"), (1, "cut"), (1, "reset")], indirect=True, ids=["503", "cut", "reset"])
@pytest.mark.anyio
async def test_async_client_retries(stub) -> None:
    async with AsyncClient(stub.url) as client:
        result = await client.forward(*ARGS)
    np.testing.assert_array_equal(result.output, OUTPUT)
    assert len(stub.arrivals) == 2


@pytest.mark.parametrize("stub", [(1, "0")], indirect=True)
def test_no_retries_when_disabled(stub) -> None:
    with Client(stub.url, retries=0) as client, pytest.raises(ServiceUnavailable):
        client.forward(*ARGS)
    assert len(stub.arrivals) == 1


@pytest.mark.parametrize("stub", [(2, "cut"), (2, "reset")], indirect=True, ids=["cut", "reset"])
def test_sends_again_a_response_cut_mid_message(stub) -> None:
    with Client(stub.url) as client:
        result = client.forward(*ARGS)
    np.testing.assert_array_equal(result.output, OUTPUT)
    assert len(stub.arrivals) == 3


@pytest.mark.parametrize("stub, error", [((5, "cut"), httpx.RemoteProtocolError), ((5, "reset"), httpx.ReadError)], indirect=["stub"])
def test_cut_responses_are_retried_a_bounded_number_of_times(stub, error) -> None:
    with Client(stub.url, retries=2) as client, pytest.raises(error):
        client.forward(*ARGS)
    assert len(stub.arrivals) == 3
