"""A response whose body is sent as several buffers, so megabytes of tensor bytes are never joined into one copy."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from starlette.background import BackgroundTask
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

Buffer = bytes | bytearray | memoryview

# Up to this many bytes the parts are joined: one socket write costs less than copying them is worth saving.
JOIN_MAX_BYTES = 64 * 1024


class PartsResponse(Response):
    """`parts` (contiguous buffers: bytes, or a tensor's own memory) go out one ASGI body
    message each, behind a Content-Length of their total: a 6.4 MB output skips the ~1 ms joined copy and
    the response holds no second buffer of its size. Small bodies go out joined, as one message. Each part
    must stay unchanged until sent. `sent`, when given, is resolved once the last part has gone out (or the
    client has gone): a request's memory stays held in CONV_MAX_INFLIGHT_BYTES until then (app/admission.py)."""

    def __init__(
        self,
        parts: Sequence[Buffer],
        status_code: int = 200,
        headers: dict[str, str] | None = None,
        media_type: str | None = None,
        background: BackgroundTask | None = None,
        sent: asyncio.Future | None = None,
    ) -> None:
        self.sent = sent
        self.parts = [view for view in (memoryview(part).cast("B") for part in parts) if len(view)]
        size = sum(len(view) for view in self.parts)
        if len(self.parts) > 1 and size <= JOIN_MAX_BYTES:
            self.parts = [b"".join(self.parts)]
        length = {"content-length": str(size)}
        super().__init__(None, status_code, {**(headers or {}), **length}, media_type, background)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            last = len(self.parts) - 1
            for index, part in enumerate(self.parts):
                await send({"type": "http.response.body", "body": part, "more_body": index < last})
            if not self.parts:
                await send({"type": "http.response.body", "body": b""})
        finally:
            self.parts = []
            if self.sent is not None and not self.sent.done():
                self.sent.set_result(None)
        if self.background is not None:
            await self.background()
