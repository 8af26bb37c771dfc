"""app.client against a real server: forward / backward with torch and numpy, every encoding, typed errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from app.client import AsyncClient, Client, PayloadTooLarge, Unauthorized, UnprocessableEntity
from tests.v2.servers import API_KEY, MAX_BODY_BYTES

ENCODINGS = ["base64", "flat", "list"]


def _problem(seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype)  # noqa: E731
    return make(2, 3, 7, 6), make(4, 3, 3, 3), make(4)


def _grads(x, w, b, grad_output, **conv_args) -> dict[str, torch.Tensor]:
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    output = F.conv2d(*leaves, **conv_args)
    output.backward(grad_output)
    return {"output": output.detach(), "grad_input": leaves[0].grad, "grad_weight": leaves[1].grad, "grad_bias": leaves[2].grad}


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_forward_torch(open_server, encoding: str) -> None:
    x, w, b = _problem(1)
    with Client(open_server.url, encoding=encoding) as client:
        result = client.forward(x, w, b, stride=(2, 1), padding=[1, 2])
    assert isinstance(result.output, torch.Tensor) and result.output.dtype == torch.float32
    torch.testing.assert_close(result.output, F.conv2d(x, w, b, stride=(2, 1), padding=(1, 2)), atol=1e-5, rtol=1e-4)
    assert result.parity["ok"] and result.device == "cpu" and result.dtype == "float32" and result.algorithm


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_forward_numpy_float64(open_server, encoding: str) -> None:
    x, w, b = _problem(2, torch.float64)
    with Client(open_server.url) as client:
        result = client.forward(x.numpy(), w.numpy(), b.numpy(), padding="same", encoding=encoding)
    assert isinstance(result.output, np.ndarray) and result.output.dtype == np.float64
    np.testing.assert_allclose(result.output, F.conv2d(x, w, b, padding="same").numpy(), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_backward_torch_and_numpy(open_server, encoding: str) -> None:
    x, w, b = _problem(3)
    grad_output = torch.randn(2, 4, 7, 6, generator=torch.Generator().manual_seed(9))
    expected = _grads(x, w, b, grad_output, padding=1)
    with Client(open_server.url, encoding=encoding) as client:
        result = client.backward(x, w, b, grad_output=grad_output, padding=1, return_output=True)
        arrays = client.backward(x.numpy(), w.numpy(), b.numpy(), grad_output=grad_output.numpy(), padding=1)
    grad_input, grad_weight, grad_bias = result
    for name, actual in (("grad_input", grad_input), ("grad_weight", grad_weight), ("grad_bias", grad_bias), ("output", result.output)):
        torch.testing.assert_close(actual, expected[name], atol=1e-4, rtol=1e-4)
    assert isinstance(arrays.grad_weight, np.ndarray) and arrays.output is None
    np.testing.assert_allclose(arrays.grad_weight, expected["grad_weight"].numpy(), atol=1e-4, rtol=1e-4)
    assert set(result.parity["tensors"]) == {"grad_input", "grad_weight", "grad_bias", "output"}


def test_bfloat16_and_float16_round_trip(open_server) -> None:
    x, w, _ = _problem(4)
    with Client(open_server.url) as client:
        bf16 = client.forward(x.bfloat16(), w.bfloat16(), padding=1)
        half = client.forward(x.half().numpy(), w.half().numpy(), padding=1)
    assert bf16.output.dtype == torch.bfloat16 and half.output.dtype == np.float16
    expected = F.conv2d(x.bfloat16().double(), w.bfloat16().double(), padding=1)
    torch.testing.assert_close(bf16.output.double(), expected, atol=0.1, rtol=0.05)
    assert bf16.parity["ok"] and half.parity["ok"]


@pytest.mark.anyio
async def test_async_client(open_server) -> None:
    x, w, b = _problem(5)
    async with AsyncClient(open_server.url) as client:
        forward = await client.forward(x, w, b, dilation=2)
        backward = await client.backward(x.numpy(), w.numpy(), None, loss="mean_square")
    torch.testing.assert_close(forward.output, F.conv2d(x, w, b, dilation=2), atol=1e-5, rtol=1e-4)
    leaves = [t.clone().requires_grad_() for t in (x, w)]
    F.conv2d(*leaves).square().mean().backward()
    np.testing.assert_allclose(backward.grad_weight, leaves[1].grad.numpy(), atol=1e-5, rtol=1e-4)
    assert backward.grad_bias is None


def test_typed_errors_carry_the_detail(open_server, strict_server) -> None:
    x, w, b = _problem(6)
    with Client(open_server.url) as client, pytest.raises(UnprocessableEntity) as invalid:
        client.forward(x, w, b, groups=2)
    assert invalid.value.status == 422 and invalid.value.detail[0]["loc"] == ["body", "input"]
    assert "channels" in str(invalid.value)
    with Client(strict_server.url) as client, pytest.raises(Unauthorized) as unauthorized:
        client.forward(x, w, b)
    assert unauthorized.value.status == 401 and "API key" in unauthorized.value.detail
    with Client(strict_server.url, api_key=API_KEY) as client:
        assert client.forward(x, w, b).parity["ok"]
        with pytest.raises(PayloadTooLarge) as too_large:
            client.forward(torch.zeros(1, 3, 128, 128), w)
    assert too_large.value.status == 413 and f"{MAX_BODY_BYTES:,}" in too_large.value.detail


def test_every_documented_status_has_its_type_and_a_non_json_answer_is_a_server_error() -> None:
    """408 is RequestTimeout (it fell through to ServerError); an HTML page from a proxy, with a 200 or as an
    error, becomes a typed error instead of a decode error."""
    import httpx

    from app.client import errors
    from app.client._core import _json, raise_for_status

    documented = {400: "BadRequest", 401: "Unauthorized", 408: "RequestTimeout", 413: "PayloadTooLarge", 415: "UnsupportedMediaType"}
    documented |= {422: "UnprocessableEntity", 503: "ServiceUnavailable", 504: "Timeout", 507: "OutOfDeviceMemory", 500: "ServerError"}
    for status, name in documented.items():
        assert type(errors.error_for(status, "x")).__name__ == name
    html = httpx.Response(200, text="<html>proxy</html>", request=httpx.Request("POST", "http://x/forward"))
    with pytest.raises(errors.ServerError, match="not JSON"):
        _json(html)
    listed = httpx.Response(502, json=[1, 2], request=httpx.Request("POST", "http://x/forward"))
    with pytest.raises(errors.ServerError) as bad_gateway:
        raise_for_status(listed)
    assert bad_gateway.value.status == 502 and bad_gateway.value.detail == "[1,2]"


def test_numpy_scalar_options_are_sent_as_numbers(open_server) -> None:
    x, w, b = _problem(7)
    with Client(open_server.url) as client:
        result = client.forward(x, w, b, stride=np.int64(2), padding=(np.int32(1), 2), groups=np.int64(1))
    torch.testing.assert_close(result.output, F.conv2d(x, w, b, stride=2, padding=(1, 2)), atol=1e-5, rtol=1e-4)
