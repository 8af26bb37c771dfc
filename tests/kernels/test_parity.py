"""Output and every gradient of kernels.conv2d against nn.Conv2d, over the case grid x algorithm x dtype x device.

Two oracles, for two different questions:
- values: nn.Conv2d evaluated in float64 on the *same rounded inputs* (and the same rounded
  grad_output). For float16/bfloat16 this measures our error against exact math; comparing with
  torch's own half-precision conv would instead measure the sum of two roundings (ours and torch's,
  and CPU half conv accumulates differently from ours), so a fixed tolerance would be either loose
  or flaky. For float64 it is simply F.conv2d in float64, so the 1e-10 row is a real test.
- metadata: nn.Conv2d in the same dtype on the same device with the same layouts, for the dtype,
  device, shape and memory format of the output and of grad_input.
"""

from __future__ import annotations

import pytest
import torch

from tests.kernels.cases import (
    ALGORITHMS,
    CASES,
    DTYPES,
    GRAD_NAMES,
    assert_parity,
    grads,
    grid,
    layout_flags,
    make_inputs,
    our_conv,
    seeded,
    torch_conv,
)


@pytest.mark.parametrize(("case", "algorithm", "dtype", "device"), grid(CASES, ALGORITHMS, DTYPES))
def test_matches_nn_conv2d(case, algorithm, dtype, device):
    input, weight, bias = make_inputs(case, dtype, device)
    leaves = [leaf for leaf in (input, weight, bias) if leaf is not None]
    output = our_conv(case, input, weight, bias, algorithm)

    same_dtype = torch_conv(case, input, weight, bias)
    assert output.shape == same_dtype.shape
    assert output.dtype == same_dtype.dtype == dtype
    assert output.device == same_dtype.device
    assert layout_flags(output) == layout_flags(same_dtype), "output memory format differs from nn.Conv2d's"
    assert output.stride() == same_dtype.stride(), "strides differ from nn.Conv2d's (size-1 dims steer the next layer's format)"

    exact_leaves = [leaf.detach().double().requires_grad_(True) for leaf in leaves]
    exact = torch_conv(case, *exact_leaves, *([None] if bias is None else []))
    grad_output = torch.randn(exact.shape, generator=seeded(1), dtype=torch.float64).to(device, dtype)
    assert_parity("output", output, exact, dtype)

    our_grads = grads(output, grad_output, leaves)
    exact_grads = grads(exact, grad_output.double(), exact_leaves)
    for name, actual, expected in zip(GRAD_NAMES, our_grads, exact_grads):
        assert actual.device == output.device, f"{name} on {actual.device}"
        assert_parity(name, actual, expected, dtype)

    same_dtype_grad_input = grads(same_dtype, grad_output, [input])[0]
    assert layout_flags(our_grads[0]) == layout_flags(same_dtype_grad_input), "grad_input memory format differs from nn.Conv2d's"
    assert our_grads[0].stride() == same_dtype_grad_input.stride(), "grad_input strides differ from nn.Conv2d's"
