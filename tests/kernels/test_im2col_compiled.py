"""im2col's columns gathered by compiled code straight from the NCHW input (kernels/im2col.py `_gathered_columns`).

Where the GEMMs go through oneDNN (float32 on this CPU), a strided groups-1 NCHW forward whose columns are one block
takes them from one compiled pass (padding, transpose and gather) instead of a padded NHWC copy and a gather from it.
Compiled for real ("sync" mode), checked against the float64 oracle, output and every gradient: the training forward
keeps those columns for grad_weight at stride 2; at stride 1 grad_input is a forward of the grad, which stays eager.
"""

from __future__ import annotations

import pytest
import torch

import kernels
from kernels import im2col
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

# Under im2col.FOLD_MAX_CHANNELS (32) input channels an NCHW conv without dilation takes the stride-phase path (the
# stem's), so these have 32, or a dilation.
CASES = [
    Case("stride2_pad1", in_channels=32, out_channels=5, padding=1, stride=2, batch=2, size=(9, 8)),
    Case(
        "kernel_5x3_dilated_strided",
        in_channels=3,
        out_channels=4,
        kernel_size=(5, 3),
        padding=(4, 1),
        dilation=(2, 1),
        stride=(1, 2),
        size=(11, 9),
    ),
    Case("same_even_kernel", in_channels=32, out_channels=2, kernel_size=(2, 4), padding="same", size=(7, 8), bias=False),
    Case("pointwise_stride2", in_channels=32, out_channels=3, kernel_size=(1, 1), stride=2, size=(8, 7)),
    Case("stride1_grad_input_as_a_forward", in_channels=32, out_channels=33, padding=1, batch=1, size=(6, 7)),
]


@pytest.fixture
def onednn_everywhere(monkeypatch):
    """oneDNN's GEMMs (the path this gather serves) even for these small products."""
    force_gemm(monkeypatch, "onednn")
    monkeypatch.setattr(kernels.gemm, "MIN_MACS", 0)


def _gathers(monkeypatch) -> list[tuple]:
    """The compiled gather's calls from here on: the shapes of the sources it was asked to gather from."""
    calls = []
    real = im2col.compiled.run

    def run(function, *args):
        if function is im2col._gathered_columns:
            calls.append(tuple(args[0].shape))
        return real(function, *args)

    monkeypatch.setattr(im2col.compiled, "run", run)
    return calls


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_forward_and_gradients_against_the_oracle(case, onednn_everywhere, compile_sync, monkeypatch):
    """Which forwards gather from compiled code: at a stride over 1, the inference forward and the training forward (which
    keeps the columns for grad_weight); at stride 1 none, grad_input's forward of the grad included."""
    before = kernels.compiled.stats()
    calls = _gathers(monkeypatch)
    assert_matches_oracle(case, "im2col", torch.float32, seed=131)
    training = len(calls)
    input, weight, bias = make_inputs(case, torch.float32, "cpu", seed=137)
    with torch.no_grad():
        output = our_conv(case, input, weight, bias, "im2col")
    exact = torch_conv(case, *(None if leaf is None else leaf.double() for leaf in (input, weight, bias)))
    assert_parity("output", output, exact, torch.float32)
    strided = case.stride != 1
    if strided:
        assert_compiled_ran(before)
    assert training == strided and calls == [(case.batch, case.in_channels, *case.size)] * (2 if strided else 0)


def test_gather_matches_the_eager_columns(compile_sync):
    """The compiled gather holds the same (kH, kW, C)-ordered rows as the eager padded copy and its strided view."""
    case = CASES[1]
    input, weight, _ = make_inputs(case, torch.float32, "cpu", seed=139)
    spec = kernels.params.normalize(input, weight, None, case.stride, case.padding, case.dilation, case.groups, case.padding_mode)
    out_hw = spec.output_size(*input.shape[2:], *weight.shape[2:])
    eager = im2col._grouped_columns(
        im2col._patches(im2col._padded_nhwc(input, spec), spec, weight.shape[2:], slice(0, out_hw[0]), out_hw[1]), 1
    )[0]
    with torch.no_grad():
        gathered = im2col.Im2col._compiled_columns(input, spec, tuple(weight.shape[2:]), out_hw)
    assert gathered is not None and torch.equal(gathered, eager)


def test_more_than_one_block_stays_eager(onednn_everywhere, compile_sync, monkeypatch, restore_limits):
    """Columns over the workspace limit are built block by block in the scratch buffer, as before: no compiled gather."""
    calls = _gathers(monkeypatch)
    kernels.set_limits(im2col_workspace_bytes=4096)
    case = CASES[0]
    input, weight, bias = make_inputs(case, torch.float32, "cpu", seed=149)
    with torch.no_grad():
        output = our_conv(case, input, weight, bias, "im2col")
    exact = torch_conv(case, input.double(), weight.double(), bias.double())
    assert_parity("output", output, exact, torch.float32)
    row_bytes = 4 * 3 * 3 * case.in_channels * 4  # an output row's columns: W_out * kH * kW * C_in floats
    assert im2col._block_count(case.batch, 5, row_bytes) > 1 and calls == []
