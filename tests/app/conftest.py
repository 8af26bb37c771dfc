"""In-process fixtures: the app with its lifespan running, driven through httpx.ASGITransport."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
from fastapi import FastAPI

from app.config import Settings
from app.main import create_app


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@asynccontextmanager
async def running(**overrides) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """An app built from Settings(**overrides) (no warm-up or parser process unless asked), started, with a client."""
    overrides.setdefault("warmup", False)
    overrides.setdefault("parse_processes", 0)
    app = create_app(Settings(**overrides))
    async with app.router.lifespan_context(app):
        for _ in range(200):
            if app.state.workers and all(worker.ready for worker in app.state.workers.values()):
                break
            await asyncio.sleep(0.01)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            yield app, client


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with running() as (_, client):
        yield client


@pytest.fixture
async def served() -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    async with running() as pair:
        yield pair
