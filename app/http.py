"""uvicorn's httptools protocol with the two bounds on a request head that it lacks: size and time.

Measured against the plain protocol (2-core host): a 10 MB header or 100,000 headers were accepted; four
connections streaming 64 MiB header values stalled /healthz for up to 8 s (httptools grows a header value
by concatenation, on the event loop) and left 554 MiB held; 200 connections that sent half a head, or
nothing, were still open 12 s later, and ~1,000 of them took the process to its file limit. Now:

- a head (request line and headers) over MAX_HEAD_BYTES is answered 431 and the connection closed, before
  the bytes past the limit reach the parser;
- a head still incomplete CONV_BODY_TIMEOUT_S after its first byte closes the connection, as a slow body
  gets its 408;
- a new connection that sends nothing is closed after CONV_KEEP_ALIVE_S, as an idle keep-alive one is;
- a client that reads nothing of its response for CONV_BODY_TIMEOUT_S (the socket's buffers stay full) is cut
  off: uvicorn has no write timeout, and each such response held its memory (measured: 4 clients that stopped
  reading after the status line held 916 MB of responses, outside CONV_MAX_INFLIGHT_BYTES, until they closed).

Only uvicorn's protocol hooks are used (connection_made, connection_lost, data_received, on_headers_complete,
on_message_complete, pause_writing, resume_writing); `python -m app` passes this class as uvicorn's `http`.
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.config import get_settings

# nginx's default for a whole head is 4 buffers of 8 KiB; browsers send a few KiB.
MAX_HEAD_BYTES = 64 * 1024
_END_OF_HEAD = b"\r\n\r\n"


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._awaiting_head = True  # no head complete since the last message (or since the connection opened)
        self._head_bytes = 0
        self._tail = b""  # the last bytes seen, for an end of head split across reads
        self._head_timer: asyncio.TimerHandle | None = None
        self._write_timer: asyncio.TimerHandle | None = None  # while the transport's buffer is full
        # As after a response: an idle connection is closed after CONV_KEEP_ALIVE_S (uvicorn starts this
        # timer only once a response is sent, so a connection that never spoke stayed open).
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        self._stop_write_timer()
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._write_timer is None:
            self._write_timer = self.loop.call_later(get_settings().body_timeout_s, self._write_stalled)

    def resume_writing(self) -> None:
        self._stop_write_timer()
        super().resume_writing()

    def _write_stalled(self) -> None:
        self._write_timer = None
        self.transport.abort()  # drops what is buffered; uvicorn then ends the response as for a client gone

    def _stop_write_timer(self) -> None:
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def data_received(self, data: bytes) -> None:
        if self._awaiting_head:
            seen = self._tail + data
            end = seen.find(_END_OF_HEAD)
            head_part = len(data) if end < 0 else max(0, end + len(_END_OF_HEAD) - len(self._tail))
            if self._head_bytes + head_part > MAX_HEAD_BYTES:
                self._refuse_head()
                return
            self._head_bytes += head_part
            self._tail = seen[-(len(_END_OF_HEAD) - 1) :]
        super().data_received(data)
        if self._awaiting_head and self._head_bytes and self._head_timer is None and not self.transport.is_closing():
            self._head_timer = self.loop.call_later(get_settings().body_timeout_s, self._head_timed_out)

    def on_headers_complete(self) -> None:
        self._awaiting_head = False
        self._head_bytes = 0
        self._tail = b""
        self._stop_head_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._awaiting_head = True

    def _refuse_head(self) -> None:
        self._stop_head_timer()
        message = f"the request head exceeds {MAX_HEAD_BYTES:,} bytes"
        self.transport.write(
            b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain; charset=utf-8\r\n"
            + f"content-length: {len(message)}\r\nconnection: close\r\n\r\n{message}".encode("ascii")
        )
        self.transport.close()

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._awaiting_head and not self.transport.is_closing():
            self.transport.close()

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
