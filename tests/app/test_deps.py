"""app/deps.py's body read: the bytes as sent, writable, with a given offset on a 16-byte boundary."""

from __future__ import annotations

import ctypes

import pytest
from starlette.requests import Request

from app.config import Settings
from app.deps import BINARY_ALIGNMENT, read_body
from app.errors import TooLarge

pytestmark = pytest.mark.anyio


def _request(body: bytes, chunk: int) -> Request:
    messages = [
        {"type": "http.request", "body": body[i : i + chunk], "more_body": i + chunk < len(body)} for i in range(0, len(body), chunk)
    ]

    async def receive() -> dict:
        return messages.pop(0)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v2/models/conv2d/infer",
        "headers": [(b"content-type", b"application/octet-stream")],
    }
    return Request(scope, receive)


def _address(buffer: bytearray | memoryview, offset: int) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buffer, offset))


@pytest.mark.parametrize("offset", [0, 1, 3, 4, 7, 15, 16, 17, 250])
@pytest.mark.parametrize("chunk", [5, 64, 4096])
async def test_binary_offset_lands_on_the_boundary(offset: int, chunk: int) -> None:
    body = bytes(range(256)) * 3
    raw = await read_body(_request(body, chunk), Settings(), deadline=1e12, json_only=False, binary_offset=offset)
    assert bytes(raw) == body
    assert _address(raw, offset) % BINARY_ALIGNMENT == 0
    raw[offset] = 0  # writable: binary tensors are views of it
    assert raw[offset] == 0


async def test_the_size_cap_still_applies_with_an_offset() -> None:
    with pytest.raises(TooLarge, match="CONV_MAX_BODY_BYTES"):
        await read_body(_request(bytes(3000), 100), Settings(max_body_bytes=2048), deadline=1e12, json_only=False, binary_offset=3)
