"""kernels/gemm.py: each GEMM backend gives torch's products, and the algorithms built on it keep parity with
F.conv2d on each, whichever one this machine's calibration picks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import compiled, gemm, winograd_compiled
from kernels.tolerances import tolerance
from tests.kernels.cases import force_gemm

ATOL, RTOL = tolerance(torch.float32)


@pytest.fixture(params=["torch", "onednn"])
def backend(request, monkeypatch) -> list[int]:
    """Forces a backend for the test; through oneDNN every float32 product qualifies (no size floors), and the list
    the fixture returns counts oneDNN's calls, so a test can tell which backend ran."""
    force_gemm(monkeypatch, request.param)
    calls: list[int] = []
    if request.param == "onednn":
        monkeypatch.setattr(gemm, "MIN_MACS", 0)
        monkeypatch.setattr(gemm, "COPY_MIN_COLUMNS", 0)  # strided left operands too (copied to row-major)
        real = gemm._onednn_linear

        def counted(*args):
            calls.append(1)
            return real(*args)

        monkeypatch.setattr(gemm, "_onednn_linear", counted)
    return calls


def _expected_calls(backend: list[int]) -> None:
    """oneDNN ran when forced, and never when torch's backend was."""
    forced = gemm._state.setting
    assert (len(backend) > 0) == (forced == "onednn"), f"{len(backend)} oneDNN calls under backend {forced!r}"


