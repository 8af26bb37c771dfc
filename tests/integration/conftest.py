"""Real servers: `python -m app` subprocesses on free loopback ports, waited on until /readyz is 200.

Two servers start together once per session: "plain" (defaults) and "strict" (CONV_API_KEY set, a
queue of one, a 4 MiB body limit), so the API key and the limits are tested over real sockets.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 180
API_KEY = "integration-key"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start(log_dir: Path, name: str, **env: str) -> Server:
    port = free_port()
    environment = {key: value for key, value in os.environ.items() if not key.startswith("CONV_")}
    environment.update({"CONV_HOST": "127.0.0.1", "CONV_PORT": str(port), "CONV_LOG_LEVEL": "warning", **env})
    log = log_dir / f"{name}.log"
    process = subprocess.Popen([sys.executable, "-m", "app"], cwd=ROOT, env=environment, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    return Server(f"http://127.0.0.1:{port}", process, log)


def wait_ready(server: Server) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            pytest.fail(f"server exited with {server.process.returncode}:\n{server.log_tail()}")
        try:
            if httpx.get(f"{server.url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    pytest.fail(f"server not ready after {STARTUP_TIMEOUT_S}s:\n{server.log_tail()}")


def stop(server: Server) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()


@pytest.fixture(scope="session")
def servers(tmp_path_factory) -> Iterator[dict[str, Server]]:
    log_dir = tmp_path_factory.mktemp("servers")
    started = {
        "plain": start(log_dir, "plain"),
        "strict": start(log_dir, "strict", CONV_API_KEY=API_KEY, CONV_QUEUE_SIZE="1", CONV_MAX_BODY_BYTES=str(4 << 20)),
    }
    try:
        for server in started.values():
            wait_ready(server)
        yield started
    finally:
        for server in started.values():
            stop(server)


@pytest.fixture(scope="session")
def plain(servers) -> Server:
    return servers["plain"]


@pytest.fixture(scope="session")
def strict(servers) -> Server:
    return servers["strict"]
