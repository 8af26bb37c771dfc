"""What can go wrong with a request, as exception types that carry their HTTP status, and their handlers.

Bodies are FastAPI's: {"detail": ...}. 422s use FastAPI's list form, [{"type", "loc", "msg"}], with
"loc" naming the JSON field; the other statuses carry a sentence that names the field or the limit.
"""

from __future__ import annotations

import logging

import orjson
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("app")


class ApiError(Exception):
    """An answer other than 200; `detail` goes to the client as is, so it must never hold tensor data."""

    status_code = 500

    def __init__(self, detail: object, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = headers

    def __reduce__(self):
        # Subclasses take other constructor arguments; rebuild from the finished detail and headers.
        return (_rebuild, (type(self), self.detail, self.headers))


def _rebuild(cls: type[ApiError], detail: object, headers: dict[str, str] | None) -> ApiError:
    error = Exception.__new__(cls)
    Exception.__init__(error, detail)
    error.detail, error.headers = detail, headers
    return error


class MalformedBody(ApiError):
    """Not JSON, or base64 that does not decode."""

    status_code = 400


class Unauthorized(ApiError):
    status_code = 401


class BodyTimeout(ApiError):
    """The client did not send its body in time (CONV_BODY_TIMEOUT_S): a slow client cannot hold a connection."""

    status_code = 408


class TooLarge(ApiError):
    """Over a limit: body bytes, elements per tensor, MACs per request, the reference algorithm's MACs."""

    status_code = 413


class UnsupportedMediaType(ApiError):
    status_code = 415


class InvalidField(ApiError):
    """A value we understand but refuse: wrong rank, shape mismatch, unknown name... `field` is its JSON path."""

    status_code = 422

    def __init__(self, field: str | tuple, message: str, kind: str = "value_error") -> None:
        path = (field,) if isinstance(field, str) else tuple(field)
        super().__init__([{"type": kind, "loc": ["body", *path], "msg": message}])


class InvalidFields(ApiError):
    """Several 422 entries at once (pydantic's errors for the non-tensor fields)."""

    status_code = 422


class Unavailable(ApiError):
    """Queue full, worker not started, or the device is unusable: try again later."""

    status_code = 503

    def __init__(self, detail: object, retry_after_s: int = 1) -> None:
        super().__init__(detail, headers={"Retry-After": str(retry_after_s)})


class DeadlineExceeded(ApiError):
    status_code = 504


class ClientGone(ApiError):
    """The client disconnected, mid-body or while its request waited: nginx's 499, counted in the metrics;
    nobody reads the answer. Not a bug, so never a 500."""

    status_code = 499

    def __init__(self) -> None:
        super().__init__("the client closed the connection")


class OutOfDeviceMemory(ApiError):
    """The device ran out of memory for this request; its cache was freed and the worker keeps serving."""

    status_code = 507


def json_response(payload: object, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(payload), status_code=status_code, headers=headers, media_type="application/json")


def _api_error(request: Request, error: ApiError) -> Response:
    return json_response({"detail": error.detail}, error.status_code, error.headers)


def _validation_error(request: Request, error: RequestValidationError) -> Response:
    detail = [{key: entry[key] for key in ("type", "loc", "msg") if key in entry} for entry in error.errors()]
    return json_response({"detail": detail}, 422)


class UnexpectedErrors:
    """Answers a bug (any exception that is not an ApiError) with a clean 500, logged with its traceback.

    Only a bug gets here: every client mistake is an ApiError raised where it is found. This is ASGI
    middleware rather than an `Exception` handler because Starlette re-raises after such a handler, and
    uvicorn then closes the keep-alive connection under the client's next request.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_tracking(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_tracking)
        except Exception:
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if started:
                raise
            response = json_response({"detail": "internal error; this is a bug in the service, please report it"}, 500)
            await response(scope, receive, send)


def install(app: FastAPI) -> None:
    """Exception handlers, and the 500 middleware (call before adding other middleware: it must sit inside them)."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_middleware(UnexpectedErrors)
