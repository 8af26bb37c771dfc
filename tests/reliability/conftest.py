"""Real servers for the reliability suite, started once per session and reused, with helpers to judge answers.

Servers are `python -m app` (or the faulty-algorithm variant) on free loopback ports, built on
tests/integration/conftest.py's helpers. Each keeps its combined stdout/stderr in a log file that the
security tests grep. Figures the tests measure are appended to RESULTS (a JSON-lines file) and printed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import ROOT, Server, free_port, stop, wait_ready

API_KEY = "reliability-key-5f2c9a7e"
# A value put in every request tensor: if it shows up in a response detail or a log line, tensor data leaked.
MARKER = 7.654321
MARKER_TEXT = "7.654321"
RESULTS = ROOT / "results" / "reliability.jsonl"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def launch(log_dir: Path, name: str, module: str = "app", **env: str) -> Server:
    """Start a server without waiting; CONV_HOST is left to its default unless `env` sets it."""
    port = free_port()
    environment = {key: value for key, value in os.environ.items() if not key.startswith(("CONV_", "FAULTY_"))}
    environment.update({"CONV_PORT": str(port), "CONV_LOG_LEVEL": "warning", **env})
    log = log_dir / f"{name}.log"
    process = subprocess.Popen([sys.executable, "-m", module], cwd=ROOT, env=environment, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    return Server(f"http://127.0.0.1:{port}", process, log)


@pytest.fixture(scope="session", autouse=True)
def fresh_results() -> None:
    """results/reliability.jsonl holds this session's figures only."""
    RESULTS.unlink(missing_ok=True)


def record(figure: str, **values: object) -> None:
    """Print a measured figure and append it to results/reliability.jsonl for docs/reliability.md."""
    line = json.dumps({"figure": figure, **values}, sort_keys=True)
    print(f"\nFIGURE {line}")
    RESULTS.parent.mkdir(exist_ok=True)
    with RESULTS.open("a") as results:
        results.write(line + "\n")


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def seed_body(**overrides: object) -> dict:
    """A valid small /forward body (2x1x5x5 input, two 3x3 filters) whose every value is MARKER."""
    body = {
        "input": [[[[MARKER] * 5 for _ in range(5)]] for _ in range(2)],
        "weight": [[[[MARKER] * 3 for _ in range(3)]] for _ in range(2)],
        "bias": [MARKER, MARKER],
        "padding": 1,
    }
    body.update(overrides)
    return body


def tagged_body(algorithm: str, tag: int) -> dict:
    """A 1x1x3x`tag` problem run by `algorithm`; the input width names the request in the fault record."""
    return {"input": [[[[1.0] * tag] * 3]], "weight": [[[[1.0]]]], "algorithm": algorithm}


def assert_clean(response: httpx.Response) -> None:
    """No traceback, source path or tensor value in an error body."""
    text = response.text
    for leak in ("Traceback", 'File "', ".py", str(ROOT), "/opt/secret", MARKER_TEXT, "tensor("):
        assert leak not in text, f"{leak!r} leaked into the {response.status_code} body: {text[:500]}"


def assert_healthy(server: Server) -> None:
    assert server.process.poll() is None, f"server exited:\n{server.log_tail()}"
    response = httpx.get(f"{server.url}/healthz", timeout=10)
    assert response.status_code == 200, response.text


async def read_response(reader) -> bytes:
    """One HTTP/1.1 response with a Content-Length body from an asyncio StreamReader."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.lower().split(b"\r\n") if line.startswith(b"content-length:"))
    return head + await reader.readexactly(length)


def session_server(tmp_path_factory, name: str, module: str = "app", **env: str) -> Iterator[Server]:
    server = launch(tmp_path_factory.mktemp(name), name, module, **env)
    try:
        wait_ready(server)
        yield server
    finally:
        stop(server)


@pytest.fixture(scope="session")
def main_server(tmp_path_factory) -> Iterator[Server]:
    """Default settings, CONV_HOST not set: the bad-input corpus, the fuzzer and the bind check use it."""
    yield from session_server(tmp_path_factory, "main")


@pytest.fixture(scope="session")
def keyed_server(tmp_path_factory) -> Iterator[Server]:
    """CONV_API_KEY set, access logs on (debug): the auth walk and the log checks."""
    yield from session_server(tmp_path_factory, "keyed", CONV_HOST="127.0.0.1", CONV_API_KEY=API_KEY, CONV_LOG_LEVEL="debug")


@pytest.fixture(scope="session")
def fault_record(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("faulty-record") / "runs.txt"


@pytest.fixture(scope="session")
def faulty_server(tmp_path_factory, fault_record: Path) -> Iterator[Server]:
    """The faulty algorithms registered, one queue slot, a 2 s body deadline, bodies parsed in threads
    (a spawned parse process would not know the faulty names)."""
    yield from session_server(
        tmp_path_factory,
        "faulty",
        "tests.reliability.serve_faulty",
        CONV_HOST="127.0.0.1",
        CONV_QUEUE_SIZE="1",
        CONV_PARSE_PROCESSES="0",
        CONV_BODY_TIMEOUT_S="2",
        FAULTY_SLEEP_S="1.5",
        FAULTY_RECORD=str(fault_record),
    )
