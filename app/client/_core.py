"""Client and AsyncClient: /forward and /backward as function calls. Depends on httpx and numpy; torch optional.

Tensors go out and come back in base64 by default (the fastest encoding: no number formatting, bit
exact, NaN and infinities included); "flat" and "list" are there for debugging. numpy in -> numpy out,
torch in -> torch out (decided by `input`). 503s are retried after the server's Retry-After, a little
jittered, up to `retries` times; so is a request whose connection closed or was reset before the whole
response came (a replica behind a load balancer dying mid-answer, which the balancer cannot retry once it
has forwarded the headers; a pooled connection the server closed as idle just as it was reused): /forward
and /backward are pure functions, so sending again is safe. Timeouts are not retried (the server may
still be computing). Other errors raise at once as the typed errors of app.client.errors.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np

from app.client.errors import ServerError, error_for

try:
    import torch
except ImportError:  # the client works with numpy alone
    torch = None  # type: ignore[assignment]

try:
    import ml_dtypes
except ImportError:
    ml_dtypes = None

ENCODINGS = ("base64", "flat", "list")
_NUMPY_DTYPES = {"float64": np.float64, "float32": np.float32, "float16": np.float16}
_NON_FINITE = {"NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf")}
# The connection closed (RemoteProtocolError) or was reset (ReadError, WriteError) before a whole response.
CUT = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)


@dataclass
class ForwardResult:
    """output: (N, C_out, H_out, W_out) in the request's kind (torch or numpy); parity as the server reports it."""

    output: Any
    parity: dict | None
    algorithm: str
    device: str
    dtype: str
    timing_ms: dict[str, float] = field(default_factory=dict)


@dataclass
class BackwardResult:
    """Gradients (and `output` when asked for); iterating gives (grad_input, grad_weight, grad_bias)."""

    grad_input: Any
    grad_weight: Any
    grad_bias: Any
    output: Any
    parity: dict | None
    algorithm: str
    device: str
    dtype: str
    timing_ms: dict[str, float] = field(default_factory=dict)

    def __iter__(self) -> Iterator[Any]:
        return iter((self.grad_input, self.grad_weight, self.grad_bias))


def _is_torch(value: Any) -> bool:
    return torch is not None and isinstance(value, torch.Tensor)


def _raw(value: Any) -> tuple[list[int], str, np.ndarray]:
    """A tensor or array -> (shape, dtype name, little-endian contiguous array; bfloat16 as its uint16 bits)."""
    if _is_torch(value):
        tensor = value.detach().cpu().contiguous()
        if tensor.dtype == torch.bfloat16:
            return list(tensor.shape), "bfloat16", tensor.view(torch.int16).numpy().view(np.uint16)
        if not tensor.is_floating_point():
            tensor = tensor.float()
        return list(tensor.shape), str(tensor.dtype).removeprefix("torch."), tensor.numpy()
    array = np.ascontiguousarray(value)
    if array.dtype.name == "bfloat16":
        return list(array.shape), "bfloat16", array.view(np.uint16)
    if array.dtype.name not in _NUMPY_DTYPES:
        array = array.astype(np.float32)
    return list(array.shape), array.dtype.name, array.astype(array.dtype.newbyteorder("<"), copy=False)


def _json_numbers(array: np.ndarray) -> Any:
    """Numbers for JSON, with NaN / infinities as the service's strings."""
    values = array.astype(np.float64)
    if np.isfinite(values).all():
        return values.tolist()
    marked = values.astype(object)
    marked[np.isnan(values)] = "NaN"
    marked[np.isposinf(values)] = "Infinity"
    marked[np.isneginf(values)] = "-Infinity"
    return marked.tolist()


def encode_tensor(value: Any, encoding: str) -> Any:
    shape, dtype, array = _raw(value)
    if encoding == "base64":
        return {"shape": shape, "dtype": dtype, "b64": base64.b64encode(array.tobytes()).decode("ascii")}
    numbers = _float_values(array, dtype)
    if encoding == "flat":
        return {"shape": shape, "dtype": dtype, "data": _json_numbers(numbers.ravel())}
    return _json_numbers(numbers)


