"""The depthwise algorithm's flat fast path: stacked masked copies with zeros between planes.

Each case is one the fast path takes (asserted), chosen for an edge of its index arithmetic: reads
that run past a plane into the zeros above or below it (tall padding, output taller or shorter
than the input), taps shifted a whole row sideways (image narrower than the kernel), no tap at all,
asymmetric "same" padding, dilation. Output and both gradients, alone and together, against the
float64 oracle, through both backward strategies (one strided view for small problems, per tap for
big ones). The stack lives in reused scratch buffers, so one test first fills them with NaN bytes: a
gap left unzeroed would show.
"""

from __future__ import annotations

import pytest
import torch

import kernels
from kernels import depthwise, workspace
from kernels.params import normalize
from tests.kernels.cases import GRAD_NAMES, Case, assert_parity, grads, make_inputs, our_conv, seeded, torch_conv


def flat_case(name: str, channels: int = 3, **kwargs) -> Case:
    return Case(name, in_channels=channels, out_channels=channels, groups=channels, **kwargs)


FLAT_CASES = [
    flat_case("3x3_pad1", padding=1, batch=3, size=(7, 9)),
    flat_case("5x5_pad2_one_channel", channels=1, kernel_size=(5, 5), padding=2, size=(8, 6)),
    flat_case("3x3_dilated_pad2", padding=2, dilation=2, size=(9, 7)),
    flat_case("even_same_dilated", kernel_size=(2, 4), padding="same", dilation=(2, 1), size=(6, 7)),
    flat_case("taller_output", padding=(3, 1), size=(5, 6)),  # H_out = H + 4: reads far above and below
    flat_case("shorter_output", padding=(0, 1), size=(6, 5)),  # H_out = H - 2
    flat_case("one_column", padding=1, size=(5, 1)),  # sideways taps read only padding
    flat_case("kernel_wider_than_image", kernel_size=(3, 5), padding=(1, 2), size=(4, 2)),
    flat_case("no_tap_reads_the_image", kernel_size=(1, 2), padding=(0, 1), dilation=(1, 2), size=(3, 1)),
    flat_case("no_bias", padding=1, bias=False, batch=1, size=(4, 4)),
    # a 1x1 kernel, dilated, on a 1x1 image: its one stack block is shorter than the dilation (hypothesis found
    # the negative stride this gave the unused column dimension); one channel, one image, as found
    flat_case("one_pixel_dilated_1x1", channels=1, kernel_size=(1, 1), dilation=2, batch=1, size=(1, 1)),
]


