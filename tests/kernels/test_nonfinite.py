"""NaN and infinities: every algorithm spreads them to exactly the elements torch's conv spreads them to.

An algorithm that multiplies by structural zeros (masked copies, wide rows, zero-padded reads) or mixes a
whole tile (Winograd's transforms) would put NaN where torch has a number or an infinity; those run
with im2col when an operand is not finite (`ConvAlgorithm.inexact_nonfinite`, kernels/function.py).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels.tolerances import tolerance
from tests.kernels.cases import ALGORITHMS, Case, unless_refused

NONFINITE_CASES = {
    "3x3": Case("nonfinite_3x3", in_channels=4, out_channels=4, size=(32, 32)),  # shifted_gemm needs little padding waste
    "3x3_padded": Case("nonfinite_3x3_padded", in_channels=4, out_channels=4, padding=1, size=(12, 12)),
    "depthwise": Case("nonfinite_depthwise", in_channels=4, out_channels=4, groups=4, padding=1, size=(12, 12)),
    "1x1": Case("nonfinite_1x1", in_channels=4, out_channels=6, kernel_size=(1, 1), size=(6, 7)),
}


def grid() -> list:
    return [
        unless_refused(case, algorithm, case, algorithm, id=f"{name}-{algorithm}")
        for name, case in NONFINITE_CASES.items()
        for algorithm in ALGORITHMS
    ]


def poisoned(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Random float64 values with a NaN on the first column, +inf on the last (where reads that wrap across rows
    land) and -inf inside, all in channel 1."""
    tensor = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    tensor[0, 1, 2, 0] = float("nan")
    tensor[-1, 1, 3, -1] = float("inf")
    tensor[0, 1, shape[2] // 2, shape[3] // 2] = float("-inf")
    return tensor


def assert_same_nonfinite(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    assert torch.equal(actual.isnan(), expected.isnan()), f"{name}: NaN in other places than torch's"
    assert torch.equal(actual.isposinf(), expected.isposinf()) and torch.equal(actual.isneginf(), expected.isneginf()), name
    finite = expected.isfinite()
    atol, rtol = tolerance(torch.float64)
    torch.testing.assert_close(actual[finite], expected[finite], atol=atol, rtol=rtol, msg=name)


@pytest.mark.parametrize(("case", "algorithm"), grid())
def test_nonfinite_inputs_and_gradients_spread_as_torchs(case: Case, algorithm: str):
    weight = torch.randn(case.weight_shape(), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    input = poisoned((2, *case.input_shape()[1:]), seed=2)
    kwargs = dict(stride=case.stride, padding=case.padding, dilation=case.dilation, groups=case.groups)
    theirs_input, ours_input = input.clone().requires_grad_(), input.clone().requires_grad_()
    theirs_weight, ours_weight = weight.clone().requires_grad_(), weight.clone().requires_grad_()
    expected = F.conv2d(theirs_input, theirs_weight, **kwargs)
    actual = kernels.conv2d(ours_input, ours_weight, **kwargs, algorithm=algorithm)
    assert_same_nonfinite(actual.detach(), expected.detach(), "output")

    grad_output = poisoned(tuple(expected.shape), seed=3)
    expected.backward(grad_output)
    actual.backward(grad_output)
    assert_same_nonfinite(ours_input.grad, theirs_input.grad, "grad_input")
    assert_same_nonfinite(ours_weight.grad, theirs_weight.grad, "grad_weight")
