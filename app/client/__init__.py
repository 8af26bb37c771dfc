"""A Python client for conv-as-a-service: `Client(base_url, api_key=None)` and its asyncio twin `AsyncClient`.

    from app.client import Client
    with Client("http://127.0.0.1:8000") as client:
        result = client.forward(x, w, b, padding=1)      # torch in -> torch out, numpy in -> numpy out
        result.output, result.parity["ok"]
        grad_input, grad_weight, grad_bias = client.backward(x, w, b, grad_output=g, padding=1)

Only httpx and numpy are needed (torch when you pass torch tensors). See docs/client.md.
"""

from app.client._core import AsyncClient, BackwardResult, Client, ForwardResult
from app.client.errors import (
    BadRequest,
    ClientError,
    OutOfDeviceMemory,
    PayloadTooLarge,
    RequestTimeout,
    ServerError,
    ServiceUnavailable,
    Timeout,
    Unauthorized,
    UnprocessableEntity,
    UnsupportedMediaType,
)

__all__ = [
    "AsyncClient",
    "BackwardResult",
    "BadRequest",
    "Client",
    "ClientError",
    "ForwardResult",
    "OutOfDeviceMemory",
    "PayloadTooLarge",
    "RequestTimeout",
    "ServerError",
    "ServiceUnavailable",
    "Timeout",
    "Unauthorized",
    "UnprocessableEntity",
    "UnsupportedMediaType",
]
