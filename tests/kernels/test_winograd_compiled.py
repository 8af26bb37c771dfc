"""The winograd algorithm with its tile transforms compiled (kernels/winograd_compiled.py).

Compiled for real ("sync" mode), checked against the float64 oracle, output and every gradient, with
the compiled code shown to have run. Small problems: a compile costs seconds whatever the size.
"""

from __future__ import annotations

import pytest
import torch

import kernels
from kernels import compiled, winograd_compiled
from kernels.params import normalize
from kernels.selection import choose
from tests.kernels.cases import (
    GRAD_NAMES,
    Case,
    assert_compiled_ran,
    assert_matches_oracle,
    assert_parity,
    force_gemm,
    make_inputs,
    torch_conv,
)

# NCHW images from winograd_compiled.NCHW_MIN_SIZE (32) run channel-major; smaller ones, and channels-last input, run channels-last
# (NHWC grid, (P, C) tiles, NHWC output). A compile costs seconds whatever the size, the arithmetic here nothing.
CASES = [
    Case("pad1_even", in_channels=3, out_channels=4, padding=1, batch=2, size=(32, 34)),
    Case("odd_output_cropped", in_channels=2, out_channels=3, padding=1, batch=1, size=(33, 35), bias=False),
    Case("valid_asymmetric", in_channels=3, out_channels=2, padding=(2, 0), size=(32, 35)),
    # padding 3 > 2: grad_input's padding (2 - 3) would be negative, so it stays eager; forward compiles
    Case("padding_past_two", in_channels=2, out_channels=2, padding=(3, 1), batch=1, size=(32, 33)),
    Case("channels_last", in_channels=3, out_channels=5, padding=1, batch=2, size=(8, 6), layout="channels_last"),
    Case("channels_last_cropped", in_channels=4, out_channels=3, padding=(0, 2), batch=1, size=(9, 5), layout="channels_last"),
    Case("small_nchw", in_channels=3, out_channels=4, padding=1, batch=2, size=(6, 9)),
]


def _problem(case: Case, seed: int):
    """(input, weight, bias, spec, a random grad_output) of `case` in float64."""
    input, weight, bias = make_inputs(case, torch.float64, "cpu", seed=seed)
    spec = normalize(input, weight, bias, case.stride, case.padding, case.dilation, case.groups, case.padding_mode)
    grad = torch.randn(input.shape[0], weight.shape[0], *spec.output_size(*input.shape[2:], 3, 3), dtype=torch.float64)
    return input, weight, bias, spec, grad


def _compiled_forward(case: Case, seed: int):
    """(input, weight, bias, output) of `case` in float64 through winograd under autograd, after a first call that
    compiles its transforms (and runs eager)."""
    input, weight, bias = make_inputs(case, torch.float64, "cpu", seed=seed)
    kernels.conv2d(input, weight, bias, padding=case.padding, algorithm="winograd")
    return input, weight, bias, kernels.conv2d(input, weight, bias, padding=case.padding, algorithm="winograd")


@pytest.mark.parametrize(
    ("case", "dtype"),
    [*((case, torch.float64) for case in CASES), (CASES[0], torch.float32), (CASES[4], torch.float32), (CASES[6], torch.float32)],
    ids=lambda value: getattr(value, "id", str(value)),
)
def test_compiled_transforms_match_the_oracle(case, dtype, compile_sync):
    before = compiled.stats()
    assert_matches_oracle(case, "winograd", dtype, seed=21)
    assert_compiled_ran(before)


def test_grad_input_compiles_only_within_its_padding(compile_sync):
    """grad_input is the forward on grad_output padded by 2 - padding: none for padding 3."""
    case = CASES[3]
    input, weight, bias, spec, grad = _problem(case, seed=23)
    with torch.no_grad():
        assert winograd_compiled.grad_input(grad, weight, spec) is None
        assert winograd_compiled.forward(input, weight, bias, spec.padding) is not None


