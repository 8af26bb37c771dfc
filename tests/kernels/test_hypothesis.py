"""Random sweep of shapes and conv parameters: parity of output and gradients, or a clean refusal.

Problems are drawn valid by construction (sizes are chosen after the padding, so the kernel fits
and reflect / circular padding stay within torch's limits), from three families: general convs,
1x1 unpadded convs and depthwise convs, so every specialised algorithm gets examples it accepts.
KERNELS_HYPOTHESIS_EXAMPLES raises the example count for a deeper local sweep.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st

import kernels
from tests.kernels.cases import ALGORITHMS, DTYPES, GRAD_NAMES, Case, assert_parity, grads, make_inputs, our_conv, seeded, torch_conv

EXAMPLES = int(os.environ.get("KERNELS_HYPOTHESIS_EXAMPLES", "40"))
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def axis_padding(padding, axis: int, kernel: int, dilation: int) -> tuple[int, int]:
    """(before, after) along one axis, by torch's rules ("same": the odd extra pixel goes after)."""
    if padding == "valid":
        return 0, 0
    if padding == "same":
        total = dilation * (kernel - 1)
        return total // 2, total - total // 2
    amount = padding if isinstance(padding, int) else padding[axis]
    return amount, amount


@st.composite
def problems(draw, family: str) -> Case:
    groups = draw(st.integers(1, 3))
    if family == "depthwise":
        in_channels, out_channels = groups, groups * draw(st.integers(1, 2))
    else:
        in_channels, out_channels = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 2))
    if family == "pointwise":
        kernel, padding = (1, 1), draw(st.sampled_from([0, "valid", "same", (0, 0)]))
    else:
        kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
        padding = draw(st.one_of(st.integers(0, 2), st.tuples(st.integers(0, 2), st.integers(0, 2)), st.sampled_from(["same", "valid"])))
    dilation = draw(st.one_of(st.integers(1, 2), st.tuples(st.integers(1, 2), st.integers(1, 2))))
    # Stride 1 is drawn often: some algorithms (shifted_gemm) only accept it.
    stride = 1 if padding == "same" else draw(st.sampled_from([1, 1, 1, 2, 3, (1, 2), (2, 1), (3, 2)]))
    padding_mode = draw(st.sampled_from(PADDING_MODES))
    size = []
    for axis in (0, 1):
        axis_dilation = dilation if isinstance(dilation, int) else dilation[axis]
        before, after = axis_padding(padding, axis, kernel[axis], axis_dilation)
        smallest = max(1, axis_dilation * (kernel[axis] - 1) + 1 - before - after)
        if padding_mode == "reflect":
            smallest = max(smallest, max(before, after) + 1)
        if padding_mode == "circular":
            smallest = max(smallest, max(before, after))
        size.append(draw(st.integers(smallest, smallest + 4)))
    batch = draw(st.sampled_from([None, 0, 1, 2]))
    layouts = ["contiguous", "channels_last_weight"]
    layouts += ["noncontiguous"] if size[1] > 1 and batch != 0 else []  # empty or (.., 1) tensors are contiguous whatever their strides
    layouts += ["channels_last", "channels_last_both"] if batch is not None else []
    return Case(
        f"{family}",
        in_channels=in_channels,
        out_channels=out_channels,
        kernel_size=kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        bias=draw(st.booleans()),
        padding_mode=padding_mode,
        batch=batch,
        size=(size[0], size[1]),
        layout=draw(st.sampled_from(layouts)),
    )


ANY_PROBLEM = st.one_of(problems("general"), problems("pointwise"), problems("depthwise"))


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@settings(max_examples=EXAMPLES, deadline=None)
@given(case=ANY_PROBLEM, dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_random_problems_match_nn_conv2d(algorithm, case, dtype, seed):
    input, weight, bias = make_inputs(case, dtype, "cpu", seed=seed)
    leaves = [leaf for leaf in (input, weight, bias) if leaf is not None]
    try:
        output = our_conv(case, input, weight, bias, algorithm)
    except kernels.UnsupportedProblem as why:
        # A specialised algorithm may refuse (auto must not); refusing is only allowed as our clean error.
        assert algorithm != "auto", f"auto refused {case}: {why}"
        event(f"refused by {algorithm}")
        return
    event(f"ran {case.id}")
    exact_leaves = [leaf.detach().double().requires_grad_(True) for leaf in leaves]
    exact = torch_conv(case, *exact_leaves, *([None] if bias is None else []))
    assert output.shape == exact.shape
    assert_parity("output", output, exact, dtype)
    grad_output = torch.randn(exact.shape, generator=seeded(seed + 1), dtype=torch.float64).to(dtype)
    for name, actual, expected in zip(GRAD_NAMES, grads(output, grad_output, leaves), grads(exact, grad_output.double(), exact_leaves)):
        assert_parity(name, actual, expected, dtype)
