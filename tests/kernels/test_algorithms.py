"""The registry: what `kernels.algorithms()` reports, clean refusals, and the reference's work limit."""

from __future__ import annotations

import time

import pytest
import torch

import kernels
from kernels import im2col, shifted_gemm, unfold
from kernels.params import normalize
from kernels.selection import choose
from tests.kernels.cases import (
    ALGORITHMS,
    CASES,
    DTYPES,
    Case,
    assert_matches_oracle,
    assert_parity,
    force_gemm,
    make_inputs,
    our_conv,
    refusal,
)

FLOAT_DTYPES = {str(dtype).removeprefix("torch.") for dtype in DTYPES}


def test_names_are_auto_then_registered():
    names = kernels.names()
    assert names[0] == "auto"
    assert sorted(names[1:]) == sorted(kernels.algorithms())
    assert {"reference", "im2col"} <= set(names)


@pytest.mark.parametrize("name", sorted(kernels.algorithms()))
def test_algorithms_reports_devices_and_dtypes(name):
    support = kernels.algorithms()[name]
    assert set(support) == {"devices", "dtypes", "double_backward", "notes", "limits"}
    assert support["devices"] and set(support["devices"]) <= {"cpu", "cuda"}
    assert support["dtypes"] and set(support["dtypes"]) <= FLOAT_DTYPES
    assert isinstance(support["double_backward"], bool)
    assert isinstance(support["notes"], str) and support["notes"]
    assert isinstance(support["limits"], dict)


@pytest.mark.parametrize("name", ["reference", "im2col"])
def test_core_algorithms_run_everywhere_in_every_float_dtype(name):
    support = kernels.algorithms()[name]
    assert set(support["devices"]) == {"cpu", "cuda"}
    assert set(support["dtypes"]) == FLOAT_DTYPES
    assert support["double_backward"] is True


def test_reported_limits_follow_set_limits(restore_limits):
    kernels.set_limits(reference_max_macs=1234, im2col_workspace_bytes=4096)
    assert kernels.algorithms()["reference"]["limits"] == {"max_macs": 1234}
    assert kernels.algorithms()["im2col"]["limits"] == {"workspace_bytes": 4096}


# Under a small workspace limit im2col splits its work into blocks of images or output rows: the stride-phase
# columns of few-channel inputs (forward and grad_weight), the channels-last patches, and the grad_input scatter
# (or, stride 1 with oneDNN's float32 GEMMs, the flipped-kernel forward).
BLOCKED_CASES = [
    Case("stem_like_rows", in_channels=3, out_channels=5, kernel_size=(7, 7), stride=2, padding=3, batch=3, size=(20, 18)),
    Case("stem_like_images", in_channels=3, out_channels=4, kernel_size=(5, 5), stride=(2, 1), padding=2, batch=5, size=(6, 7)),
    Case("channels_last_patches", in_channels=40, out_channels=6, stride=2, padding=1, batch=2, size=(9, 10)),
    Case("stride_one_wide", in_channels=36, out_channels=5, padding=(1, 2), batch=3, size=(8, 7)),
]


