"""Real servers for tests/v2 and tests/client, started once per test process and shared by both suites.

Built on tests/integration's helpers (`python -m app` on a free loopback port, waited on until /readyz
is 200). "open" has the defaults; "strict" has CONV_API_KEY, a 64 KiB body limit and
4096 elements per tensor. Both parse in
threads (CONV_PARSE_PROCESSES=0) to start faster on small machines.
"""

from __future__ import annotations

import atexit
from pathlib import Path

import pytest

from tests.integration.conftest import Server, start, stop, wait_ready

API_KEY = "v2-client-key"
MAX_BODY_BYTES = 64 << 10
MAX_TENSOR_ELEMENTS = 4096
_started: dict[str, Server] = {}


def _stop_all() -> None:
    for server in _started.values():
        stop(server)


def shared_servers(log_dir: Path) -> dict[str, Server]:
    if not _started:
        _started["open"] = start(log_dir, "open", CONV_PARSE_PROCESSES="0")
        _started["strict"] = start(
            log_dir,
            "strict",
            CONV_PARSE_PROCESSES="0",
            CONV_API_KEY=API_KEY,
            CONV_MAX_BODY_BYTES=str(MAX_BODY_BYTES),
            CONV_MAX_TENSOR_ELEMENTS=str(MAX_TENSOR_ELEMENTS),
        )
        atexit.register(_stop_all)
        for server in _started.values():
            wait_ready(server)
    return _started


# The fixtures both suites use (tests/conftest.py loads this module as a pytest plugin).


@pytest.fixture(scope="session")
def v2_servers(tmp_path_factory) -> dict[str, Server]:
    return shared_servers(tmp_path_factory.mktemp("shared-servers"))


@pytest.fixture(scope="session")
def open_server(v2_servers) -> Server:
    return v2_servers["open"]


@pytest.fixture(scope="session")
def strict_server(v2_servers) -> Server:
    return v2_servers["strict"]
