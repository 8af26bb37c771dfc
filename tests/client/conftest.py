"""Fixtures: the real servers are shared with tests/v2 (tests/v2/servers.py, started once per test process)."""

from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