@pytest.mark.parametrize(("backend", "choices"), [("torch", ("shifted_gemm", "winograd")), ("onednn", ("winograd_rows", "winograd_rows"))])
def test_auto_between_winograd_and_shifted_gemm(backend, choices, restore_threads, monkeypatch):
    """64 channels at 56x56, batch 4, from 2 threads (eager, then where Winograd's transforms compile): with torch's
    GEMMs shifted_gemm eagerly and winograd where it compiles; with oneDNN's (kernels/gemm.py) winograd_rows either
    way, its shifted GEMMs summed in oneDNN's epilogue beating even compiled Winograd there (kernels/selection.py)."""
    force_gemm(monkeypatch, backend)
    torch.set_num_threads(2)
    input, weight = torch.empty(4, 64, 56, 56), torch.empty(64, 64, 3, 3)
    spec = normalize(input, weight, None, 1, 1, 1, 1, "zeros")
    for mode, expected in zip(("off", "background"), choices):
        with compiled.mode(mode):
            assert choose(input, weight, spec).name == expected, mode


def test_compiled_grad_weight_comes_in_the_weights_layout(compile_sync):
    """Contiguous (K, C, 3, 3), as autograd accumulates it without a copy (a transposed one cost 0.8 ms at 256x14)."""
    case = CASES[0]
    input, weight, bias, spec, grad = _problem(case, seed=29)
    with torch.no_grad():
        grad_weight = winograd_compiled.grad_weight(grad, input, weight, spec.padding)
    expected = torch.ops.aten.convolution_backward(
        grad, input, weight, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [False, True, False]
    )[1]
    assert grad_weight is not None and grad_weight.is_contiguous()
    torch.testing.assert_close(grad_weight, expected, atol=1e-10, rtol=1e-10)


def test_channels_last_forward_runs_channels_last(compile_sync):
    """A channels-last input gets a channels-last output straight from the compiled transforms (no layout copy where
    the output is whole 2x2 tiles, as here), equal to the NCHW path's."""
    case = CASES[4]
    input, weight, bias = make_inputs(case, torch.float64, "cpu", seed=31)
    assert input.is_contiguous(memory_format=torch.channels_last) and not input.is_contiguous()
    with torch.no_grad():
        output = winograd_compiled.forward(input, weight, bias, (1, 1, 1, 1))
        expected = winograd_compiled.forward(input.contiguous(), weight, bias, (1, 1, 1, 1))
    assert output is not None and output.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(output, expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize(
    ("case", "channels_last"), [(CASES[0], False), (CASES[6], True), (CASES[4], True)], ids=lambda v: getattr(v, "id", str(v))
)
def test_small_nchw_images_run_channels_last(case, channels_last, compile_sync, monkeypatch):
    """The compiled forward's input transform: channel-major for NCHW images from 32x32, channels-last below (where
    oneDNN's faster products with (P, C) tiles pay for the transposing copies) and for channels-last input."""
    stages = []
    real = compiled.run
    monkeypatch.setattr(compiled, "run", lambda function, *args: stages.append(function) or real(function, *args))
    input, weight, bias = make_inputs(case, torch.float64, "cpu", seed=29)
    with torch.no_grad():
        output = winograd_compiled.forward(input, weight, bias, (1, 1, 1, 1))
    assert output is not None
    expected = winograd_compiled._input_tiles_nhwc if channels_last else winograd_compiled._input_tiles
    assert stages[0] is expected, stages
    assert_parity("output", output, torch_conv(case, input, weight, bias), torch.float64)


def _grad_weight_spy(monkeypatch) -> list:
    """Records, per compiled grad_weight call, whether it was handed the forward's tiles."""
    calls = []
    real = winograd_compiled.grad_weight

    def spy(grad_output, input, weight, pads, tiles=None, grad_phases=None):
        calls.append(tiles is not None)
        return real(grad_output, input, weight, pads, tiles, grad_phases)

    monkeypatch.setattr(winograd_compiled, "grad_weight", spy)
    return calls


@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[4], CASES[5], CASES[6]], ids=lambda case: case.id)
def test_grad_weight_reuses_the_forwards_tiles(case, compile_sync, monkeypatch):
    """Under autograd the compiled forward keeps its input tiles V and grad_weight takes them instead of rebuilding
    them (NCHW (16, C, P) and channels-last (16, P, C) alike); every gradient still matches the float64 oracle."""
    calls = _grad_weight_spy(monkeypatch)
    assert_matches_oracle(case, "winograd", torch.float64, seed=37)  # warms up the compiles: the first pass runs eager
    calls.clear()
    assert_matches_oracle(case, "winograd", torch.float64, seed=41)
    assert calls == [True]


