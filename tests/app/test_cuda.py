"""The service on a CUDA device: /forward and /backward run on the GPU worker and answer what nn.Conv2d does.

Skipped cleanly without CUDA (the service's CPU path is covered by the rest of tests/app). On a GPU,
bench/gpu_check.sh runs these with the kernel tests: every test here has "cuda" in its name.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels.tolerances import tolerance
from tests.app.conftest import running
from tests.app.helpers import NAMED_DTYPES, from_json, to_json

pytestmark = [pytest.mark.anyio, pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

# A grouped, strided, padded layer with bias: every gradient path of the GEMM kernels (depthwise below).
LAYERS = {
    "grouped_strided": dict(input=(2, 8, 9, 9), weight=(16, 4, 3, 3), stride=2, padding=1, groups=2),
    "depthwise": dict(input=(2, 8, 7, 7), weight=(8, 1, 3, 3), stride=1, padding=1, groups=8),
}


@pytest.fixture
async def cuda_client():
    async with running(device="cuda") as (_, client):
        yield client


def problem(layer: str, dtype: torch.dtype, seed: int = 0):
    """(input, weight, bias, grad_output, conv kwargs) drawn in float64 and rounded to `dtype` (CPU tensors)."""
    shapes = LAYERS[layer]
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shapes["input"], generator=generator, dtype=torch.float64).to(dtype)
    w = torch.randn(shapes["weight"], generator=generator, dtype=torch.float64).to(dtype)
    b = torch.randn(shapes["weight"][0], generator=generator, dtype=torch.float64).to(dtype)
    kwargs = {key: shapes[key] for key in ("stride", "padding", "groups")}
    out_shape = F.conv2d(x.double(), w.double(), None, **kwargs).shape
    grad_output = torch.randn(out_shape, generator=generator, dtype=torch.float64).to(dtype)
    return x, w, b, grad_output, kwargs


def exact(x, w, b, grad_output, kwargs) -> dict[str, torch.Tensor]:
    """nn.Conv2d's output and gradients in float64 on the same rounded inputs (the oracle)."""
    leaves = [t.double().requires_grad_() for t in (x, w, b)]
    output = F.conv2d(*leaves, **kwargs)
    grads = torch.autograd.grad(output, leaves, grad_output.double())
    return {"output": output.detach(), **dict(zip(("grad_input", "grad_weight", "grad_bias"), grads))}


@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("algorithm", ["auto", "triton", "im2col"])
async def test_backward_on_cuda_matches_nn_conv2d(cuda_client, algorithm: str, dtype: str, layer: str) -> None:
    x, w, b, grad_output, kwargs = problem(layer, NAMED_DTYPES[dtype])
    body = {
        **{name: to_json(t, "base64") for name, t in (("input", x), ("weight", w), ("bias", b), ("grad_output", grad_output))},
        **kwargs,
        "encoding": "base64",
        "device": "cuda",
        "algorithm": algorithm,
        "return_output": True,
    }
    response = await cuda_client.post("/backward", json=body)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["device"].startswith("cuda") and result["dtype"] == dtype
    assert result["algorithm"] == ("triton" if algorithm == "auto" else algorithm)  # auto's choice on CUDA
    assert result["parity"]["ok"], result["parity"]
    atol, rtol = tolerance(NAMED_DTYPES[dtype])
    for name, expected in exact(x, w, b, grad_output, kwargs).items():
        torch.testing.assert_close(from_json(result[name]).double(), expected, atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")


async def test_forward_on_cuda_repeats_with_fresh_data(cuda_client) -> None:
    """Repeated requests of one shape reuse the compiled kernels (kernels/triton_launch.py): each answer is its own."""
    for seed in range(3):
        x, w, b, _, kwargs = problem("grouped_strided", torch.float32, seed)
        body = {"input": to_json(x), "weight": to_json(w), "bias": to_json(b), **kwargs, "device": "cuda", "algorithm": "triton"}
        response = await cuda_client.post("/forward", json=body)
        assert response.status_code == 200, response.text
        expected = F.conv2d(x.double(), w.double(), b.double(), **kwargs)
        atol, rtol = tolerance(torch.float32)
        torch.testing.assert_close(from_json(response.json()["output"]).double(), expected, atol=atol, rtol=rtol)


async def test_metrics_report_cuda_memory(cuda_client) -> None:
    x, w, b, _, kwargs = problem("depthwise", torch.float32)
    body = {"input": to_json(x), "weight": to_json(w), "bias": to_json(b), **kwargs, "device": "cuda"}
    assert (await cuda_client.post("/forward", json=body)).status_code == 200
    metrics = (await cuda_client.get("/metrics")).text
    assert any(line.startswith("conv_device_memory_bytes") and "cuda" in line for line in metrics.splitlines()), metrics[:2000]
