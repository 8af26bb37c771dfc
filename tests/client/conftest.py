"""Fixtures: the real servers shared with tests/v2 (started once per test process)."""

from __future__ import annotations

import pytest

from tests.integration.conftest import Server
from tests.v2.servers import shared_servers


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def servers(tmp_path_factory) -> dict[str, Server]:
    return shared_servers(tmp_path_factory.mktemp("client-servers"))


@pytest.fixture(scope="session")
def open_server(servers) -> Server:
    return servers["open"]


@pytest.fixture(scope="session")
def strict_server(servers) -> Server:
    return servers["strict"]