def _float_values(array: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":  # the bits of a bfloat16 are the top half of a float32's
        return (array.astype(np.uint32) << 16).view(np.float32)
    return array


def _from_bits(bits: np.ndarray, as_torch: bool) -> Any:
    """bfloat16 bits (uint16) -> a torch bfloat16 tensor, an ml_dtypes bfloat16 array, or float32 (exact)."""
    if as_torch:
        return torch.from_numpy(bits.astype(np.int16)).view(torch.bfloat16)
    if ml_dtypes is not None:
        return bits.view(ml_dtypes.bfloat16)
    return _float_values(bits, "bfloat16")


def decode_tensor(value: Any, as_torch: bool, list_dtype: str) -> Any:
    """A response tensor in any of the three forms -> torch tensor or numpy array."""
    if value is None:
        return None
    if isinstance(value, dict):
        dtype, shape = value.get("dtype", "float32"), value["shape"]
        if "b64" in value:
            raw = base64.b64decode(value["b64"])
            if dtype == "bfloat16":
                return _from_bits(np.frombuffer(raw, dtype="<u2").reshape(shape), as_torch)
            array = np.frombuffer(raw, dtype=np.dtype(_NUMPY_DTYPES[dtype]).newbyteorder("<")).reshape(shape).copy()
        else:
            array = np.array(value["data"], dtype=np.float64).reshape(shape)
    else:
        dtype, array = list_dtype, np.array(value, dtype=np.float64)
    if dtype == "bfloat16":
        if as_torch:
            return torch.from_numpy(array.astype(np.float32)).to(torch.bfloat16)
        bits = (array.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)  # exact: the server sent bfloat16 values
        return _from_bits(bits, False)
    array = array.astype(_NUMPY_DTYPES[dtype], copy=False)
    return torch.from_numpy(np.ascontiguousarray(array)) if as_torch else array


def _plain(value: Any) -> Any:
    """JSON-able option values: tuples as lists, numpy scalars (np.int64(2) from a config) as Python numbers."""
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value.item() if isinstance(value, np.generic) else value


def _options(conv_params: dict[str, Any]) -> dict[str, Any]:
    return {key: _plain(value) for key, value in conv_params.items()}


def build_body(input: Any, weight: Any, bias: Any, encoding: str, conv_params: dict[str, Any], grad_output: Any = None) -> dict[str, Any]:
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
    body = {"input": encode_tensor(input, encoding), "weight": encode_tensor(weight, encoding), **_options(conv_params)}
    body["bias"] = None if bias is None else encode_tensor(bias, encoding)
    if grad_output is not None:
        body["grad_output"] = encode_tensor(grad_output, encoding)
    if encoding == "list" and body.get("dtype") is None:
        body["dtype"] = _raw(input)[1]  # nested lists carry no dtype; the input's is the default compute dtype
    body["encoding"] = encoding
    return body


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return max(0.0, float(response.headers["retry-after"]))
    except (KeyError, ValueError):
        return None


def raise_for_status(response: httpx.Response) -> None:
    if response.status_code == 200:
        return
    try:
        payload = response.json()
    except ValueError:
        payload = None
    detail = payload.get("detail", response.text) if isinstance(payload, dict) else response.text
    raise error_for(response.status_code, detail, _retry_after(response))


def _json(response: httpx.Response) -> Any:
    """A 200's JSON body (`_post` raises for every other status); an answer that is not JSON (a proxy's HTML
    page, say) is a ServerError, as a bad gateway's 502, not a decode error."""
    try:
        return response.json()
    except ValueError:
        raise ServerError(502, f"the answer is not JSON: {response.text[:200]!r}") from None


def _result(payload: dict, backward: bool, as_torch: bool) -> ForwardResult | BackwardResult:
    dtype = payload["dtype"]
    report = {key: payload.get(key) for key in ("parity", "algorithm", "device", "dtype")}
    report["timing_ms"] = payload.get("timing_ms") or {}
    if not backward:
        return ForwardResult(decode_tensor(payload["output"], as_torch, dtype), **report)
    tensors = {name: decode_tensor(payload.get(name), as_torch, dtype) for name in ("grad_input", "grad_weight", "grad_bias", "output")}
    return BackwardResult(**tensors, **report)


class _Base:
    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        encoding: str = "base64",
        timeout: float = 60.0,
        retries: int = 3,
        max_retry_wait: float = 30.0,
    ) -> None:
        if encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
        self.base_url = base_url.rstrip("/")
        self.encoding = encoding
        self.retries = retries
        self.max_retry_wait = max_retry_wait
        self._headers = {"content-type": "application/json"}
        if api_key:
            self._headers["authorization"] = f"Bearer {api_key}"
        self._timeout = timeout

    def _request(
        self, backward: bool, input: Any, weight: Any, bias: Any, grad_output: Any, params: dict[str, Any]
    ) -> tuple[str, bytes, bool]:
        encoding = params.pop("encoding", None) or self.encoding
        body = build_body(input, weight, bias, encoding, params, grad_output)
        return ("/backward" if backward else "/forward"), json.dumps(body).encode(), _is_torch(input)

    def _delay(self, response: httpx.Response, attempt: int) -> float | None:
        """Seconds to wait before retrying a 503, or None when out of attempts."""
        if response.status_code != 503 or attempt >= self.retries:
            return None
        wait = _retry_after(response)
        wait = min(0.5 * 2**attempt, self.max_retry_wait) if wait is None else min(wait, self.max_retry_wait)
        # At least Retry-After, plus up to 20% so that clients refused together do not return together.
        return wait * (1 + 0.2 * random.random())

    def _cut_delay(self, attempt: int) -> float | None:
        """Seconds to wait before sending again a request whose response was cut, or None when out of attempts."""
        if attempt >= self.retries:
            return None
        return min(0.05 * 2**attempt, self.max_retry_wait) * (1 + 0.2 * random.random())

    def _next_delay(self, outcome: httpx.Response | httpx.TransportError, attempt: int) -> float | None:
        """One attempt's outcome -> seconds to wait before the next, or None when `outcome` is the answer.

        Raises the cut (one of CUT: the connection closed or reset before the whole response) or the
        error status when out of attempts, and an error status that is not retried at once."""
        if isinstance(outcome, CUT):
            delay = self._cut_delay(attempt)
            if delay is None:
                raise outcome
            return delay
        delay = self._delay(outcome, attempt)
        if delay is None:
            raise_for_status(outcome)
        return delay


