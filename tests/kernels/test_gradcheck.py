"""Numerical gradient checks (float64, tiny shapes) of our backward and of its own backward.

gradcheck compares our analytic backward with finite differences of our own forward, so it is
independent of torch's conv; gradgradcheck does the same for the backward (our backward is built
from differentiable torch ops, and `double_backward=True` is claimed for every CPU algorithm).

fast_mode=True checks v^T J u for random u, v instead of the full Jacobian: any wrong gradient
entry still fails it (with probability 1 for continuous random vectors), and it costs two forward
passes instead of two per input element, which keeps this file at seconds instead of minutes.
"""

from __future__ import annotations

import pytest
import torch

from tests.kernels.cases import ALGORITHMS, Case, grid, make_inputs, our_conv

# Small enough for finite differences, and covering groups, depthwise and every padding mode.
GRADCHECK_CASES = [
    Case("basic", in_channels=2, out_channels=2, kernel_size=(2, 3), size=(4, 4), batch=1, padding=1),
    Case("stride_dilation", in_channels=2, out_channels=2, stride=(2, 1), dilation=(1, 2), padding=(1, 2), size=(5, 5), batch=1),
    Case("same_even", in_channels=1, out_channels=2, kernel_size=(2, 2), padding="same", size=(4, 3), batch=2),
    Case("groups", in_channels=4, out_channels=2, kernel_size=(2, 2), groups=2, size=(3, 4), batch=1),
    Case("depthwise_multiplier", in_channels=2, out_channels=4, kernel_size=(2, 2), groups=2, padding=1, size=(3, 3), batch=1),
    Case("reflect", in_channels=2, out_channels=1, kernel_size=(2, 3), padding=(1, 2), padding_mode="reflect", size=(3, 4), batch=1),
    Case(
        "replicate_groups",
        in_channels=2,
        out_channels=2,
        kernel_size=(2, 2),
        groups=2,
        padding=2,
        padding_mode="replicate",
        size=(3, 3),
        batch=1,
    ),
    Case("circular_same", in_channels=1, out_channels=2, kernel_size=(3, 2), padding="same", padding_mode="circular", size=(3, 4), batch=1),
    Case("unbatched_no_bias", in_channels=2, out_channels=2, kernel_size=(2, 2), bias=False, padding=1, size=(3, 3), batch=None),
    Case("channels_last", in_channels=2, out_channels=2, kernel_size=(2, 2), padding=1, size=(3, 3), batch=1, layout="channels_last"),
    # strided: im2col's forward keeps its columns for grad_weight (ConvAlgorithm.forward_keeping), which the double
    # backward must not use (its grad_weight has to stay a function of the input): channels-last patches, stride phases
    Case("strided_channels_last", in_channels=2, out_channels=2, stride=2, padding=1, size=(5, 5), batch=1, layout="channels_last"),
    Case("strided_phases", in_channels=2, out_channels=2, stride=2, padding=1, size=(5, 6), batch=2),
    Case("three_by_three", in_channels=2, out_channels=3, padding=1, size=(4, 5), batch=1),  # winograd takes it too
]

GRID = grid(GRADCHECK_CASES, ALGORITHMS, (torch.float64,))


def conv_of_leaves(case: Case, algorithm: str):
    """f(input, weight[, bias]) -> output, the function gradcheck differentiates."""
    if case.bias:
        return lambda input, weight, bias: our_conv(case, input, weight, bias, algorithm)
    return lambda input, weight: our_conv(case, input, weight, None, algorithm)


@pytest.mark.parametrize(("case", "algorithm", "dtype", "device"), GRID)
def test_gradcheck(case, algorithm, dtype, device):
    leaves = tuple(leaf for leaf in make_inputs(case, dtype, device) if leaf is not None)
    assert torch.autograd.gradcheck(conv_of_leaves(case, algorithm), leaves, fast_mode=True)


# gradgradcheck also runs the double backward twice and demands bitwise-equal results unless told
# otherwise. On CUDA the backward of our gathers (index_select, as_strided windows) is an atomic
# scatter-add whose order varies run to run: the H200 run saw float64 differences at rounding level.
# That is order, not error: the finite-difference comparison itself keeps its usual tolerance.
CUDA_NONDETERMINISM = 1e-12


@pytest.mark.parametrize(("case", "algorithm", "dtype", "device"), GRID)
def test_gradgradcheck(case, algorithm, dtype, device):
    leaves = tuple(leaf for leaf in make_inputs(case, dtype, device) if leaf is not None)
    nondet_tol = CUDA_NONDETERMINISM if device == "cuda" else 0.0
    assert torch.autograd.gradgradcheck(conv_of_leaves(case, algorithm), leaves, fast_mode=True, nondet_tol=nondet_tol)