def _assert_flat(case: Case, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    spec = normalize(input, weight, bias, case.stride, case.padding, case.dilation, case.groups, case.padding_mode)
    with torch.no_grad():
        assert depthwise._flat_eligible(input, weight, spec), f"{case.id} does not take the flat path"


@pytest.fixture(params=["one_view", "per_tap"])
def backward_strategy(request, monkeypatch):
    """Every flat case through each backward: the size threshold moved so the case lands on that side."""
    monkeypatch.setattr(depthwise, "ONE_VIEW_MAX_BYTES", 1 << 40 if request.param == "one_view" else 0)
    return request.param


@pytest.mark.parametrize("case", FLAT_CASES, ids=lambda case: case.id)
@pytest.mark.parametrize("wanted", ["all", "input", "weight"])
def test_flat_path_matches_the_oracle(case, wanted, backward_strategy):
    dtype = torch.float64
    input, weight, bias = make_inputs(case, dtype, "cpu", seed=7)
    _assert_flat(case, input, weight, bias)
    leaves = {"all": [leaf for leaf in (input, weight, bias) if leaf is not None], "input": [input], "weight": [weight]}[wanted]
    output = our_conv(case, input, weight, bias, "depthwise")
    exact_leaves = [leaf.detach().requires_grad_(True) for leaf in (input, weight, bias) if leaf is not None]
    exact = torch_conv(case, *exact_leaves, *([None] if bias is None else []))
    assert_parity("output", output, exact, dtype)
    grad_output = torch.randn(exact.shape, generator=seeded(8), dtype=dtype)
    expected = dict(zip(("input", "weight", "bias"), grads(exact, grad_output, exact_leaves)))
    names = {"all": ("input", "weight", "bias"), "input": ("input",), "weight": ("weight",)}[wanted]
    for name, actual in zip(names, grads(output, grad_output, leaves)):
        assert_parity(f"grad_{name}", actual, expected[name], dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_stale_scratch_contents_do_not_leak(dtype, backward_strategy):
    """The stack's zero gaps are rewritten on every call, whatever the reused buffer held before."""
    case = flat_case("3x3_pad1", padding=1, batch=2, size=(6, 5))
    input, weight, bias = make_inputs(case, dtype, "cpu", seed=9)
    exact_leaves = [leaf.detach().double().requires_grad_(True) for leaf in (input, weight, bias)]
    exact = torch_conv(case, *exact_leaves)
    grad_output = torch.randn(exact.shape, generator=seeded(10), dtype=torch.float64)
    expected = grads(exact, grad_output, exact_leaves)
    our_conv(case, input, weight, bias, "depthwise")  # make sure the buffers exist
    for buffer in getattr(workspace._local, "buffers", {}).values():
        buffer.fill_(255)  # all-ones bytes: NaN in float32 and float64
    output = our_conv(case, input, weight, bias, "depthwise")
    assert_parity("output", output, exact, dtype)
    for name, actual, wanted in zip(
        ("grad_input", "grad_weight", "grad_bias"), grads(output, grad_output.to(dtype), [input, weight, bias]), expected
    ):
        assert_parity(name, actual, wanted, dtype)


@pytest.mark.parametrize("case", [FLAT_CASES[0], FLAT_CASES[4]], ids=lambda case: case.id)
def test_a_stack_over_the_workspace_limit_takes_the_general_path(case, restore_limits, monkeypatch):
    """The stack grows with the vertical padding and the kernel's width; past the workspace limit
    (CONV_WORKSPACE_BYTES) the flat path steps aside for the general one, which copies nothing."""
    monkeypatch.setattr(depthwise, "ONE_VIEW_MAX_BYTES", 0)
    kernels.set_limits(im2col_workspace_bytes=64)
    input, weight, bias = make_inputs(case, torch.float64, "cpu", seed=13)
    spec = normalize(input, weight, bias, case.stride, case.padding, case.dilation, case.groups, case.padding_mode)
    with torch.no_grad():
        assert depthwise._flat_forward(input, weight, bias, spec) is None
        grad = torch.ones(spec.output_size(*input.shape[2:], *weight.shape[2:]), dtype=input.dtype).expand(
            input.shape[0], input.shape[1], -1, -1
        )
        assert depthwise._flat_backward(grad.contiguous(), input, weight, spec, True, True) is None
    output = our_conv(case, input, weight, bias, "depthwise")
    exact_leaves = [leaf.detach().requires_grad_(True) for leaf in (input, weight, bias)]
    exact = torch_conv(case, *exact_leaves)
    assert_parity("output", output, exact, torch.float64)
    grad_output = torch.randn(exact.shape, generator=seeded(14), dtype=torch.float64)
    for name, actual, wanted in zip(GRAD_NAMES, grads(output, grad_output, [input, weight, bias]), grads(exact, grad_output, exact_leaves)):
        assert_parity(name, actual, wanted, torch.float64)


def test_big_masks_are_built_per_call_not_kept(monkeypatch):
    """Masks past MASK_CACHE_MAX_ELEMENTS are not cached (a wide kernel on a big image could pin hundreds of MB)."""
    monkeypatch.setattr(depthwise, "MASK_CACHE_MAX_ELEMENTS", 0)
    depthwise._cached_masks.cache_clear()
    case = FLAT_CASES[0]
    input, weight, bias = make_inputs(case, torch.float64, "cpu", seed=15)
    output = our_conv(case, input, weight, bias, "depthwise")
    assert depthwise._cached_masks.cache_info().currsize == 0
    assert_parity("output", output, torch_conv(case, *(leaf.detach() for leaf in (input, weight, bias))), torch.float64)
