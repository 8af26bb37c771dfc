"""winograd_rows (kernels/winograd_rows.py): F(2, 3) along each row, shifted GEMMs down the columns.

The shared grid (test_parity.py and the rest) runs it on every case it accepts; its small images mostly have odd
output widths. Here: even widths (its main path, whose padded rows the backward reuses), which of its paths ran,
the compiled transforms, and float32 accuracy at the sizes it is picked for.
"""

from __future__ import annotations

import pytest
import torch

import kernels
from kernels import shifted_gemm, winograd_rows
from tests.kernels.cases import (
    Case,
    assert_compiled_ran,
    assert_matches_oracle,
    assert_parity,
    force_gemm,
    make_inputs,
    our_conv,
    torch_conv,
)

# Even output widths, each path of the forward and of grad_input's padding; kH and vertical dilation are free.
CASES = [
    Case("pad1_even", in_channels=5, out_channels=4, padding=1, batch=2, size=(6, 8)),
    Case("kernel_5x3_dilated_rows", in_channels=3, out_channels=6, kernel_size=(5, 3), padding=(4, 1), dilation=(2, 1), size=(7, 10)),
    Case("kernel_1x3_no_bias", in_channels=4, out_channels=3, kernel_size=(1, 3), padding=(0, 2), bias=False, size=(5, 6)),
    Case("valid_even", in_channels=2, out_channels=5, padding=0, size=(7, 10)),
    Case("odd_width", in_channels=3, out_channels=2, padding=1, size=(6, 9)),
    # "same" with a kernel 4 high pads 1 row on top and 2 below (grad_input's conv: 2 and 1)
    Case("same_even_kernel_height", in_channels=3, out_channels=4, kernel_size=(4, 3), padding="same", size=(6, 8)),
    # padding 3 > 2: grad_input's own conv would need padding -1, so it is shifted_gemm's (a crop)
    Case("padding_past_the_kernel", in_channels=2, out_channels=3, padding=3, batch=1, size=(5, 6)),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("backend", ["torch", "onednn"])
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_output_and_gradients_against_the_oracle(case, backend, dtype, monkeypatch):
    force_gemm(monkeypatch, backend)
    monkeypatch.setattr(kernels.gemm, "MIN_MACS", 0)  # these small products through oneDNN too, where forced
    assert_matches_oracle(case, "winograd_rows", dtype, seed=101)


def test_grad_input_is_its_own_conv_where_the_padding_allows(monkeypatch):
    """The forward and grad_input each run one `conv_rows` (grad_input's with the flipped, transposed kernel); with a
    padding past the kernel's reach grad_input is shifted_gemm's."""
    runs = []
    real = winograd_rows._conv_tiles
    monkeypatch.setattr(winograd_rows, "_conv_tiles", lambda *args: runs.append(args[0].shape) or real(*args))
    for case, expected in ((CASES[0], 2), (CASES[-1], 1)):
        runs.clear()
        assert_matches_oracle(case, "winograd_rows", torch.float64, seed=103)
        assert len(runs) == expected, case.id


def test_grad_weight_reuses_the_forwards_rows(monkeypatch, restore_limits):
    """Under autograd the forward keeps its padded input rows (shifted_gemm's layout) and grad_weight takes them: the
    input padded once per forward+backward, twice past `kept_for_backward_bytes`."""
    calls = []
    rebuild, pad = shifted_gemm.padded_rows, winograd_rows.nhwc_rows
    monkeypatch.setattr(shifted_gemm, "padded_rows", lambda *args, **kwargs: calls.append(1) or rebuild(*args, **kwargs))

    def padding(tensor, *args):
        if tensor.shape[1] == CASES[0].in_channels:  # the input; grad_input's conv pads the grad (C_out channels) too
            calls.append(1)
        return pad(tensor, *args)

    monkeypatch.setattr(winograd_rows, "nhwc_rows", padding)
    for limit, expected in ((64 << 20, 1), (1, 2)):
        calls.clear()
        kernels.set_limits(kept_for_backward_bytes=limit)
        assert_matches_oracle(CASES[0], "winograd_rows", torch.float64, seed=107)
        assert len(calls) == expected, limit


@pytest.mark.parametrize(
    ("case", "dtype"),
    [(CASES[0], torch.float32), (CASES[0], torch.float64), (CASES[4], torch.float64), (CASES[5], torch.float64)],
    ids=lambda value: value.id if isinstance(value, Case) else str(value).removeprefix("torch."),
)
def test_compiled_transforms(case, dtype, compile_sync):
    """Inductor's one-pass transforms (kernels/compiled.py) against the oracle: the input transform on the padded rows
    (a training forward, whose rows grad_weight reads), the one straight from the NCHW source (grad_input's conv, and an
    inference forward) and the output transform."""
    before = kernels.compiled.stats()
    assert_matches_oracle(case, "winograd_rows", dtype, seed=109)
    input, weight, bias = make_inputs(case, dtype, "cpu", seed=109)
    with torch.no_grad():
        output = our_conv(case, input, weight, bias, "winograd_rows")
    exact = torch_conv(case, *(None if leaf is None else leaf.double() for leaf in (input, weight, bias)))
    assert_parity("output", output, exact, dtype)
    assert_compiled_ran(before)
    compiled_functions = {key[0] for key in kernels.compiled._state.ready}
    assert {winograd_rows._input_tiles, winograd_rows._padded_input_tiles, winograd_rows._output_tiles} <= compiled_functions


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_input_transform_compiled_and_eager_agree(dtype, compile_sync):
    """B^T d only adds and subtracts two inputs: the compiled pass and the eager one give the same bits, and V[i] at tile t
    of row y reads the grid's columns 2t .. 2t + 3."""
    grid = torch.randn(2, 5, 10, 3, dtype=dtype, generator=torch.Generator().manual_seed(127))
    tiles = 4
    eager = winograd_rows._input_eager(grid, tiles).clone()  # a scratch buffer: copied before the next call
    with torch.no_grad():  # as inside the conv's autograd.Function
        compiled = winograd_rows.transformed_input(grid, tiles)
    assert kernels.compiled.stats()["calls"] == 1 and torch.equal(compiled, eager)
    d = grid[1, 3, 4:8]  # tile 2 of row 3 in image 1
    expected = torch.stack([d[0] - d[2], d[1] + d[2], d[2] - d[1], d[1] - d[3]])
    torch.testing.assert_close(compiled.view(4, 2, 5, tiles, 3)[:, 1, 3, 2], expected, rtol=0, atol=0)


def test_float32_error_at_a_size_auto_picks_it_for(monkeypatch):
    """64 channels at 56x56, kaiming-scaled weights: within the float32 row of kernels/tolerances.py, as nn.Conv2d is
    (round 23 measured 0.17 of the row for ours, 0.12 for oneDNN)."""
    force_gemm(monkeypatch, "onednn")
    generator = torch.Generator().manual_seed(113)
    input = torch.randn(2, 64, 56, 56, generator=generator)
    weight = torch.randn(64, 64, 3, 3, generator=generator) * (2 / (9 * 64)) ** 0.5
    with torch.no_grad():
        output = kernels.conv2d(input, weight, padding=1, algorithm="winograd_rows")
    exact = torch.nn.functional.conv2d(input.double(), weight.double(), padding=1)
    assert_parity("output", output, exact, torch.float32)


def test_refuses_what_f23_cannot_run():
    input = torch.randn(1, 2, 8, 8)
    for weight, options, why in (
        (torch.randn(2, 2, 3, 2), {}, "kernel 3 wide"),
        (torch.randn(2, 2, 3, 3), {"dilation": (1, 2)}, "horizontal dilation 1"),
        (torch.randn(2, 1, 3, 3), {"groups": 2}, "groups 1"),
        (torch.randn(2, 2, 3, 3), {"stride": 2}, "stride"),
    ):
        with pytest.raises(kernels.UnsupportedProblem, match=why):
            kernels.conv2d(input, weight, algorithm="winograd_rows", **options)
