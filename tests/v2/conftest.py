"""Fixtures: tritonclient's HTTP client for each of the shared real servers (tests/v2/servers.py: open_server, strict_server)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.conftest import Server


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