@pytest.mark.parametrize("backend", ["torch", "onednn"])
@pytest.mark.parametrize("workspace", [1 << 10, 1 << 14], ids=["rows", "images"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("case", BLOCKED_CASES, ids=lambda case: case.id)
def test_im2col_in_blocks_matches_the_oracle(case, dtype, workspace, backend, restore_limits, monkeypatch):
    force_gemm(monkeypatch, backend)
    kernels.set_limits(im2col_workspace_bytes=workspace)
    assert_matches_oracle(case, "im2col", dtype, seed=5)


KEPT_CASES = [
    (BLOCKED_CASES[0], torch.float64, "torch"),  # stride phases (`_phase_forward`)
    (
        Case("strided_channels_last", in_channels=40, out_channels=6, stride=2, padding=1, size=(9, 8), layout="channels_last"),
        torch.float64,
        "torch",
    ),
    (BLOCKED_CASES[2], torch.float32, "onednn"),  # NCHW through the channels-last patches where oneDNN runs the GEMMs
    # stride 1: nothing is kept (its grad_input gathers columns of its own; kept ones beside them cost more than they saved)
    (
        Case("stride_one_channels_last", in_channels=36, out_channels=5, padding=1, size=(8, 7), layout="channels_last"),
        torch.float64,
        "torch",
    ),
]


@pytest.mark.parametrize(("case", "dtype", "backend"), KEPT_CASES, ids=lambda value: getattr(value, "id", str(value)))
def test_im2col_grad_weight_reuses_the_forwards_columns(case, dtype, backend, monkeypatch, restore_limits):
    """A strided one-block forward under autograd keeps its columns and grad_weight takes them: the input is gathered
    once per forward+backward, not twice, with every gradient against the oracle; past `kept_for_backward_bytes`, twice.
    At stride 1 nothing is kept: twice either way."""
    force_gemm(monkeypatch, backend)
    gathers = []
    for name in ("_phase_columns", "_grouped_columns"):
        real = getattr(im2col, name)
        monkeypatch.setattr(im2col, name, lambda *args, real=real, name=name, **kwargs: gathers.append(name) or real(*args, **kwargs))
    assert_matches_oracle(case, "im2col", dtype, seed=61)
    assert len(gathers) == (2 if case.stride == 1 else 1), gathers
    gathers.clear()
    kernels.set_limits(kept_for_backward_bytes=1)
    assert_matches_oracle(case, "im2col", dtype, seed=67)
    assert len(gathers) == 2, gathers


@pytest.mark.parametrize("backend", ["torch", "onednn"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_unfold_grad_weight_reuses_the_forwards_patches(dtype, backend, monkeypatch, restore_limits):
    """Under autograd unfold's forward keeps its patches and grad_weight takes them (one unfold per forward+backward,
    two past `kept_for_backward_bytes`), every gradient against the oracle."""
    force_gemm(monkeypatch, backend)
    calls = []
    real = unfold._patches
    monkeypatch.setattr(unfold, "_patches", lambda *args: calls.append(1) or real(*args))
    case = Case("unfold_kept", in_channels=3, out_channels=4, padding=(1, 0), stride=(1, 2), batch=2, size=(6, 7))
    assert_matches_oracle(case, "unfold", dtype, seed=71)
    assert len(calls) == 1
    kernels.set_limits(kept_for_backward_bytes=1)
    assert_matches_oracle(case, "unfold", dtype, seed=73)
    assert len(calls) == 3


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_every_algorithm_runs_a_fair_share_of_the_grid(algorithm):
    # Refused cases are skipped in the parity grid; this keeps a refusal bug from skipping everything.
    runnable = [case.id for case in CASES if refusal(case, algorithm) is None]
    assert len(runnable) >= 8, f"{algorithm} runs only {runnable}"


def test_auto_on_cpu_never_refuses_the_grid():
    for case in CASES:
        for dtype in DTYPES:
            input, weight, bias = make_inputs(case, dtype, "cpu")
            assert our_conv(case, input, weight, bias, "auto").dtype == dtype


@pytest.fixture(params=["torch", "onednn"])
def gemm_backend(request, monkeypatch) -> str:
    """auto's thresholds depend on where the GEMMs run (kernels/gemm.py); each case is checked under both."""
    force_gemm(monkeypatch, request.param)
    return request.param


# expected: (with torch's GEMMs, with oneDNN's); the thresholds are in kernels/selection.py.
@pytest.mark.parametrize(
    ("input_shape", "weight_shape", "groups", "stride", "expected"),
    [
        ((2, 1, 3, 3), (2, 1, 3, 3), 1, 1, ("unfold", "unfold")),  # the seed case: 324 MACs, per-call overhead is all
        ((1, 8, 16, 16), (8, 8, 3, 3), 1, 1, ("unfold", "unfold")),  # 147K MACs, under SMALL_MACS
        ((4, 32, 28, 28), (32, 1, 3, 3), 32, 1, ("depthwise", "depthwise")),  # 0.9M MACs: unfold's grouped matmul would lose
        # 4.2M MACs per Winograd GEMM: over WINOGRAD_MIN_THREADED_GEMM_MACS, under ONEDNN_WINOGRAD_MIN_GEMM_MACS
        ((4, 64, 32, 32), (64, 64, 3, 3), 1, 1, ("winograd", "im2col")),
        ((1, 256, 14, 14), (256, 256, 3, 3), 1, 1, ("unfold", "unfold")),  # 196 positions (UNFOLD_MAX_POSITIONS, ONEDNN_...)
        ((4, 512, 7, 7), (512, 512, 3, 3), 1, 1, ("unfold", "unfold")),  # 196 positions over 4 images
        ((1, 64, 16, 16), (64, 64, 3, 3), 1, 1, ("unfold", "im2col")),  # 256 positions: within 256, over 196
        ((2, 256, 14, 14), (256, 256, 3, 3), 1, 1, ("winograd", "winograd")),  # 392 positions; 6.4M MACs per Winograd GEMM
        ((4, 256, 14, 14), (256, 256, 3, 3), 1, 1, ("winograd", "winograd")),  # 12.8M MACs per Winograd GEMM
        ((1, 128, 28, 28), (128, 128, 3, 3), 1, 2, ("im2col", "im2col")),  # 196 positions: too many for stride 2
        ((1, 256, 14, 14), (256, 256, 3, 3), 1, 2, ("unfold", "unfold")),  # 49 positions, stride 2 (UNFOLD_MAX_STRIDED_POSITIONS)
        ((1, 512, 14, 14), (512, 1, 3, 3), 512, 1, ("depthwise", "depthwise")),  # few positions (0.9M MACs), but grouped
        ((1, 256, 7, 7), (64, 256, 1, 1), 1, 1, ("pointwise", "pointwise")),  # few positions, but 1x1
    ],
)
def test_auto_picks_unfold_only_for_small_problems_or_few_positions(input_shape, weight_shape, groups, stride, expected, gemm_backend):
    input, weight = torch.randn(input_shape), torch.randn(weight_shape)
    padding = 1 if weight_shape[2] == 3 else 0
    spec = normalize(input, weight, None, stride, padding, 1, groups, "zeros")
    assert choose(input, weight, spec).name == expected[gemm_backend == "onednn"]


@pytest.mark.parametrize(
    ("channels", "batch", "threads", "expected"),
    [
        (128, 1, 2, ("shifted_gemm", "im2col")),
        (128, 2, 2, ("winograd", "winograd")),
        (128, 4, 2, ("winograd", "winograd")),
        (128, 1, 1, ("winograd", "im2col")),
        (64, 1, 1, ("shifted_gemm", "im2col")),
    ],
    ids=["3.2M_threaded", "6.4M_threaded", "12.8M_threaded", "3.2M_one_thread", "0.8M_one_thread"],
)
def test_auto_leaves_winograd_when_its_gemms_are_small(channels, batch, threads, expected, restore_threads, gemm_backend):
    """3x3 on 28x28: 196 tiles per image x C x C MACs per position GEMM (128 channels at batch 1: 3.2M),
    against WINOGRAD_MIN_THREADED_GEMM_MACS (4M) from 2 threads and WINOGRAD_MIN_GEMM_MACS (2M) at 1 with
    torch's GEMMs, ONEDNN_WINOGRAD_MIN_GEMM_MACS (6M) with oneDNN's; refused, the layer goes to shifted_gemm
    with torch's GEMMs (28x28 is within MAX_SHIFTED_WASTE) and to im2col with oneDNN's (shifted_gemm is skipped)."""
    input, weight = torch.empty(batch, channels, 28, 28), torch.empty(channels, channels, 3, 3)
    spec = normalize(input, weight, None, 1, 1, 1, 1, "zeros")
    torch.set_num_threads(threads)
    assert choose(input, weight, spec).name == expected[gemm_backend == "onednn"]


@pytest.mark.parametrize(
    ("input_shape", "expected"),
    [
        ((1, 256, 14, 14), ("unfold", "im2col")),  # 196 positions: unfold's F.fold backward pays, its forward does not
        ((4, 512, 7, 7), ("unfold", "im2col")),  # 196 over four images
        ((1, 32, 14, 14), ("unfold", "im2col")),  # 1.8M MACs, over SMALL_MACS
        ((1, 128, 10, 10), ("unfold", "unfold")),  # 100 positions: within ONEDNN_UNFOLD_INFERENCE_MAX_POSITIONS
        ((1, 512, 7, 7), ("unfold", "unfold")),  # 49
    ],
)
def test_auto_weighs_the_forward_alone_where_no_backward_follows(input_shape, expected, monkeypatch):
    """With oneDNN's GEMMs, `choose(..., backward=False)` (inference) leaves unfold from 129 output positions, where only its
    backward is ahead of im2col (kernels/selection.py ONEDNN_UNFOLD_INFERENCE_MAX_POSITIONS); training keeps it."""
    force_gemm(monkeypatch, "onednn")
    channels = input_shape[1]
    input, weight = torch.empty(input_shape), torch.empty(channels, channels, 3, 3)
    spec = normalize(input, weight, None, 1, 1, 1, 1, "zeros")
    assert (choose(input, weight, spec).name, choose(input, weight, spec, backward=False).name) == expected


def test_conv2d_plans_inference_and_training_apart(monkeypatch):
    """kernels.conv2d's "auto" asks for the forward alone where nothing requires grad (or grad mode is off), and for
    forward+backward where autograd records; the same layer runs im2col in the first case, unfold in the second, each
    against the float64 oracle."""
    force_gemm(monkeypatch, "onednn")
    ran = []
    for module, cls, method in ((im2col, "Im2col", "forward"), (unfold, "Unfold", "forward"), (unfold, "Unfold", "forward_keeping")):
        real = getattr(getattr(module, cls), method)
        monkeypatch.setattr(getattr(module, cls), method, lambda self, *args, real=real: ran.append(self.name) or real(self, *args))
    generator = torch.Generator().manual_seed(89)
    input, weight = torch.randn(1, 32, 14, 14, generator=generator), torch.randn(32, 32, 3, 3, generator=generator) / 288**0.5
    exact = input.double().requires_grad_()
    expected = torch.nn.functional.conv2d(exact, weight.double(), padding=1)
    expected.sum().backward()
    with torch.no_grad():
        assert_parity("output", kernels.conv2d(input, weight, padding=1), expected.detach(), torch.float32)
    assert ran == ["im2col"]
    ran.clear()
    leaf = input.clone().requires_grad_()
    output = kernels.conv2d(leaf, weight, padding=1)
    assert ran == ["unfold"]
    assert_parity("output", output, expected.detach(), torch.float32)
    output.sum().backward()
    assert_parity("grad_input", leaf.grad, exact.grad, torch.float32)


@pytest.mark.parametrize(
    ("batch", "channels", "size", "layout", "threads", "expected"),
    [
        (4, 64, 56, torch.contiguous_format, 2, "winograd_rows"),  # 13,456 wide rows, 55M MACs per tap GEMM
        (4, 64, 56, torch.contiguous_format, 1, "winograd"),  # one thread: Winograd's fewer multiply-adds win
        (8, 64, 56, torch.contiguous_format, 2, "winograd_rows"),  # 10.3 MB through each of its GEMMs (half the rows)
        (16, 64, 56, torch.contiguous_format, 2, "winograd"),  # 20.7 MB: over ONEDNN_SHIFTED_MAX_PASS_BYTES
        (8, 32, 56, torch.contiguous_format, 2, "winograd_rows"),  # 5.2 MB
        (2, 64, 56, torch.contiguous_format, 2, "winograd_rows"),  # 6,728 rows
        (1, 64, 56, torch.contiguous_format, 2, "im2col"),  # 3,364 rows: under ONEDNN_SHIFTED_MIN_ROWS
        (2, 32, 56, torch.contiguous_format, 2, "im2col"),  # 6,728 rows, 6.9M MACs: under ONEDNN_SHIFTED_MIN_GEMM_MACS
        (4, 32, 56, torch.contiguous_format, 2, "winograd_rows"),  # 13.8M MACs
        (4, 96, 56, torch.contiguous_format, 2, "winograd"),  # over ONEDNN_SHIFTED_MAX_CHANNELS
        (4, 64, 28, torch.contiguous_format, 2, "im2col"),  # waste 1.15, over ONEDNN_SHIFTED_MAX_WASTE
        (4, 64, 56, torch.channels_last, 2, "winograd"),  # Winograd's NHWC path has no transposing copy either
    ],
)
def test_auto_takes_shifted_gemms_for_big_few_channel_images_with_onednn(
    batch, channels, size, layout, threads, expected, restore_threads, monkeypatch
):
    """3x3 stride 1: with oneDNN's GEMMs (each tap's sum in its epilogue) and 2 threads, shifted GEMMs (winograd_rows, for
    3-wide kernels) take NCHW 56x56 images of up to 64 channels from 6,000 wide rows and 12M multiply-adds per tap GEMM,
    up to 12 MiB through each (kernels/selection.py ONEDNN_SHIFTED_*), whether or not Winograd's transforms compile,
    for inference as for training."""
    force_gemm(monkeypatch, "onednn")
    input = torch.empty(batch, channels, size, size).contiguous(memory_format=layout)
    weight = torch.empty(channels, channels, 3, 3)
    spec = normalize(input, weight, None, 1, 1, 1, 1, "zeros")
    torch.set_num_threads(threads)
    for mode in ("off", "background"):
        with kernels.compiled.mode(mode):
            for backward in (True, False):
                assert choose(input, weight, spec, backward).name == expected, (mode, backward)


@pytest.mark.parametrize(
    ("kernel", "padding", "expected"), [((3, 3), 1, "winograd_rows"), ((1, 3), (0, 1), "winograd_rows"), ((3, 2), 1, "shifted_gemm")]
)
def test_auto_sends_winograd_rows_only_kernels_three_wide(kernel, padding, expected, restore_threads, monkeypatch):
    """Where shifted_gemm's rules hold, a kernel 3 wide runs winograd_rows (F(2, 3) needs 3 taps per row, whatever the
    kernel's height); others stay with shifted_gemm."""
    force_gemm(monkeypatch, "onednn")
    torch.set_num_threads(2)
    input, weight = torch.empty(4, 64, 56, 56), torch.empty(64, 64, *kernel)
    assert choose(input, weight, normalize(input, weight, None, 1, padding, 1, 1, "zeros")).name == expected


@pytest.mark.parametrize(
    ("dtype", "backend"), [(torch.float64, "torch"), (torch.float32, "onednn")], ids=["float64-torch", "float32-onednn"]
)
def test_shifted_gemm_grad_weight_reuses_the_forwards_rows(dtype, backend, monkeypatch, restore_limits):
    """Under autograd shifted_gemm's forward keeps its padded input rows and grad_weight takes them (the input padded
    once per forward+backward, twice past `kept_for_backward_bytes`), every gradient against the oracle, with groups."""
    force_gemm(monkeypatch, backend)
    monkeypatch.setattr(kernels.gemm, "MIN_MACS", 0)  # these small products through oneDNN too, where forced
    calls = []
    real = shifted_gemm.padded_rows
    monkeypatch.setattr(shifted_gemm, "padded_rows", lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))
    for case in (
        Case("shifted_kept", in_channels=6, out_channels=4, padding=(1, 2), batch=2, size=(7, 9)),
        Case("shifted_kept_groups", in_channels=6, out_channels=4, groups=2, padding=1, batch=2, size=(6, 5)),
    ):
        calls.clear()
        kernels.set_limits(kept_for_backward_bytes=64 << 20)
        assert_matches_oracle(case, "shifted_gemm", dtype, seed=79)
        assert len(calls) == 1, case.id
        kernels.set_limits(kept_for_backward_bytes=1)
        assert_matches_oracle(case, "shifted_gemm", dtype, seed=83)
        assert len(calls) == 3, case.id


REFUSALS = [(case, name) for case in CASES for name in ALGORITHMS if refusal(case, name)]


@pytest.mark.parametrize(("case", "algorithm"), REFUSALS or [pytest.param(None, None, marks=pytest.mark.skip(reason="no refusals"))])
def test_refusal_is_a_clean_unsupported_problem(case, algorithm):
    input, weight, bias = make_inputs(case, torch.float32, "cpu")
    with pytest.raises(kernels.UnsupportedProblem, match=algorithm) as error:
        our_conv(case, input, weight, bias, algorithm)
    assert str(error.value) == refusal(case, algorithm, torch.float32)


BIG = Case("big", in_channels=64, out_channels=64, batch=8, size=(64, 64), padding=1)  # 8*64*64*64*64*9 ~ 1.2e9 MACs


def test_reference_refuses_big_work_fast():
    input = torch.empty(BIG.input_shape())
    weight = torch.empty(BIG.weight_shape())
    started = time.perf_counter()
    with pytest.raises(kernels.WorkTooLarge, match="MACs") as error:
        kernels.conv2d(input, weight, padding=1, algorithm="reference")
    assert time.perf_counter() - started < 0.5, "the refusal must come before any work"
    assert isinstance(error.value, kernels.UnsupportedProblem) and isinstance(error.value, ValueError)
    assert f"{kernels.get_limits().reference_max_macs:,}" in str(error.value)


def test_set_limits_moves_the_reference_limit(restore_limits):
    case = Case("small", in_channels=2, out_channels=2, batch=1, size=(4, 4))  # N*C_out*H_out*W_out*C_in*kH*kW = 1*2*2*2*2*9 = 144 MACs
    input, weight, bias = make_inputs(case, torch.float64, "cpu")
    assert our_conv(case, input, weight, bias, "reference").shape == (1, 2, 2, 2)
    kernels.set_limits(reference_max_macs=143)
    with pytest.raises(kernels.WorkTooLarge, match="143"):
        our_conv(case, input, weight, bias, "reference")
    kernels.set_limits(reference_max_macs=144)
    assert our_conv(case, input, weight, bias, "reference").shape == (1, 2, 2, 2)


def test_big_work_still_runs_with_auto(restore_limits):
    # The limit is the reference's alone: auto never picks it, so a lowered limit does not refuse auto.
    kernels.set_limits(reference_max_macs=1)
    case = Case("small", in_channels=2, out_channels=2, batch=1, size=(4, 4))
    input, weight, bias = make_inputs(case, torch.float64, "cpu")
    assert our_conv(case, input, weight, bias, "auto").shape == (1, 2, 2, 2)


@pytest.mark.parametrize("value", [0, -1, 2.5, "10"])
def test_set_limits_refuses_non_positive_or_non_int(value, restore_limits):
    with pytest.raises(ValueError, match="reference_max_macs"):
        kernels.set_limits(reference_max_macs=value)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("padding", [0, 1, 2, (2, 1)])
def test_winograd_channel_first_path_on_large_nchw_images(dtype, padding):
    """winograd's NCHW forward (images >= NCHW_MIN_SIZE, above the grid's case sizes), also used for
    grad_input: output and all three gradients against nn.Conv2d's math in float64."""
    from kernels.winograd import NCHW_MIN_SIZE

    generator = torch.Generator().manual_seed(7)
    size = (NCHW_MIN_SIZE + 2, NCHW_MIN_SIZE + 6)
    x = torch.randn(2, 8, *size, generator=generator, dtype=torch.float64)
    w = torch.randn(6, 8, 3, 3, generator=generator, dtype=torch.float64) * 0.2
    b = torch.randn(6, generator=generator, dtype=torch.float64)
    expected_leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    expected = torch.nn.functional.conv2d(*expected_leaves, padding=padding)
    grad_output = torch.randn(expected.shape, generator=generator, dtype=torch.float64) / 64
    expected.backward(grad_output)
    leaves = [t.to(dtype).requires_grad_() for t in (x, w, b)]
    output = kernels.conv2d(*leaves, padding=padding, algorithm="winograd")
    output.backward(grad_output.to(dtype))
    assert_parity("output", output.detach(), expected.detach(), dtype)
    for name, ours, theirs in zip(("grad_input", "grad_weight", "grad_bias"), leaves, expected_leaves):
        assert_parity(name, ours.grad, theirs.grad, dtype)


@pytest.mark.parametrize(
    "width, stride, padding",
    [
        (12, (2, 2), (3, 3, 3, 3)),  # the stem's form: one strided copy
        (12, (1, 3), (0, 1, 2, 0)),  # stride 3, columns start at X 0, 1, 1: a copy per residue
        (11, (2, 2), (1, 0, 1, 2)),  # odd width: residues of different lengths
        (9, (3, 1), (2, 2, 0, 0)),
    ],
)
def test_im2col_phase_split_holds_each_stride_phase_of_the_padded_input(width, stride, padding):
    """`_phase_plane(split, p, q)` is padded[.., p::s_h, q::s_w] for every phase, zero padding included, and
    im2col's forward through it (the bias riding in the GEMM) matches the float64 oracle."""
    from kernels.im2col import Im2col, _phase_plane, _phase_split, _use_phases
    from kernels.params import ConvSpec

    generator = torch.Generator().manual_seed(11)
    x = torch.randn(2, 3, 10, width, generator=generator, dtype=torch.float64)
    w = torch.randn(5, 3, 5, 4, generator=generator, dtype=torch.float64)
    b = torch.randn(5, generator=generator, dtype=torch.float64)
    spec = ConvSpec(stride, padding, (1, 1), 1)
    top, bottom, left, right = padding
    padded = torch.nn.functional.pad(x, (left, right, top, bottom))
    split = _phase_split(x, spec)
    for p in range(stride[0]):
        for q in range(stride[1]):
            wanted = padded[:, :, p :: stride[0], q :: stride[1]]
            plane = _phase_plane(split, spec, p, q)
            assert torch.equal(plane[:, :, : wanted.shape[2], : wanted.shape[3]], wanted), (p, q)
    assert _use_phases(x, w, spec)
    output = Im2col().forward(x, w, b, spec)  # asymmetric padding: the algorithm's own interface
    assert_parity("output", output, torch.nn.functional.conv2d(padded, w, b, stride=stride), torch.float64)


def test_a_kept_buffer_is_released_by_its_backward(monkeypatch):
    """The output (and so its graph) lives on after backward; what the forward kept for the backward must not."""
    import gc
    import weakref

    refs = []
    real = unfold.Unfold.forward_keeping

    def spy(self, *args):
        output, kept = real(self, *args)
        refs.append(weakref.ref(kept))
        return output, kept

    monkeypatch.setattr(unfold.Unfold, "forward_keeping", spy)
    input = torch.randn(2, 3, 6, 7, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    output = kernels.conv2d(input, weight, padding=1, algorithm="unfold")
    gc.collect()
    assert len(refs) == 1 and refs[0]() is not None, "the forward kept nothing to test with"
    output.sum().backward()
    gc.collect()
    assert refs[0]() is None, "the kept patches outlived the backward"
    assert output.grad_fn is not None  # the graph itself is still referenced
