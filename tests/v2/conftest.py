"""Fixtures: the shared real servers (tests/v2/servers.py) and tritonclient's HTTP client for each."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.conftest import Server
from tests.v2.servers import shared_servers


@pytest.fixture(scope="session")
def servers(tmp_path_factory) -> dict[str, Server]:
    return shared_servers(tmp_path_factory.mktemp("v2-servers"))


@pytest.fixture(scope="session")
def open_server(servers) -> Server:
    return servers["open"]


@pytest.fixture(scope="session")
def strict_server(servers) -> Server:
    return servers["strict"]


def _client(server: Server):
    import tritonclient.http as triton  # a dev extra; test_triton_client.py skips without it

    return triton.InferenceServerClient(server.url.removeprefix("http://"), network_timeout=120.0)


@pytest.fixture(scope="session")
def triton_client(open_server) -> Iterator:
    client = _client(open_server)
    yield client
    client.close()


@pytest.fixture(scope="session")
def strict_triton_client(strict_server) -> Iterator:
    client = _client(strict_server)
    yield client
    client.close()
