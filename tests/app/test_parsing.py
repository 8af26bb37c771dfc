"""app/parsing.py: big bodies are parsed in a helper process; results and errors are the same as in-thread."""

from __future__ import annotations

import asyncio
import pickle

import orjson
import pytest
import torch

import kernels
from app.errors import InvalidField, TooLarge
from app.parsing import PROCESS_MIN_BYTES
from tests.app.conftest import running
from tests.app.helpers import from_json, to_json

pytestmark = pytest.mark.anyio

JSON = {"content-type": "application/json"}


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
        parser = app.state.parser
        for _ in range(1200):
            if parser.ready:
                break
            await asyncio.sleep(0.05)
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