def test_tiles_past_the_keep_limit_are_rebuilt(compile_sync, monkeypatch, restore_limits):
    """`Limits.kept_for_backward_bytes` below the tiles' size: nothing is kept, grad_weight rebuilds V, same gradients."""
    calls = _grad_weight_spy(monkeypatch)
    assert_matches_oracle(CASES[0], "winograd", torch.float64, seed=43)
    kernels.set_limits(kept_for_backward_bytes=1)
    calls.clear()
    assert_matches_oracle(CASES[0], "winograd", torch.float64, seed=47)
    assert calls == [False]


def test_a_second_backward_rebuilds_the_tiles(compile_sync, monkeypatch):
    """The kept tiles serve one backward (the graph does not hold them after it); a second one through a retained
    graph rebuilds them and gets the same gradients."""
    case = CASES[0]
    calls = _grad_weight_spy(monkeypatch)
    input, weight, bias, output = _compiled_forward(case, seed=53)
    calls.clear()
    grad_output = torch.randn_like(output)
    first = torch.autograd.grad(output, (input, weight), grad_output, retain_graph=True)
    second = torch.autograd.grad(output, (input, weight), grad_output)
    assert calls == [True, False]
    expected = torch.autograd.grad(torch_conv(case, input, weight, bias), (input, weight), grad_output)
    for name, once, again, wanted in zip(GRAD_NAMES, first, second, expected):
        assert_parity(name, once, wanted, torch.float64)
        assert_parity(name, again, wanted, torch.float64)


def test_a_nonfinite_grad_after_a_finite_forward_runs_exact(compile_sync):
    """The forward found input and weight finite and kept its tiles; the backward still sums the grad, and a NaN or
    an infinity in it sends the backward to im2col, which spreads them as torch does."""
    case = CASES[0]
    input, weight, bias, output = _compiled_forward(case, seed=59)
    grad_output = torch.randn_like(output)
    grad_output[0, 1, 2, 3], grad_output[1, 0, 0, 0] = float("nan"), float("inf")
    actual = torch.autograd.grad(output, (input, weight), grad_output)
    expected = torch.autograd.grad(torch_conv(case, input, weight, bias), (input, weight), grad_output)
    for name, ours, theirs in zip(GRAD_NAMES, actual, expected):
        assert torch.equal(ours.isnan(), theirs.isnan()), f"{name}: NaN in other places than torch's"
        assert torch.equal(ours.isinf(), theirs.isinf()), f"{name}: infinities in other places than torch's"
        finite = theirs.isfinite()
        torch.testing.assert_close(ours[finite], theirs[finite], atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize(
    "case",
    [CASES[0], Case("pad1_odd", in_channels=2, out_channels=3, padding=1, batch=2, size=(33, 35)), CASES[2]],
    ids=lambda case: case.id,
)
def test_grad_weight_reads_grad_inputs_phases_at_padding_one(case, compile_sync, monkeypatch):
    """At padding 1 grad_weight's transform reads the grad's column phases that grad_input built (padded by 1, one row
    and column further on) instead of copying its own: two copies per forward+backward (the input's, the grad's), not
    three; at other paddings three. Every gradient against the float64 oracle."""
    from kernels import winograd

    copies = []
    real = winograd._column_phases
    monkeypatch.setattr(winograd, "_column_phases", lambda *args: copies.append(args[1]) or real(*args))
    assert_matches_oracle(case, "winograd", torch.float64, seed=79)  # compiles: the first pass runs eager
    copies.clear()
    assert_matches_oracle(case, "winograd", torch.float64, seed=83)
    assert len(copies) == (2 if case.padding == 1 else 3), copies
