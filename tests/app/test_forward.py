"""POST /forward in process: results and parity numbers against F.conv2d computed here, each option."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import kernels
from app.schemas import FORWARD_EXAMPLE
from tests.app.helpers import from_json, to_json

pytestmark = pytest.mark.anyio


def random(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


async def post(client, body: dict, path: str = "/forward"):
    response = await client.post(path, json=body)
    assert response.status_code == 200, response.text
    return response.json()


async def test_seed_example_and_response_shape(client) -> None:
    result = await post(client, FORWARD_EXAMPLE)
    expected = F.conv2d(
        torch.tensor(FORWARD_EXAMPLE["input"]), torch.tensor(FORWARD_EXAMPLE["weight"]), torch.tensor(FORWARD_EXAMPLE["bias"]), padding=1
    )
    torch.testing.assert_close(from_json(result["output"]), expected, atol=1e-5, rtol=1e-4)
    assert result["algorithm"] in kernels.names() and result["algorithm"] != "auto"
    assert result["device"] == "cpu" and result["dtype"] == "float32"
    assert set(result["timing_ms"]) == {"decode", "queue", "compute", "reference", "encode", "total"}
    parity = result["parity"]
    assert parity["ok"] is True and parity["reference"] == "torch.nn.functional.conv2d"
    assert (parity["atol"], parity["rtol"]) == (1e-5, 1e-4)
    assert set(parity["tensors"]) == {"output"} and parity["exact"] is None


async def test_parity_numbers_match_a_comparison_made_here(client) -> None:
    x, w, b = random(2, 3, 9, 9), random(4, 3, 3, 3, seed=1), random(4, seed=2)
    result = await post(client, {"input": to_json(x), "weight": to_json(w), "bias": to_json(b), "padding": 1})
    ours, expected = from_json(result["output"]), F.conv2d(x, w, b, padding=1)
    entry = result["parity"]["tensors"]["output"]
    difference = (ours.double() - expected.double()).abs()
    assert entry["max_abs_err"] == pytest.approx(difference.max().item(), rel=1e-6, abs=1e-12)
    big = expected.abs() > 1e-5
    assert entry["max_rel_err"] == pytest.approx((difference[big] / expected.double().abs()[big]).max().item(), rel=1e-6, abs=1e-12)
    assert entry["allclose"] == torch.allclose(ours, expected, atol=1e-5, rtol=1e-4)


async def test_defaults_without_bias(client) -> None:
    x, w = random(1, 2, 5, 5), random(3, 2, 3, 3, seed=1)
    result = await post(client, {"input": to_json(x), "weight": to_json(w)})
    torch.testing.assert_close(from_json(result["output"]), F.conv2d(x, w))
    assert from_json(result["output"]).shape == (1, 3, 3, 3)


@pytest.mark.parametrize(
    "options, torch_kwargs",
    [
        ({"stride": 2}, {"stride": 2}),
        ({"stride": [1, 2], "padding": [2, 1]}, {"stride": (1, 2), "padding": (2, 1)}),
        ({"dilation": [2, 1], "padding": "valid"}, {"dilation": (2, 1)}),
        ({"padding": "same", "dilation": 2}, {"padding": "same", "dilation": 2}),
        ({"groups": 2}, {"groups": 2}),
    ],
)
async def test_conv_options(client, options: dict, torch_kwargs: dict) -> None:
    in_channels = 4
    weight_in = in_channels // options.get("groups", 1)
    x, w = random(2, in_channels, 8, 7), random(4, weight_in, 3, 2, seed=3)
    result = await post(client, {"input": to_json(x), "weight": to_json(w), **options})
    torch.testing.assert_close(from_json(result["output"]), F.conv2d(x, w, **torch_kwargs), atol=1e-5, rtol=1e-4)
    assert result["parity"]["ok"]


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
@pytest.mark.parametrize("padding", [1, [2, 1], "same"])
async def test_padding_modes_match_nn_conv2d(client, mode: str, padding) -> None:
    x, w = random(1, 2, 6, 6), random(3, 2, 4, 3, seed=4)
    conv = torch.nn.Conv2d(2, 3, (4, 3), padding=tuple(padding) if isinstance(padding, list) else padding, padding_mode=mode, bias=False)
    with torch.no_grad():
        conv.weight.copy_(w)
        expected = conv(x)
    result = await post(client, {"input": to_json(x), "weight": to_json(w), "padding": padding, "padding_mode": mode})
    torch.testing.assert_close(from_json(result["output"]), expected, atol=1e-5, rtol=1e-4)
    assert result["parity"]["ok"]


async def test_unbatched_input(client) -> None:
    x, w = random(2, 5, 5), random(3, 2, 3, 3, seed=1)
    result = await post(client, {"input": to_json(x), "weight": to_json(w)})
    assert from_json(result["output"]).shape == (3, 3, 3)


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16", "bfloat16"])
async def test_compute_dtype(client, dtype: str) -> None:
    x, w = random(1, 2, 5, 5), random(3, 2, 3, 3, seed=1)
    result = await post(client, {"input": to_json(x), "weight": to_json(w), "dtype": dtype, "encoding": "base64"})
    assert result["dtype"] == dtype and result["output"]["dtype"] == dtype
    assert result["parity"]["ok"], result["parity"]


async def test_dtype_null_takes_the_inputs(client) -> None:
    x, w = random(1, 2, 5, 5, dtype=torch.float64), random(3, 2, 3, 3, seed=1)
    result = await post(client, {"input": to_json(x, "flat"), "weight": to_json(w)})
    assert result["dtype"] == "float64" and result["parity"]["atol"] == 1e-10


async def test_tolerances_from_the_request(client) -> None:
    result = await post(client, {**FORWARD_EXAMPLE, "atol": 0, "rtol": 0.5})
    assert (result["parity"]["atol"], result["parity"]["rtol"]) == (0, 0.5)


async def test_parity_false_skips_the_reference(client) -> None:
    result = await post(client, {**FORWARD_EXAMPLE, "parity": False})
    assert result["parity"] is None and result["timing_ms"]["reference"] == 0


async def test_exact_oracle_reports_ours_and_torch(client) -> None:
    x, w = random(2, 8, 10, 10, dtype=torch.float16), random(4, 8, 3, 3, seed=1, dtype=torch.float16)
    result = await post(client, {"input": to_json(x, "flat"), "weight": to_json(w, "flat"), "exact": True})
    exact = result["parity"]["exact"]
    assert exact["reference"].startswith("torch.nn.functional.conv2d in float64")
    entry = exact["tensors"]["output"]
    truth = F.conv2d(x.double(), w.double())
    ours = from_json(result["output"], torch.float16).double()
    assert entry["ours"]["max_abs_err"] == pytest.approx((ours - truth).abs().max().item(), rel=1e-6)
    assert entry["torch"]["max_abs_err"] == pytest.approx((F.conv2d(x, w).double() - truth).abs().max().item(), rel=1e-6)


@pytest.mark.parametrize("algorithm", ["im2col", "reference"])
async def test_named_algorithm(client, algorithm: str) -> None:
    result = await post(client, {**FORWARD_EXAMPLE, "algorithm": algorithm})
    assert result["algorithm"] == algorithm and result["parity"]["ok"]


@pytest.mark.parametrize("encoding", ["list", "flat", "base64"])
async def test_non_finite_inputs_round_trip(client, encoding: str) -> None:
    x = random(1, 1, 4, 4)
    x[0, 0, 0, 0], x[0, 0, 3, 3] = math.nan, math.inf
    w = torch.ones(1, 1, 1, 1)
    result = await post(client, {"input": to_json(x, encoding), "weight": to_json(w, encoding), "encoding": encoding})
    output = from_json(result["output"])
    torch.testing.assert_close(output, x, equal_nan=True)
    assert result["parity"]["ok"], "equal NaN / inf on both sides is parity"


async def test_device_cpu_by_name(client) -> None:
    result = await post(client, {**FORWARD_EXAMPLE, "device": "cpu"})
    assert result["device"] == "cpu"


@pytest.mark.parametrize("route", ["/forward", "/backward"])
async def test_parity_is_not_ok_when_our_conv_misses_a_tap(client, monkeypatch, route: str) -> None:
    """The report can fail: our conv with one kernel tap dropped is caught (output, grad_input and grad_weight)."""
    import app.compute as compute

    def missing_tap(algorithm):
        def conv(input, weight, bias, *args):
            mask = torch.ones_like(weight)
            mask[..., 0, 0] = 0
            return kernels.conv2d(input, weight * mask, bias, *args, algorithm=algorithm)

        return conv

    monkeypatch.setattr(compute, "_ours", missing_tap)
    x, w, b = random(2, 3, 9, 9), random(4, 3, 3, 3, seed=1), random(4, seed=2)
    response = await client.post(route, json={"input": to_json(x), "weight": to_json(w), "bias": to_json(b), "padding": 1})
    parity = response.json()["parity"]
    assert parity["ok"] is False
    assert all(entry["close"] is False for name, entry in parity["tensors"].items() if name != "grad_bias"), parity
