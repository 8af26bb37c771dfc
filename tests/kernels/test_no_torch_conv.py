"""Our path never dispatches a torch convolution op: forward, backward or double backward.

A TorchDispatchMode sees every aten op below autograd, including those the autograd engine runs
for backward, so it catches a conv hidden anywhere (F.conv2d, conv_transpose for grad_input,
convolution_backward, mkldnn/cudnn/thnn kernels). The positive control shows it catches F.conv2d.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kernels
from tests.kernels.cases import ALGORITHMS, Case, grid, make_inputs, our_conv
from tests.kernels.op_spy import OpSpy, forbidden, launches, multiplies


def spied_passes(conv, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> dict[str, list[str]]:
    """Ops of each pass: forward, backward (create_graph) and double backward."""
    leaves = [leaf for leaf in (input, weight, bias) if leaf is not None]
    passes = {}
    with OpSpy() as spy:
        output = conv(input, weight, bias)
    passes["forward"] = spy.ops
    with OpSpy() as spy:
        first = torch.autograd.grad(output, leaves, torch.ones_like(output), create_graph=True)
    passes["backward"] = spy.ops
    with OpSpy() as spy:
        torch.autograd.grad(sum((grad * grad).sum() for grad in first[:2]), leaves[:2])
    passes["double_backward"] = spy.ops
    return passes


SPY_CASES = [
    Case("gemm", in_channels=4, out_channels=6, groups=2, padding=1, size=(5, 6)),
    Case("strided_dilated", stride=(2, 1), dilation=(1, 2), padding=(0, 2), size=(6, 6)),
    Case("depthwise_reflect", in_channels=3, out_channels=6, groups=3, padding=1, padding_mode="reflect", size=(5, 5)),
    Case("pointwise_channels_last", in_channels=4, out_channels=2, kernel_size=(1, 1), size=(4, 4), layout="channels_last"),
]


# Triton's kernels run below the dispatcher: the spy records its launchers instead (tests/kernels/op_spy.py).
# On CPU it runs under the interpreter only; these four cases take a few seconds there.
SPIED_ALGORITHMS = [*ALGORITHMS, *(["triton"] if "triton" in kernels.names() else [])]


@pytest.mark.parametrize(("case", "algorithm", "dtype", "device"), grid(SPY_CASES, SPIED_ALGORITHMS, (torch.float32,)))
def test_no_torch_conv_op_is_dispatched(case, algorithm, dtype, device):
    input, weight, bias = make_inputs(case, dtype, device)
    passes = spied_passes(lambda *args: our_conv(case, *args, algorithm), input, weight, bias)
    for name, ops in passes.items():
        # The spy must have seen the pass's arithmetic, or an empty record would pass vacuously.
        assert multiplies(ops) or launches(ops), f"{name}: spy saw no multiply or Triton launch among {sorted(set(ops))}"
        assert forbidden(ops) == [], f"{name} dispatched torch conv ops"


def test_spy_catches_torch_conv2d():
    input, weight, bias = make_inputs(SPY_CASES[0], torch.float32, "cpu")
    passes = spied_passes(lambda *args: F.conv2d(*args, padding=1, groups=2), input, weight, bias)
    for name, ops in passes.items():
        assert forbidden(ops), f"{name}: the spy missed torch's conv in {sorted(set(ops))}"
    assert "aten.convolution.default" in passes["forward"]
    assert any("convolution_backward" in op for op in passes["backward"])
