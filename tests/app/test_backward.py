"""POST /backward in process: gradients against nn.Conv2d's, with and without grad_output, both losses."""

from __future__ import annotations

import pytest
import torch

from tests.app.helpers import from_json, nn_conv_grads, seed_body, seed_problem, to_json

pytestmark = pytest.mark.anyio


async def backward(client, body: dict) -> dict:
    response = await client.post("/backward", json=body)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.parametrize("loss", ["sum", "mean_square"])
async def test_losses_match_nn_conv2d(client, loss: str) -> None:
    x, conv = seed_problem()
    expected = nn_conv_grads(x, conv, loss=loss)
    result = await backward(client, seed_body(x, conv, loss=loss))
    for name in ("grad_input", "grad_weight", "grad_bias"):
        torch.testing.assert_close(from_json(result[name]), expected[name], atol=1e-6, rtol=1e-5)
    assert "output" not in result or result["output"] is None
    assert set(result["parity"]["tensors"]) == {"grad_input", "grad_weight", "grad_bias"}
    assert result["parity"]["ok"]


async def test_sum_is_the_default_loss(client) -> None:
    x, conv = seed_problem()
    result = await backward(client, seed_body(x, conv))
    torch.testing.assert_close(from_json(result["grad_bias"]), torch.full((2,), 18.0))


@pytest.mark.parametrize("encoding", ["list", "flat", "base64"])
async def test_grad_output_and_return_output(client, encoding: str) -> None:
    x, conv = seed_problem()
    grad_output = torch.randn(2, 2, 3, 3, generator=torch.Generator().manual_seed(5))
    expected = nn_conv_grads(x, conv, grad_output=grad_output)
    body = seed_body(x, conv, encoding, grad_output=to_json(grad_output, encoding), return_output=True)
    result = await backward(client, body)
    for name in ("grad_input", "grad_weight", "grad_bias", "output"):
        torch.testing.assert_close(from_json(result[name]), expected[name], atol=1e-6, rtol=1e-5)
    assert set(result["parity"]["tensors"]) == {"grad_input", "grad_weight", "grad_bias", "output"}


async def test_without_bias_grad_bias_is_null(client) -> None:
    x, conv = seed_problem()
    body = seed_body(x, conv)
    del body["bias"]
    result = await backward(client, body)
    assert result["grad_bias"] is None and "grad_bias" not in result["parity"]["tensors"]


async def test_grouped_strided_reflect_with_exact_oracle(client) -> None:
    generator = torch.Generator().manual_seed(7)
    x, w, b = (
        torch.randn(2, 4, 7, 7, generator=generator),
        torch.randn(6, 2, 3, 3, generator=generator),
        torch.randn(6, generator=generator),
    )
    conv = torch.nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2, padding_mode="reflect")
    with torch.no_grad():
        conv.weight.copy_(w), conv.bias.copy_(b)
    expected = nn_conv_grads(x, conv, loss="mean_square")
    body = {"input": to_json(x), "weight": to_json(w), "bias": to_json(b), "stride": 2, "padding": 1, "groups": 2}
    result = await backward(client, {**body, "padding_mode": "reflect", "loss": "mean_square", "exact": True})
    for name in ("grad_input", "grad_weight", "grad_bias"):
        torch.testing.assert_close(from_json(result[name]), expected[name], atol=1e-5, rtol=1e-4)
    assert set(result["parity"]["exact"]["tensors"]) == {"grad_input", "grad_weight", "grad_bias"}


@pytest.mark.parametrize(
    ("input_shape", "weight_shape", "options"),
    [((2, 32, 40, 40), (32, 1, 3, 3), {"groups": 32, "padding": 1}), ((2, 3, 64, 64), (16, 3, 7, 7), {"stride": 2, "padding": 3})],
    ids=["depthwise", "stem"],
)
async def test_float32_gradients_of_long_sums_report_ok(client, input_shape, weight_shape, options) -> None:
    """grad_weight sums 3,200 (depthwise) or 2,048 (stem) products: float32 rounding reaches 2e-4 near small
    elements, which torch.allclose refused in 2-3 of 5 random requests here though ours was as accurate as
    torch's. The verdict is judged against each tensor's scale (app/parity.py `compare`)."""
    generator = torch.Generator().manual_seed(11)
    for _ in range(5):
        tensors = [torch.randn(shape, generator=generator) for shape in (input_shape, weight_shape, weight_shape[:1])]
        body = {name: to_json(tensor) for name, tensor in zip(("input", "weight", "bias"), tensors)}
        result = await backward(client, {**body, **options, "exact": True})
        assert result["parity"]["ok"], result["parity"]
        for name, sides in result["parity"]["exact"]["tensors"].items():  # and ours is as close to float64 as torch's
            assert sides["ours"]["max_abs_err"] <= 4 * sides["torch"]["max_abs_err"] + 1e-6, (name, sides)
