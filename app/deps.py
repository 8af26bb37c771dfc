"""What routes need from the app: settings, workers, parser, metrics, the API key check, the body read.

The compute routes (/forward, /backward, V2 infer) take no FastAPI dependencies: they call
`app_state` and `check_api_key` directly. Resolving dependencies cost ~0.45 ms of a seed-sized
request's ~2 ms (py-spy), and a plain `def` dependency is run in the threadpool, a thread hand-off
each (~3 ms of ~4 ms before they were made async). The Depends forms serve the light GET routes.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from starlette.requests import ClientDisconnect

from app.admission import Hold, MemoryBudget
from app.config import Settings
from app.errors import BodyTimeout, ClientGone, DeadlineExceeded, MalformedBody, TooLarge, Unauthorized, UnsupportedMediaType
from app.metrics import Metrics
from app.parsing import BodyParser
from app.worker import DeviceWorker


async def get_settings_from_app(request: Request) -> Settings:
    return request.app.state.settings


async def get_workers(request: Request) -> dict[str, DeviceWorker]:
    return request.app.state.workers


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


async def get_parser(request: Request) -> BodyParser:
    return request.app.state.parser


SettingsDep = Annotated[Settings, Depends(get_settings_from_app)]
WorkersDep = Annotated[dict[str, DeviceWorker], Depends(get_workers)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
ParserDep = Annotated[BodyParser, Depends(get_parser)]


@dataclass(frozen=True)
class AppState:
    settings: Settings
    workers: dict[str, DeviceWorker]
    parser: BodyParser
    metrics: Metrics
    budget: MemoryBudget


def app_state(request: Request) -> AppState:
    state = request.app.state
    return AppState(state.settings, state.workers, state.parser, state.metrics, state.budget)


# OpenAPI: the compute routes declare this scheme (app/main.py adds it to the components).
BEARER_SCHEME = {"HTTPBearer": {"type": "http", "scheme": "bearer", "description": "Required when the server has CONV_API_KEY set"}}
BEARER_SECURITY: dict = {"security": [{"HTTPBearer": []}]}


def check_api_key(request: Request, settings: Settings) -> None:
    """401 unless CONV_API_KEY is unset or `Authorization: Bearer <key>` matches it (constant-time)."""
    if settings.api_key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    given = token.strip().encode() if scheme.lower() == "bearer" else b""
    if not hmac.compare_digest(given, settings.api_key.get_secret_value().encode()):
        raise Unauthorized("missing or wrong API key: send Authorization: Bearer <CONV_API_KEY>", headers={"WWW-Authenticate": "Bearer"})


# Longer than any byte count a server could hold, shorter than int()'s 4,300-digit limit.
_MAX_DIGITS = 18


def decimal_int(text: str | None) -> int | None:
    """A header's or parameter's non-negative decimal integer ("12", " 12 "), else None.

    ASCII digits only: `str.isdigit` alone also passes "²" and other Unicode digits, which int() then
    refuses (a 500) or reads as numbers no client meant, and int() refuses strings of over 4,300 digits."""
    if text is None:
        return None
    text = text.strip()
    return int(text) if 0 < len(text) <= _MAX_DIGITS and text.isascii() and text.isdigit() else None


def _check_headers(request: Request, max_body_bytes: int, json_only: bool = True) -> int | None:
    """The declared Content-Length (None without one), after the media type, encoding and size checks."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if json_only and media_type != "application/json":
        raise UnsupportedMediaType(f"Content-Type must be application/json, got {media_type or 'none'!r}")
    # Every Content-Encoding header, not only the first: "identity" then "gzip" is a gzipped body.
    for value in request.headers.getlist("content-encoding"):
        encoding = value.strip().lower()
        if encoding not in ("", "identity"):
            raise UnsupportedMediaType(f"Content-Encoding {encoding!r} is not accepted; send the body uncompressed (identity)")
    header = request.headers.get("content-length")
    if header is None:
        return None
    declared = decimal_int(header)
    if declared is None:
        raise MalformedBody(f"Content-Length must be a non-negative integer, got {header!r}")
    if declared > max_body_bytes:
        raise TooLarge(f"the body is {declared:,} bytes; the limit is {max_body_bytes:,} (CONV_MAX_BODY_BYTES)")
    return declared


# Where a binary section starts at a known offset (V2's Inference-Header-Content-Length), the body is
# placed so that offset lands on this boundary: tensors are then views of the body, never realigning copies.
BINARY_ALIGNMENT = 16


async def _read_capped(request: Request, max_body_bytes: int, binary_offset: int, hold: Hold | None) -> bytearray | memoryview:
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_body_bytes:
            raise TooLarge(f"the body exceeds the limit of {max_body_bytes:,} bytes (CONV_MAX_BODY_BYTES)")
        if hold is not None:  # held as it arrives (a declared length is only checked, app/admission.py)
            hold.body(size)
        chunks.append(chunk)
    # Writable, so binary tensors (V2's binary extension) can be views of it instead of copies. The
    # buffer itself comes from malloc (16-byte aligned); `pad` leading bytes put binary_offset on the boundary.
    pad = -binary_offset % BINARY_ALIGNMENT
    if not pad:
        return bytearray().join(chunks)
    return memoryview(bytearray().join([bytes(pad), *chunks]))[pad:]


async def read_body(
    request: Request,
    settings: Settings,
    deadline: float,
    json_only: bool = True,
    binary_offset: int = 0,
    hold: Hold | None = None,
) -> bytearray | memoryview:
    """The request's bytes (writable), with 415 for other media types, 413 past max_body_bytes (declared or streamed)
    without reading the rest, 408 past CONV_BODY_TIMEOUT_S and 504 past the request's deadline. `json_only=False` (the V2
    routes: JSON followed by raw tensor bytes) skips the Content-Type check only; byte `binary_offset` of the
    result is 16-byte aligned. With a `hold` (app/admission.py) the body's bytes are reserved before they are read:
    the declared length up front, the rest as it arrives; 503 + Retry-After when the server holds too much already."""
    declared = _check_headers(request, settings.max_body_bytes, json_only)
    if hold is not None and declared:
        hold.check_body(declared)
    body_deadline = time.monotonic() + settings.body_timeout_s
    try:
        async with asyncio.timeout(max(0.0, min(deadline, body_deadline) - time.monotonic())):
            return await _read_capped(request, settings.max_body_bytes, binary_offset, hold)
    except TimeoutError:
        if body_deadline <= deadline:
            # Connection: close makes uvicorn close the socket after the 408: a client still trickling bytes
            # would otherwise keep the connection.
            raise BodyTimeout(
                f"the request body did not arrive within {settings.body_timeout_s:g} s (CONV_BODY_TIMEOUT_S)",
                headers={"Connection": "close"},
            ) from None
        raise DeadlineExceeded("the request body did not arrive within the request deadline") from None
    except ClientDisconnect:  # gone mid-body: nothing to answer, and not a bug (it was a logged 500)
        raise ClientGone() from None
