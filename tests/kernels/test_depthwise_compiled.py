"""The depthwise algorithm's compiled path (kernels/depthwise_compiled.py, through kernels/compiled.py).

Each case is compiled for real ("sync" mode: on the test's thread) and checked against the float64
oracle, output and every gradient, with the compiled code shown to have run (no eager fallback). The
cases are small (the size floor MIN_MACS is lifted): a compile costs seconds whatever the size.
"""

from __future__ import annotations

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from kernels import compiled, depthwise_compiled
from kernels.params import normalize
from tests.kernels.cases import (
    Case,
    assert_compiled_ran,
    assert_matches_oracle,
    assert_parity,
    grads,
    make_inputs,
    our_conv,
    seeded,
    torch_conv,
)
from tests.kernels.op_spy import forbidden


def depthwise_case(name: str, channels: int = 3, **kwargs) -> Case:
    return Case(name, in_channels=channels, out_channels=channels, groups=channels, **kwargs)


CASES = [
    depthwise_case("3x3_pad1", padding=1, batch=3, size=(7, 9)),
    depthwise_case("5x5_dilated_asymmetric", kernel_size=(5, 3), padding=(3, 1), dilation=(2, 1), size=(11, 6), bias=False),
    depthwise_case("even_same", kernel_size=(2, 4), padding="same", size=(6, 7)),
    depthwise_case("valid", padding=0, channels=2, batch=1, size=(5, 8)),
    # channels-last inputs run their own channels-last code (NHWC padded copies, taps (kH, kW, C), NHWC results)
    depthwise_case("3x3_pad1_channels_last", padding=1, batch=3, size=(7, 9), layout="channels_last"),
    depthwise_case(
        "dilated_channels_last", channels=5, kernel_size=(3, 5), padding=(2, 3), dilation=(1, 2), size=(6, 9), layout="channels_last"
    ),
]


@pytest.fixture
def compile_sync(compile_sync, monkeypatch):
    """The package's compile_sync, for problems of any size."""
    monkeypatch.setattr(depthwise_compiled, "MIN_MACS", 0)


def _spec(case: Case, input, weight, bias):
    return normalize(input, weight, bias, case.stride, case.padding, case.dilation, case.groups, case.padding_mode)


# float32 on the first NCHW and channels-last cases only: each case compiles for seconds.
@pytest.mark.parametrize(
    ("case", "dtype"),
    [*((case, torch.float64) for case in CASES), (CASES[0], torch.float32), (CASES[4], torch.float32)],
    ids=lambda value: getattr(value, "id", str(value)),
)
def test_compiled_path_matches_the_oracle(case, dtype, compile_sync):
    input, weight, bias = make_inputs(case, dtype, "cpu", seed=3)
    with torch.no_grad():
        assert depthwise_compiled.eligible(input, weight, _spec(case, input, weight, bias)), f"{case.id} is not eligible"
    before = compiled.stats()
    assert_matches_oracle(case, "depthwise", dtype, seed=3)
    assert_compiled_ran(before)


@pytest.mark.parametrize("case", [CASES[0], CASES[4]], ids=lambda case: case.id)
@pytest.mark.parametrize("wanted", ["input", "weight"])
def test_one_gradient_alone(wanted, case, compile_sync):
    """Backward compiled for one gradient (autograd asks only for what requires grad), NCHW and channels-last."""
    input, weight, _ = make_inputs(case, torch.float64, "cpu", seed=5)
    input, weight = input.detach().requires_grad_(wanted == "input"), weight.detach().requires_grad_(wanted == "weight")
    leaf = input if wanted == "input" else weight
    before = compiled.stats()
    output = our_conv(case, input, weight, None, "depthwise")
    exact_leaves = [tensor.detach().requires_grad_(True) for tensor in (input, weight)]
    exact = torch_conv(case, *exact_leaves, None)
    grad_output = torch.randn(exact.shape, generator=seeded(6), dtype=torch.float64)
    expected = grads(exact, grad_output, exact_leaves)[0 if wanted == "input" else 1]
    assert_parity(f"grad_{wanted}", grads(output, grad_output, [leaf])[0], expected, torch.float64)
    assert_compiled_ran(before)


def test_under_inference_mode_as_the_service_calls_it(compile_sync):
    """The service's /forward runs under torch.inference_mode: padded inputs are inference tensors there."""
    case = CASES[0]
    input, weight, bias = make_inputs(case, torch.float64, "cpu", seed=7)
    before = compiled.stats()
    with torch.inference_mode():
        output = our_conv(case, input, weight, bias, "depthwise")
        again = our_conv(case, input, weight, bias, "depthwise")
    assert_parity("output", output, torch_conv(case, input, weight, bias), torch.float64)
    assert torch.equal(output, again)
    assert_compiled_ran(before)


