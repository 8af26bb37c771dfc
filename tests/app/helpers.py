"""Shared by tests/app and tests/integration: request bodies, tensor <-> JSON in each form, the oracle."""

from __future__ import annotations

import base64
import math

import torch
import torch.nn.functional as F

DTYPE_NAMES = {torch.float64: "float64", torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
NAMED_DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}
NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _json_value(value: float) -> float | str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return value


def to_json(tensor: torch.Tensor, encoding: str = "list"):
    """A tensor in one of the three request forms, written independently of app/codec.py."""
    if encoding == "base64":
        raw = tensor.contiguous().view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor.contiguous()
        return {"shape": list(tensor.shape), "dtype": DTYPE_NAMES[tensor.dtype], "b64": base64.b64encode(raw.numpy().tobytes()).decode()}
    if encoding == "flat":
        return {"shape": list(tensor.shape), "dtype": DTYPE_NAMES[tensor.dtype], "data": _mark(tensor.double().flatten().tolist())}
    return _mark(tensor.double().tolist())


def _mark(node):
    if isinstance(node, list):
        return [_mark(child) for child in node]
    return _json_value(node)


def from_json(value, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A response tensor in any of the three forms -> torch tensor (lists: `dtype`)."""
    if isinstance(value, dict):
        declared = NAMED_DTYPES[value["dtype"]]
        if "b64" in value:
            raw = bytearray(base64.b64decode(value["b64"]))
            return torch.frombuffer(raw, dtype=declared).reshape(value["shape"]) if raw else torch.empty(value["shape"], dtype=declared)
        data = [NON_FINITE.get(v, v) if isinstance(v, str) else v for v in value["data"]]
        return torch.tensor(data, dtype=torch.float64).to(declared).reshape(value["shape"])
    return torch.tensor(_decode_list(value), dtype=torch.float64).to(dtype)


def _decode_list(node):
    if isinstance(node, list):
        return [_decode_list(child) for child in node]
    return NON_FINITE.get(node, node) if isinstance(node, str) else node


def seed_problem(generator_seed: int = 0) -> tuple[torch.Tensor, torch.nn.Conv2d]:
    """The seed notebook's test: x (2, 1, 3, 3), nn.Conv2d(1, 2, 3, padding=1) with bias."""
    torch.manual_seed(generator_seed)
    x = torch.randn(2, 1, 3, 3)
    conv = torch.nn.Conv2d(1, 2, (3, 3), stride=1, padding=1, dilation=1, bias=True)
    return x, conv


def seed_body(x: torch.Tensor, conv: torch.nn.Conv2d, encoding: str = "list", **fields) -> dict:
    return {
        "input": to_json(x, encoding),
        "weight": to_json(conv.weight.detach(), encoding),
        "bias": to_json(conv.bias.detach(), encoding),
        "padding": 1,
        "encoding": encoding,
        **fields,
    }


def nn_conv_grads(
    x: torch.Tensor, conv: torch.nn.Conv2d, loss: str = "sum", grad_output: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """nn.Conv2d's output and gradients, as the seed computes them."""
    conv.zero_grad()
    leaf = x.clone().requires_grad_()
    output = conv(leaf)
    if grad_output is not None:
        output.backward(grad_output)
    elif loss == "mean_square":
        output.square().mean().backward()
    else:
        output.sum().backward()
    return {
        "output": output.detach(),
        "grad_input": leaf.grad,
        "grad_weight": conv.weight.grad.clone(),
        "grad_bias": conv.bias.grad.clone(),
    }


def conv_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
    return F.conv2d(x, weight, bias, **kwargs)
