"""Work an algorithm does beyond the MACs it is asked for is bounded before it starts.

MAC and element limits count the arithmetic of the output; they do not count Python loop iterations
(one per kernel tap, group or stride phase in some algorithms) nor shifted_gemm's "wide" rows over
the padding. Each algorithm states an upper bound on its loop iterations (`loop_iterations`), checked
in `accept` against the `loop_iterations` limit; shifted_gemm refuses problems that are mostly padding.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import shifted_gemm
from kernels import unfold as unfold_module
from kernels.params import normalize
from kernels.selection import choose
from kernels.tolerances import tolerance
from tests.kernels.op_spy import OpSpy


def _check(actual: torch.Tensor, expected: torch.Tensor) -> None:
    atol, rtol = tolerance(torch.float64)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


def _parity(input_shape, weight_shape, algorithm: str, **conv) -> None:
    """Output and both gradients of `algorithm` against F.conv2d, float64."""
    generator = torch.Generator().manual_seed(0)
    input = torch.randn(input_shape, dtype=torch.float64, generator=generator, requires_grad=True)
    weight = torch.randn(weight_shape, dtype=torch.float64, generator=generator, requires_grad=True)
    ours = kernels.conv2d(input, weight, algorithm=algorithm, **conv)
    theirs = F.conv2d(input, weight, **conv)
    _check(ours, theirs)
    grad = torch.randn(theirs.shape, dtype=torch.float64, generator=generator)
    for mine, oracle in zip(torch.autograd.grad(ours, (input, weight), grad), torch.autograd.grad(theirs, (input, weight), grad)):
        _check(mine, oracle)


def _refuses_at_once(algorithm: str, input_shape, weight_shape, error: type[Exception], match: str, **conv) -> None:
    input, weight = torch.zeros(input_shape), torch.zeros(weight_shape)
    started = time.perf_counter()
    with pytest.raises(error, match=match):
        kernels.conv2d(input, weight, algorithm=algorithm, **conv)
    assert time.perf_counter() - started < 1.0, "the refusal must come before any work"


# A depthwise 129x129 kernel: 16,641 taps, one loop iteration each in depthwise and im2col. Before the
# bound, a 1x65536 kernel took im2col 2.9 s for 131K MACs, and a 2-phase stride of 1000 took its
# phase split 10 s for 64 MACs.
BIG_KERNEL = dict(input_shape=(1, 2, 129, 129), weight_shape=(2, 1, 129, 129), groups=2)


@pytest.mark.parametrize(("algorithm", "iterations"), [("depthwise", "16,641"), ("im2col", "16,641"), ("reference", "33,282")])
def test_too_many_taps_is_refused_before_any_work(algorithm, iterations):
    assert kernels.get_limits().loop_iterations == 16384
    _refuses_at_once(
        algorithm, BIG_KERNEL["input_shape"], BIG_KERNEL["weight_shape"], kernels.WorkTooLarge, f"{iterations} Python loop", groups=2
    )


def test_auto_runs_the_big_kernel_on_an_algorithm_that_does_not_loop_over_taps():
    # unfold: one F.unfold and one matmul, whatever the kernel.
    _parity(BIG_KERNEL["input_shape"], BIG_KERNEL["weight_shape"], "auto", groups=2)


def test_too_many_groups_is_refused_by_the_algorithms_that_loop_over_them():
    # 1x1, 20,000 groups: pointwise loops once per group (and image), shifted_gemm once per group and tap.
    for algorithm in ("pointwise", "shifted_gemm"):
        _refuses_at_once(algorithm, (1, 20000, 2, 2), (20000, 1, 1, 1), kernels.WorkTooLarge, "Python loop", groups=20000)
    _parity((1, 20000, 2, 2), (20000, 1, 1, 1), "auto", groups=20000)


def test_a_stride_far_past_the_kernel_gathers_only_the_phases_it_reads():
    # im2col's phase split used to loop over all stride_h * stride_w phases: 10 s here, for 64 MACs.
    input = torch.zeros(1, 1, 2000, 2000)
    weight = torch.zeros(4, 1, 2, 2)
    started = time.perf_counter()
    kernels.conv2d(input, weight, stride=1000, algorithm="im2col")
    assert time.perf_counter() - started < 1.0
    _parity((1, 1, 45, 45), (3, 1, 2, 3), "im2col", stride=(20, 7), padding=1)


def test_auto_falls_back_to_any_algorithm_that_accepts(restore_limits):
    """With the speed-preferred algorithms refusing, auto still runs what some algorithm can run."""
    kernels.set_limits(loop_iterations=8)  # depthwise and im2col loop over the 9 taps
    input, weight = torch.zeros(4, 8, 32, 32), torch.zeros(8, 1, 3, 3)  # 295K MACs: past unfold's "small" cut
    spec = normalize(input, weight, None, 1, 1, 1, 8, "zeros")
    assert choose(input, weight, spec).name == "unfold"
    _parity((4, 8, 32, 32), (8, 1, 3, 3), "auto", padding=1, groups=8)


def test_auto_says_too_large_when_every_algorithm_refuses(monkeypatch, restore_limits):
    kernels.set_limits(loop_iterations=8)
    monkeypatch.setattr(unfold_module, "MAX_PATCH_BYTES", 1024)
    with pytest.raises(kernels.WorkTooLarge, match="no algorithm runs this problem.*Python loop"):
        kernels.conv2d(torch.zeros(4, 8, 32, 32), torch.zeros(8, 1, 3, 3), padding=1, groups=8)


# (id, input shape, weight shape, conv arguments): each grows one thing an algorithm may loop over.
GROWING = [
    ("taps", (1, 2, 24, 24), (2, 1, 9, 9), dict(groups=2, padding=4)),
    ("depthwise-groups", (1, 64, 6, 6), (64, 1, 3, 3), dict(groups=64, padding=1)),
    ("groups", (1, 64, 6, 6), (64, 2, 3, 3), dict(groups=32, padding=1)),
    ("multiplier", (1, 4, 6, 6), (32, 1, 3, 3), dict(groups=4, padding=1)),
    ("stride", (1, 3, 128, 128), (4, 3, 2, 2), dict(stride=32)),
    ("batch", (512, 4, 3, 3), (4, 4, 1, 1), dict()),
    ("groups-1x1", (1, 512, 6, 6), (512, 2, 1, 1), dict(groups=256)),
    ("channels-3x3", (2, 64, 12, 12), (64, 64, 3, 3), dict(padding=1)),
]
# aten ops (views and slices included) per loop iteration, and those of the fixed part of a pass:
# reference's einsum dispatches ~60 ops per tap, winograd's transforms ~600 per pass.
OPS_PER_ITERATION = 72
FIXED_OPS = 1000


def _spec(input_shape, weight_shape, conv):
    input, weight = torch.empty(input_shape, dtype=torch.float64), torch.empty(weight_shape, dtype=torch.float64)
    return input, weight, normalize(input, weight, None, conv.get("stride", 1), conv.get("padding", 0), 1, conv.get("groups", 1), "zeros")


def _accepts(algorithm: str, input_shape, weight_shape, conv) -> bool:
    try:
        kernels.get(algorithm).check(*_spec(input_shape, weight_shape, conv))
    except kernels.UnsupportedProblem:
        return False
    return True


# Only the pairs the algorithm runs (a refused pair is not a test).
BOUND_CASES = [
    pytest.param(algorithm, *problem, id=f"{algorithm}-{name}")
    for algorithm in ("depthwise", "im2col", "pointwise", "shifted_gemm", "winograd", "unfold", "reference")
    for name, *problem in GROWING
    if _accepts(algorithm, *problem)
]


@pytest.mark.parametrize(("algorithm", "input_shape", "weight_shape", "conv"), BOUND_CASES)
def test_loop_iterations_bound_the_ops_a_pass_runs(algorithm, input_shape, weight_shape, conv):
    """A forward+backward never runs more aten ops than its stated loop bound allows.

    Each problem makes one loop dimension large; an algorithm that loops over something its
    `loop_iterations` does not count runs far more ops than the bound (the old stride-phase split
    ran 1,024 phase copies, ~8,000 ops, on the "stride" problem, where im2col's bound is 10 iterations).
    """
    bound = kernels.get(algorithm).loop_iterations(*_spec(input_shape, weight_shape, conv))
    input = torch.randn(input_shape, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(weight_shape, dtype=torch.float64, requires_grad=True)
    with OpSpy() as spy:
        output = kernels.conv2d(input, weight, algorithm=algorithm, **conv)
        output.backward(torch.ones_like(output))
    assert len(spy.ops) <= OPS_PER_ITERATION * bound + FIXED_OPS, f"{len(spy.ops)} ops for a bound of {bound} iterations"


def test_every_looping_algorithm_has_a_growing_problem():
    covered = {values.values[0] for values in BOUND_CASES}
    assert {"depthwise", "im2col", "pointwise", "shifted_gemm", "reference"} <= covered


def test_shifted_gemm_refuses_a_problem_that_is_mostly_padding():
    # A 1x2 kernel dilated 8000 on a 4096x1 image: 8001 wide rows per output row, 8 GB of them.
    _refuses_at_once(
        "shifted_gemm", (1, 1, 4096, 1), (64, 1, 1, 2), kernels.UnsupportedProblem, "8,001.0x", padding=(0, 4000), dilation=(1, 8000)
    )
    assert shifted_gemm.MAX_WASTE * 16 >= 36, "a 3x3 'same' conv on 4x4 images (36 padded positions for 16) must still run"
    _parity((2, 8, 4, 4), (8, 8, 3, 3), "shifted_gemm", padding=1)


def test_shifted_gemm_still_runs_small_problems_whatever_their_padding():
    # 1*15*15*(2*3*3*3) = 12K wide MACs: under SMALL_WIDE_MACS, so the 225/1 waste is allowed.
    _parity((1, 3, 5, 5), (2, 3, 3, 3), "shifted_gemm", padding=5, dilation=6)


def test_auto_never_sends_shifted_gemm_what_it_refuses():
    input, weight = torch.zeros(1, 1, 4096, 1), torch.zeros(64, 1, 1, 2)
    spec = normalize(input, weight, None, 1, (0, 4000), (1, 8000), 1, "zeros")
    assert choose(input, weight, spec).name != "shifted_gemm"
    _parity((1, 1, 64, 1), (4, 1, 1, 2), "auto", padding=(0, 40), dilation=(1, 80))