def test_products_match_torch(backend):
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(37, 19, generator=generator)
    b = torch.randn(23, 19, generator=generator).t()  # (19, 23), a transposed view
    bias = torch.randn(23, generator=generator)
    torch.testing.assert_close(gemm.mm(a, b), a @ b, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(gemm.mm(a, b, bias=bias), torch.addmm(bias, a, b), atol=ATOL, rtol=RTOL)
    wide = torch.zeros(37, 30)
    gemm.mm(a, b, out=wide[:, 3:26])  # into a strided view
    torch.testing.assert_close(wide[:, 3:26], a @ b, atol=ATOL, rtol=RTOL)
    assert wide[:, :3].eq(0).all() and wide[:, 26:].eq(0).all()

    batch_a = torch.randn(4, 11, 19, generator=generator)
    batch_b = torch.randn(4, 19, 13, generator=generator)
    torch.testing.assert_close(gemm.bmm(batch_a, batch_b), torch.bmm(batch_a, batch_b), atol=ATOL, rtol=RTOL)
    shared = a[:11].expand(4, -1, -1)  # one matrix against a batch (stride 0)
    out = torch.empty(4, 11, 20)[:, :, :13]
    gemm.bmm(shared, batch_b, out=out)
    torch.testing.assert_close(out, torch.bmm(shared, batch_b), atol=ATOL, rtol=RTOL)
    terms = [(torch.randn(37, k, generator=generator), torch.randn(23, k, generator=generator).t()) for k in (19, 5, 19)]
    expected = bias + sum(x @ y for x, y in terms)
    torch.testing.assert_close(gemm.sum_of_products(terms, bias=bias), expected, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(gemm.sum_of_products(terms[:1]), terms[0][0] @ terms[0][1], atol=ATOL, rtol=RTOL)
    pieces = gemm.products(batch_a, batch_b)
    assert len(pieces) == 4 and all(piece.is_contiguous() for piece in pieces)
    torch.testing.assert_close(torch.stack(pieces), torch.bmm(batch_a, batch_b), atol=ATOL, rtol=RTOL)
    _expected_calls(backend)


def test_float64_and_autograd_stay_on_torch(backend):
    """float64 (oneDNN's matmul is float32 only) and recorded products (its op has no autograd formula) use torch."""
    generator = torch.Generator().manual_seed(1)
    a64, b64 = torch.randn(8, 5, dtype=torch.float64, generator=generator), torch.randn(5, 6, dtype=torch.float64, generator=generator)
    assert torch.equal(gemm.mm(a64, b64), a64 @ b64)
    a = torch.randn(8, 5, generator=generator, requires_grad=True)
    b = torch.randn(5, 6, generator=generator)
    gemm.mm(a, b).sum().backward()
    torch.testing.assert_close(a.grad, b.sum(dim=1).expand(8, -1), atol=ATOL, rtol=RTOL)
    batched = torch.func.vmap(lambda row: gemm.mm(row.unsqueeze(0), b))(a.detach())
    torch.testing.assert_close(batched.squeeze(1), a.detach() @ b, atol=ATOL, rtol=RTOL)
    assert backend == []


# (algorithm, input shape, weight shape, stride, padding, groups, channels_last): each algorithm's GEMM sites
# in forward and backward, NCHW and channels-last, with and without groups.
CASES = [
    ("winograd", (2, 8, 10, 10), (6, 8, 3, 3), 1, 1, 1, False),
    ("winograd", (2, 8, 30, 26), (6, 8, 3, 3), 1, 1, 1, False),  # the NCHW eager path (24 and up); compiled, channels-last
    ("winograd", (2, 8, 10, 10), (6, 8, 3, 3), 1, 1, 1, True),
    ("im2col", (2, 6, 11, 9), (5, 6, 3, 3), 2, 1, 1, False),
    ("im2col", (2, 3, 17, 17), (8, 3, 7, 7), 2, 3, 1, False),  # the stem's stride-phase gather
    ("im2col", (2, 6, 11, 9), (6, 3, 3, 3), 1, 1, 2, True),
    # stride 1 with >= FOLD_MAX_CHANNELS input channels: grad_input as the flipped-kernel forward
    ("im2col", (2, 40, 9, 7), (36, 40, 3, 3), 1, 1, 1, False),
    ("im2col", (2, 40, 9, 7), (36, 40, 5, 3), 1, 0, 1, True),
    ("unfold", (2, 6, 7, 5), (4, 6, 3, 3), 1, 1, 1, False),
    ("unfold", (2, 6, 9, 9), (4, 6, 3, 3), 2, 0, 1, True),
    ("shifted_gemm", (2, 8, 10, 9), (6, 8, 3, 3), 1, 1, 1, False),
    ("shifted_gemm", (2, 8, 10, 9), (6, 4, 3, 2), 1, (2, 0), 2, True),
    ("pointwise", (2, 8, 7, 9), (5, 8, 1, 1), 1, 0, 1, False),
    ("pointwise", (2, 8, 7, 9), (6, 4, 1, 1), 2, 0, 2, True),
]


@pytest.mark.parametrize("compile_mode", ["off", "sync"])
@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{'x'.join(map(str, c[1]))}-g{c[5]}{'-cl' if c[6] else ''}" for c in CASES])
def test_algorithms_keep_parity(backend, case, compile_mode):
    """Forward, grad_input and grad_weight in float32 against F.conv2d in float64, with a bias."""
    if compile_mode == "sync" and case[0] != "winograd":
        pytest.skip("only winograd's CPU path has compiled stages with GEMMs between them")
    _assert_parity(backend, case, compile_mode)


def test_compiled_winograd_channel_major_keeps_parity(backend, monkeypatch):
    """The compiled channel-major Winograd (NCHW images from winograd_compiled.NCHW_MIN_SIZE), its stages shown to run.

    The cut is lowered to 8 for this small case: from 32x32 grad_weight sums 1,000 terms, and unit-scale data put
    Winograd's float32 rounding there at ~2x the tolerance row (nn.Conv2d's at 0.7x): a fact of float32, not of a path."""
    monkeypatch.setattr(winograd_compiled, "NCHW_MIN_SIZE", 8)
    stages = []
    real = compiled.run
    monkeypatch.setattr(compiled, "run", lambda function, *args: stages.append(function) or real(function, *args))
    _assert_parity(backend, CASES[0], "sync")
    assert winograd_compiled._input_tiles in stages and winograd_compiled._input_tiles_nhwc not in stages


def _assert_parity(backend: list[int], case: tuple, compile_mode: str) -> None:
    name, input_shape, weight_shape, stride, padding, groups, channels_last = case
    generator = torch.Generator().manual_seed(2)
    input = torch.randn(input_shape, generator=generator)
    if channels_last:
        input = input.contiguous(memory_format=torch.channels_last)
    # Weights scaled by 1/sqrt(fan-in), as layers are initialised: unit-scale ones over 600 terms would put float32's own
    # rounding past the float32 tolerance row, nn.Conv2d's included (docs/performance.md, round 6)
    fan_in = weight_shape[1] * weight_shape[2] * weight_shape[3]
    weight = torch.randn(weight_shape, generator=generator) / fan_in**0.5
    bias = torch.randn(weight_shape[0], generator=generator)
    leaves = [tensor.clone().requires_grad_() for tensor in (input, weight, bias)]
    with compiled.mode(compile_mode):
        ours = kernels.conv2d(*leaves, stride=stride, padding=padding, groups=groups, algorithm=name)
        grad_output = torch.randn(ours.shape, generator=generator)
        ours.backward(grad_output)
        with torch.no_grad():
            inference = kernels.conv2d(input, weight, bias, stride=stride, padding=padding, groups=groups, algorithm=name)
    oracle = [tensor.double().requires_grad_() for tensor in (input, weight, bias)]
    expected = F.conv2d(*oracle, stride=stride, padding=padding, groups=groups)
    expected.backward(grad_output.double())
    for got, want in [(ours, expected), (inference, expected), *((leaf.grad, ref.grad) for leaf, ref in zip(leaves, oracle))]:
        torch.testing.assert_close(got.double(), want.detach(), atol=ATOL, rtol=RTOL)
    _expected_calls(backend)


def test_backend_choice():
    with pytest.raises(ValueError, match="GEMM backend must be one of"):
        gemm.set_backend("mkl")
    assert gemm.backend() in ("onednn", "torch")
    if gemm._onednn_available():
        assert gemm._calibrate() in ("onednn", "torch")


@pytest.mark.skipif(not gemm._onednn_available(), reason="this torch has no oneDNN matmul op")
def test_calibration_keeps_the_fastest_time_of_each_backend():
    """Other work on the host only adds time: oneDNN, twice as fast when undisturbed but slowed in most rounds, is kept
    (a median would have picked torch's matmul), and torch's matmul wins where it is the faster one undisturbed."""

    def clock_for(onednn: list[float], torch_times: list[float]):
        durations = [d for pair in zip(onednn, torch_times) for d in pair]  # the rounds interleave the two
        ticks = iter([t for d in durations for t in (0.0, d)])  # each timing reads the clock before and after
        return lambda: next(ticks)

    rounds = gemm.CALIBRATION_ROUNDS + 1
    disturbed = [9.0] + [3.0] * (rounds - 6) + [1.0] * 5  # a warm-up call, then mostly slowed rounds
    assert gemm._calibrate(clock_for(disturbed, [2.0] * rounds)) == "onednn"
    assert gemm._calibrate(clock_for([2.0] * rounds, disturbed)) == "torch"
    assert gemm._calibrate(clock_for([1.0] * rounds, [1.1] * rounds)) == "torch"  # within ONEDNN_MARGIN: torch's stays