class Client(_Base):
    """Synchronous client. `with Client(url) as client: y = client.forward(x, w, padding=1).output`."""

    def __init__(self, base_url: str, api_key: str | None = None, **options: Any) -> None:
        super().__init__(base_url, api_key, **options)
        self._http = httpx.Client(base_url=self.base_url, timeout=self._timeout, headers=self._headers)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _post(self, path: str, content: bytes) -> httpx.Response:
        attempt = 0
        while True:
            try:
                outcome = self._http.post(path, content=content)
            except CUT as cut:
                outcome = cut
            delay = self._next_delay(outcome, attempt)
            if delay is None:
                return outcome
            time.sleep(delay)
            attempt += 1

    def forward(self, input: Any, weight: Any, bias: Any = None, **conv_params: Any) -> ForwardResult:
        """input (N, C_in, H, W) or (C_in, H, W), weight (C_out, C_in/groups, kH, kW), bias (C_out,);
        conv_params: stride, padding, dilation, groups, padding_mode, algorithm, dtype, exact, ... (see /docs)."""
        path, content, as_torch = self._request(False, input, weight, bias, None, conv_params)
        return _result(_json(self._post(path, content)), False, as_torch)

    def backward(self, input: Any, weight: Any, bias: Any = None, grad_output: Any = None, **conv_params: Any) -> BackwardResult:
        """Gradients w.r.t. input, weight and bias of <output, grad_output> (or of the `loss` parameter)."""
        path, content, as_torch = self._request(True, input, weight, bias, grad_output, conv_params)
        return _result(_json(self._post(path, content)), True, as_torch)

    def info(self) -> dict:
        response = self._http.get("/info")
        raise_for_status(response)
        return response.json()


class AsyncClient(_Base):
    """The asyncio twin of Client: `async with AsyncClient(url) as client: result = await client.forward(...)`."""

    def __init__(self, base_url: str, api_key: str | None = None, **options: Any) -> None:
        super().__init__(base_url, api_key, **options)
        self._http = httpx.AsyncClient(base_url=self.base_url, timeout=self._timeout, headers=self._headers)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _post(self, path: str, content: bytes) -> httpx.Response:
        attempt = 0
        while True:
            try:
                outcome = await self._http.post(path, content=content)
            except CUT as cut:
                outcome = cut
            delay = self._next_delay(outcome, attempt)
            if delay is None:
                return outcome
            await asyncio.sleep(delay)
            attempt += 1

    async def forward(self, input: Any, weight: Any, bias: Any = None, **conv_params: Any) -> ForwardResult:
        path, content, as_torch = self._request(False, input, weight, bias, None, conv_params)
        return _result(_json(await self._post(path, content)), False, as_torch)

    async def backward(self, input: Any, weight: Any, bias: Any = None, grad_output: Any = None, **conv_params: Any) -> BackwardResult:
        path, content, as_torch = self._request(True, input, weight, bias, grad_output, conv_params)
        return _result(_json(await self._post(path, content)), True, as_torch)

    async def info(self) -> dict:
        response = await self._http.get("/info")
        raise_for_status(response)
        return response.json()
