"""Security: the API key on every compute route, loopback by default, no client-named files or URLs, clean logs."""

from __future__ import annotations

import asyncio
import re
import socket
import threading
from pathlib import Path

import httpx
import pytest
from fastapi.routing import APIRoute

from tests.integration.conftest import ROOT, free_port
from tests.reliability.conftest import API_KEY, MARKER_TEXT, assert_clean, record, seed_body

# Methods that only read; every other method on any route runs work and must need the key.
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}
PATH_VALUES = {"model_name": "conv2d", "model_version": "1"}


def _walk(routes: list, prefix: str = ""):
    """(path, route) of every endpoint, through included routers and mounts."""
    for route in routes:
        nested = getattr(route, "original_router", None)  # FastAPI >= 0.160 includes routers lazily
        if nested is not None:
            yield from _walk(nested.routes, prefix + route.include_context.prefix)
        elif hasattr(route, "routes"):
            yield from _walk(route.routes, prefix + route.path)
        else:
            yield prefix + route.path, route


def compute_routes(schema: dict) -> list[tuple[str, str]]:
    """(method, path) of every route that is not read-only: walked from app.routes, and from the server's schema."""
    from app.main import create_app

    found = set()
    for path, route in _walk(create_app().routes):
        assert isinstance(route, APIRoute) or set(getattr(route, "methods", None) or ()) <= SAFE_METHODS, f"unexpected route {path}"
        found |= {(method, path) for method in set(getattr(route, "methods", None) or ()) - SAFE_METHODS}
    for path, operations in schema["paths"].items():
        found |= {(method.upper(), path) for method in operations if method.upper() not in SAFE_METHODS}
    return sorted(found)


def concrete(path: str) -> str:
    return re.sub(r"\{(\w+)\}", lambda match: PATH_VALUES.get(match.group(1), "x"), path)


def test_every_compute_route_needs_the_key(keyed_server) -> None:
    routes = compute_routes(httpx.get(f"{keyed_server.url}/openapi.json", timeout=10).json())
    assert {("POST", "/forward"), ("POST", "/backward")} <= set(routes)
    attempts = {
        "none": {},
        "wrong": {"authorization": "Bearer not-the-key"},
        "empty": {"authorization": "Bearer"},
        "prefix": {"authorization": f"Bearer {API_KEY[:-1]}"},
        "longer": {"authorization": f"Bearer {API_KEY}x"},
        "basic": {"authorization": f"Basic {API_KEY}"},
        "no_scheme": {"authorization": API_KEY},
    }
    refused = 0
    with httpx.Client(base_url=keyed_server.url, timeout=30) as client:
        for method, path in routes:
            url = concrete(path)
            for name, headers in attempts.items():
                response = client.request(method, url, json=seed_body(), headers=headers)
                assert response.status_code == 401, f"{method} {path} with {name} auth: {response.status_code} {response.text[:300]}"
                assert API_KEY not in response.text
                refused += 1
            allowed = client.request(method, url, json=seed_body(), headers={"authorization": f"Bearer {API_KEY}"})
            assert allowed.status_code != 401, f"{method} {path} refused the right key"
    record("auth_walk", routes=[f"{method} {path}" for method, path in routes], refused_401=refused)


def test_open_routes_do_not_reveal_the_key(keyed_server) -> None:
    with httpx.Client(base_url=keyed_server.url, timeout=30) as client:
        for path in ("/healthz", "/readyz", "/info", "/metrics", "/openapi.json", "/docs"):
            response = client.get(path)
            assert response.status_code == 200, path
            assert API_KEY not in response.text, path
        assert client.get("/info").json()["auth"] is True


def _listening_addresses(port: int) -> set[str]:
    """Local addresses of LISTEN sockets on `port`, from /proc/net/tcp and tcp6 (hex, as the kernel writes them)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:
                found.add(address)
    return found


def test_binds_loopback_unless_told_otherwise(main_server) -> None:
    """main_server starts without CONV_HOST: it must listen on 127.0.0.1 only."""
    from app.config import Settings

    assert Settings.model_fields["host"].default == "127.0.0.1"
    port = int(main_server.url.rsplit(":", 1)[1])
    assert _listening_addresses(port) == {"0100007F"}, _listening_addresses(port)
    assert re.search(r"CONV_HOST=0\.0\.0\.0", (ROOT / "Dockerfile").read_text()), "the container must bind 0.0.0.0 explicitly"


class _Listener:
    """A TCP listener that counts connections: anything the server fetches from a client-named URL lands here."""

    def __init__(self) -> None:
        self.port = free_port()
        self.connections = 0
        self._socket = socket.create_server(("127.0.0.1", self.port))
        self._socket.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                connection, _ = self._socket.accept()
            except TimeoutError:
                continue
            self.connections += 1
            connection.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._socket.close()


def test_no_route_reads_a_file_or_url_named_by_the_client(main_server) -> None:
    listener = _Listener()
    targets = [f"http://127.0.0.1:{listener.port}/x", "file:///etc/passwd", "/etc/passwd", "../../../../etc/passwd"]
    bodies = []
    for target in targets:
        bodies += [
            seed_body(input=target),
            seed_body(weight=target),
            seed_body(input={"shape": [1, 1, 1, 1], "b64": target}),
            seed_body(input={"shape": [1, 1, 1, 1], "dtype": target, "data": [1.0]}),
            seed_body(input={"$ref": target}),
            *(seed_body(**{name: target}) for name in ("algorithm", "device", "dtype", "encoding", "padding_mode", "padding")),
        ]
    try:
        with httpx.Client(base_url=main_server.url, timeout=30) as client:
            for path in ("/forward", "/backward"):
                for body in bodies:
                    response = client.post(path, json=body)
                    assert 400 <= response.status_code < 500, response.text[:300]
                    assert "root:" not in response.text
                    assert_clean(response)
    finally:
        listener.close()
    assert listener.connections == 0
    record("client_named_targets", requests=2 * len(bodies), connections_made=listener.connections)


@pytest.mark.anyio
async def test_logs_never_hold_tensor_data_or_the_key(keyed_server) -> None:
    """Valid and invalid requests with MARKER in every tensor, at log level debug (access logs on)."""
    key = {"authorization": f"Bearer {API_KEY}"}
    bodies = [
        seed_body(),
        seed_body(input=[[[[MARKER_TEXT, "x"]]]]),
        seed_body(input=[[[[1.0, 2.0], [3.0]]]]),
        seed_body(stride=0),
        seed_body(weight=[[[[float(MARKER_TEXT)] * 9] * 9]] * 2),
    ]
    async with httpx.AsyncClient(base_url=keyed_server.url, timeout=30) as client:
        statuses = []
        for path in ("/forward", "/backward"):
            for body in bodies:
                statuses.append((await client.post(path, json=body, headers=key)).status_code)
                statuses.append((await client.post(path, json=body, headers={"authorization": "Bearer nope"})).status_code)
            statuses.append((await client.post(path, content=b'{"input": [7.654321', headers=key)).status_code)
    await asyncio.sleep(0.5)
    log = keyed_server.log.read_text(errors="replace")
    assert "POST /forward" in log, "access logs are off: the check would prove nothing"
    assert 200 in statuses and 401 in statuses and 422 in statuses
    assert API_KEY not in log
    assert MARKER_TEXT not in log
    record("log_check", requests=len(statuses), log_bytes=len(log.encode()))
