"""PartsResponse: the ASGI messages it sends, for bodies joined (small) and sent part by part (large)."""

from __future__ import annotations

import pytest
import torch

from app.responses import JOIN_MAX_BYTES, PartsResponse

pytestmark = pytest.mark.anyio


async def _messages(response: PartsResponse) -> list[dict]:
    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    async def receive() -> dict:
        raise AssertionError("a response does not read the request")

    await response({"type": "http"}, receive, send)
    return sent


def _header(start: dict, name: bytes) -> bytes:
    [value] = [value for key, value in start["headers"] if key == name]
    return value


async def test_large_parts_go_out_one_message_each_without_a_copy() -> None:
    tensor = torch.arange(JOIN_MAX_BYTES // 2, dtype=torch.float32)  # 128 KiB
    raw = memoryview(tensor.numpy()).cast("B")
    start, *bodies = await _messages(PartsResponse([b'{"h":1}', raw, b""], media_type="application/octet-stream"))
    assert start["status"] == 200 and _header(start, b"content-type") == b"application/octet-stream"
    assert int(_header(start, b"content-length")) == 7 + len(raw) == sum(len(message["body"]) for message in bodies)
    assert [bytes(message["body"]) for message in bodies] == [b'{"h":1}', tensor.numpy().tobytes()]  # the empty part is dropped
    assert [message.get("more_body", False) for message in bodies] == [True, False]
    tensor[0] = 42.0  # the sent part is the tensor's own memory, not a copy of it
    assert bytes(bodies[1]["body"][:4]) == torch.tensor([42.0]).numpy().tobytes()


async def test_small_bodies_are_joined_into_one_message() -> None:
    parts = [b'{"output":[1,2]', b",", b'"parity":null}']
    start, *bodies = await _messages(PartsResponse(parts, headers={"x-extra": "1"}, media_type="application/json"))
    assert len(bodies) == 1 and bodies[0]["body"] == b"".join(parts) and not bodies[0].get("more_body", False)
    assert int(_header(start, b"content-length")) == len(b"".join(parts)) and _header(start, b"x-extra") == b"1"


async def test_an_empty_body_still_ends_the_response() -> None:
    start, *bodies = await _messages(PartsResponse([], status_code=204))
    assert start["status"] == 204 and _header(start, b"content-length") == b"0"
    assert bodies == [{"type": "http.response.body", "body": b""}]
