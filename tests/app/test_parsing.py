"""app/parsing.py: big bodies are parsed in a helper process; results and errors are the same as in-thread."""

from __future__ import annotations

import asyncio
import gc
import multiprocessing.queues
import os
import pickle
import struct
import time

import orjson
import pytest
import torch

import kernels
from app import parsing
from app.errors import InvalidField, TooLarge
from app.parsing import PROCESS_MIN_BYTES
from tests.app.conftest import running
from tests.app.helpers import from_json, to_json

pytestmark = pytest.mark.anyio

JSON = {"content-type": "application/json"}


async def started_parser(app):
    """The app's body parser once its helper processes have imported torch (seconds), failing after 60 s."""
    for _ in range(1200):
        if app.state.parser.ready:
            break
        await asyncio.sleep(0.05)
    assert app.state.parser.ready, "the body parser's helpers did not start within 60 s"
    return app.state.parser


def test_api_errors_pickle_with_their_detail() -> None:
    for error in (InvalidField(("input", "b64"), "bad"), TooLarge("over", headers=None)):
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is type(error) and copy.detail == error.detail and copy.status_code == error.status_code


async def test_big_bodies_go_through_the_helper_process_which_exits_with_the_app() -> None:
    """One app for all the checks: starting a helper process costs seconds."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 128, 128, dtype=torch.float64, generator=generator)  # ~1.3 MB as nested lists
    w = torch.randn(2, 4, 3, 3, dtype=torch.float64, generator=generator)
    async with running(parse_processes=1) as (app, client):
        parser = await started_parser(app)
        helpers = list(parser._pool._processes.values())
        assert parser.ready and helpers and all(process.is_alive() for process in helpers)
        for dtype, compute_dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
            body = orjson.dumps({"input": to_json(x), "weight": to_json(w), "dtype": dtype, "encoding": "base64", "algorithm": "im2col"})
            assert len(body) >= PROCESS_MIN_BYTES
            response = await client.post("/forward", content=body, headers=JSON)
            assert response.status_code == 200, response.text
            result = response.json()
            assert result["dtype"] == dtype and result["algorithm"] == "im2col"
            expected = kernels.conv2d(x.to(compute_dtype), w.to(compute_dtype), algorithm="im2col")
            torch.testing.assert_close(from_json(result["output"]), expected, atol=0, rtol=0)
        refused = await client.post("/forward", content=body.replace(b'"dtype":"bfloat16"', b'"dtype":"int8"'), headers=JSON)
        assert refused.status_code == 422 and refused.json()["detail"][0]["loc"] == ["body", "dtype"]
    assert not any(process.is_alive() for process in helpers)


def _die_mid_answer(*_) -> None:
    """In a helper: write the start of an answer to the pool's result pipe, then die, as a kill -9 mid-write does."""
    results = next(item for item in gc.get_objects() if isinstance(item, multiprocessing.queues.SimpleQueue))
    os.write(results._writer.fileno(), struct.pack("!i", 1 << 20) + bytes(100))
    os._exit(1)


async def test_a_helper_that_dies_mid_answer_is_replaced_and_its_request_answered(monkeypatch) -> None:
    """Found by a concurrency audit: the pool's manager thread then reads half a message forever, so the request,
    and every later big body, waited with no end, and the process could not exit (the interpreter joins that thread)."""
    x, w = torch.randn(1, 4, 128, 128, dtype=torch.float64), torch.randn(2, 4, 3, 3, dtype=torch.float64)
    body = orjson.dumps({"input": to_json(x), "weight": to_json(w), "encoding": "base64", "parity": False})
    assert len(body) >= PROCESS_MIN_BYTES
    async with running(parse_processes=1) as (app, client):
        parser = await started_parser(app)
        wedged = parser._pool._executor_manager_thread
        monkeypatch.setattr(parsing, "_parse_remote", _die_mid_answer)  # the helper imports it from this module
        started = time.monotonic()
        refused = await asyncio.wait_for(client.post("/forward", content=body, headers=JSON), 30)  # it waited forever
        assert refused.status_code == 503 and "restarted" in refused.json()["detail"], refused.text
        assert time.monotonic() - started < 10
        monkeypatch.undo()
        answered = await client.post("/forward", content=body, headers=JSON)  # by the new helper
        assert answered.status_code == 200, answered.text
        torch.testing.assert_close(from_json(answered.json()["output"]), kernels.conv2d(x.float(), w.float()), atol=1e-4, rtol=1e-4)
        for _ in range(200):  # fed past the half message, the old pool's manager thread ends
            if not wedged.is_alive():
                break
            await asyncio.sleep(0.05)
        assert not wedged.is_alive()
