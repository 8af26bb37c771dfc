"""V2 errors: the protocol's {"error": "<message>"} body, with the service's HTTP status codes kept.

`V2Route` wraps every V2 endpoint, dependencies included (so a 401 from the API key is converted too):
the native routes keep FastAPI's {"detail": ...}.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Request, Response
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException

from app.errors import ApiError, json_response

log = logging.getLogger("app.v2")


class ProtocolError(ApiError):
    """A request that breaks the V2 protocol: unknown input or datatype, bad shape, binary sizes that do not add up."""

    status_code = 400


class ModelNotFound(ApiError):
    status_code = 404


def _entry_message(entry: Any) -> str:
    """One {loc, msg} entry as "field: msg" (the protocol's body has no loc; most messages name their field already)."""
    if not isinstance(entry, dict):
        return str(entry)
    text = str(entry.get("msg", entry))
    field = ".".join(str(part) for part in entry.get("loc", ()) if part != "body")
    return text if not field or text.startswith(field) else f"{field}: {text}"


def message(detail: Any) -> str:
    """The native detail as one sentence: a 422 list of {loc, msg} becomes its messages joined."""
    if isinstance(detail, list):
        return "; ".join(_entry_message(entry) for entry in detail)
    return str(detail)


def error_response(status_code: int, text: str, headers: dict[str, str] | None = None) -> Response:
    return json_response({"error": text}, status_code, headers)


def is_v2_path(path: str) -> bool:
    return path == "/v2" or path.startswith("/v2/")


async def routing_error(request: Request, error: HTTPException) -> Response:
    """Starlette's own 404 / 405 (no route, wrong method): {"error"} under /v2, FastAPI's {"detail"} elsewhere."""
    if is_v2_path(request.url.path):
        return error_response(error.status_code, message(error.detail), error.headers)
    return await http_exception_handler(request, error)


class V2Route(APIRoute):
    """An APIRoute whose errors, from dependencies or the endpoint, answer {"error": ...}."""

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        handle = super().get_route_handler()

        async def handle_v2(request: Request) -> Response:
            try:
                return await handle(request)
            except ApiError as error:
                return error_response(error.status_code, message(error.detail), error.headers)
            except RequestValidationError as error:
                return error_response(422, message(list(error.errors())))
            except HTTPException as error:
                return error_response(error.status_code, message(error.detail), error.headers)
            except Exception:
                log.exception("unhandled error on %s %s", request.method, request.url.path)
                return error_response(500, "internal error; this is a bug in the service, please report it")

        return handle_v2
