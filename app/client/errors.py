"""Typed errors: one class per status the service answers, each carrying the server's detail."""

from __future__ import annotations

from typing import Any


class ClientError(Exception):
    """A non-200 answer. `status` is the HTTP status, `detail` the server's {"detail": ...} as sent (a
    sentence, or for 422 a list of {"type", "loc", "msg"}), `retry_after` the Retry-After seconds if any."""

    status: int = 0

    def __init__(self, status: int, detail: Any, retry_after: float | None = None) -> None:
        self.status = status
        self.detail = detail
        self.retry_after = retry_after
        super().__init__(f"{status}: {_text(detail)}")


def _text(detail: Any) -> str:
    if isinstance(detail, list):
        return "; ".join(str(entry.get("msg", entry)) if isinstance(entry, dict) else str(entry) for entry in detail)
    return str(detail)


class BadRequest(ClientError):
    status = 400


class Unauthorized(ClientError):
    status = 401


class RequestTimeout(ClientError):
    """408: the request body did not arrive in time (CONV_BODY_TIMEOUT_S)."""

    status = 408


class PayloadTooLarge(ClientError):
    status = 413


class UnsupportedMediaType(ClientError):
    status = 415


class UnprocessableEntity(ClientError):
    status = 422


class ServiceUnavailable(ClientError):
    status = 503


class Timeout(ClientError):
    status = 504


class OutOfDeviceMemory(ClientError):
    status = 507


class ServerError(ClientError):
    """A 500 (a bug in the service) or any status the service does not document."""


_BY_STATUS: dict[int, type[ClientError]] = {
    cls.status: cls
    for cls in (
        BadRequest,
        Unauthorized,
        RequestTimeout,
        PayloadTooLarge,
        UnsupportedMediaType,
        UnprocessableEntity,
        ServiceUnavailable,
        Timeout,
        OutOfDeviceMemory,
    )
}


def error_for(status: int, detail: Any, retry_after: float | None = None) -> ClientError:
    return _BY_STATUS.get(status, ServerError)(status, detail, retry_after)