def test_the_compiled_graphs_hold_no_conv_op():
    """What Inductor is given for forward and backward, NCHW and channels-last: aten ops with no convolution among them."""
    padded, taps, bias, grad = torch.randn(2, 3, 8, 9), torch.randn(3, 3, 3), torch.randn(3), torch.randn(2, 3, 6, 7)
    padded_grad = torch.randn(2, 3, 10, 11)
    nhwc = [tensor.permute(0, 2, 3, 1).contiguous() for tensor in (padded, grad, padded_grad)]
    graphs = {
        "forward": make_fx(depthwise_compiled._forward)(padded, taps, bias, 1, 1, 0),
        "backward": make_fx(depthwise_compiled._backward)(padded_grad, taps, padded, grad, 1, 1, 0),
        "channels-last forward": make_fx(depthwise_compiled._forward)(nhwc[0], taps, bias, 1, 1, 1),
        "channels-last backward": make_fx(depthwise_compiled._backward)(nhwc[2], taps, nhwc[0], nhwc[1], 1, 1, 1),
    }
    for name, graph in graphs.items():
        ops = [str(node.target) for node in graph.graph.nodes if node.op == "call_function"]
        assert any("mul" in op for op in ops), f"{name}: no multiply traced ({ops})"
        assert not forbidden(ops), f"{name} holds torch conv ops: {forbidden(ops)}"


@pytest.mark.parametrize(
    ("case", "why"),
    [
        (depthwise_case("strided", padding=1, stride=2, size=(8, 8)), "stride 2"),
        (Case("multiplier", in_channels=3, out_channels=6, groups=3, padding=1), "channel multiplier 2"),
        (depthwise_case("noncontiguous", padding=1, layout="noncontiguous"), "a strided view, neither NCHW nor channels-last"),
        (depthwise_case("padding_past_the_kernel", padding=3), "padding beyond the kernel's reach"),
    ],
    ids=lambda value: value if isinstance(value, str) else value.id,
)
def test_problems_the_compiled_path_leaves_to_the_eager_one(case, why, compile_sync):
    input, weight, bias = make_inputs(case, torch.float64, "cpu", seed=8)
    with torch.no_grad():
        assert not depthwise_compiled.eligible(input, weight, _spec(case, input, weight, bias)), why
    output = our_conv(case, input, weight, bias, "depthwise")
    assert_parity("output", output, torch_conv(case, input, weight, bias), torch.float64)
    assert compiled.stats()["compiled"] == 0


def test_small_problems_stay_eager(compile_sync, monkeypatch):
    monkeypatch.setattr(depthwise_compiled, "MIN_MACS", 1 << 18)
    case = CASES[0]  # 3 x 3 x 7 x 9 x 9 taps: ~5K MACs
    input, weight, bias = make_inputs(case, torch.float64, "cpu", seed=9)
    with torch.no_grad():
        assert not depthwise_compiled.eligible(input, weight, _spec(case, input, weight, bias))


@pytest.mark.parametrize("mode", ["off", "background"])
def test_no_padded_copy_unless_compiled_code_runs(mode, monkeypatch):
    """Compiling off, or this problem's code not compiled yet (queued, never started here): forward and backward
    return None having copied nothing, so the eager path that follows pays for its own work only."""
    monkeypatch.setattr(compiled, "_state", compiled._State())  # empty, and its queue is never worked
    monkeypatch.setattr(compiled, "_start_worker", lambda: None)
    monkeypatch.setattr(depthwise_compiled, "MIN_MACS", 0)
    pads = []
    real_pad = torch.nn.functional.pad
    monkeypatch.setattr(torch.nn.functional, "pad", lambda *args, **kwargs: pads.append(args[1]) or real_pad(*args, **kwargs))
    x, w, g = torch.randn(2, 4, 9, 9), torch.randn(4, 1, 3, 3), torch.randn(2, 4, 9, 9)
    spec = normalize(x, w, None, 1, 1, 1, 4, "zeros")
    with compiled.mode(mode), torch.no_grad():
        assert depthwise_compiled.eligible(x, w, spec)
        assert depthwise_compiled.forward(x, w, None, spec) is None
        assert depthwise_compiled.backward(g, x, w, spec, True, True) is None
        assert compiled.stats()["pending"] == (2 if mode == "background" else 0)  # both passes queued
    assert pads == []


@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[4]], ids=lambda case: case.id)
def test_backward_reuses_the_forwards_padded_input(case, compile_sync, monkeypatch, restore_limits):
    """Under autograd the compiled forward keeps its zero-padded input and the backward's grad_weight sums read it
    (padded once per forward+backward, not twice; twice past `kept_for_backward_bytes`), against the oracle."""
    import kernels

    handed = []
    real = depthwise_compiled.backward
    monkeypatch.setattr(depthwise_compiled, "backward", lambda *args: handed.append(args[-1] is not None) or real(*args))
    assert_matches_oracle(case, "depthwise", torch.float64, seed=89)  # compiles: the first pass runs eager
    handed.clear()
    assert_matches_oracle(case, "depthwise", torch.float64, seed=97)
    assert handed == [True]
    kernels.set_limits(kept_for_backward_bytes=1)
    handed.clear()
    assert_matches_oracle(case, "depthwise", torch.float64, seed=101)
    assert handed == [False]
