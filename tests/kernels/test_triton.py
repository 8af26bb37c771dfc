"""The "triton" algorithm: output and every gradient against nn.Conv2d, plus what is Triton-specific.

Without CUDA the kernels run under Triton's CPU interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), which executes every block op in numpy: shapes stay small, and each case
is chosen to reach a distinct kernel path (flattened vs per-tap K, several M/N/K tiles, stride
phases with no taps, several grad_weight splits). With CUDA the same grid runs on the GPU in
float32 (IEEE: TF32 off), float16 and bfloat16.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the 'triton' algorithm is not registered")

import kernels  # noqa: E402
from bench.bench_gpu import capture  # noqa: E402
from kernels.base import UnsupportedProblem  # noqa: E402
from kernels.tolerances import tolerance  # noqa: E402
from tests.kernels.cases import CASES, CUDA, Case, grads, layout_flags, make_inputs, our_conv, seeded, torch_conv  # noqa: E402
from tests.kernels.op_spy import OpSpy, forbidden, launches, multiplies

if "triton" not in kernels.names():
    pytest.skip("kernels.triton_conv failed to import", allow_module_level=True)

from kernels import triton_conv  # noqa: E402

INTERPRETED = "cpu" in kernels.algorithms()["triton"]["devices"]
# aten ops that would mean torch did the convolution or its multiplies (tests/kernels/test_no_torch_conv.py
# checks every algorithm for the first; here the stricter claim: no torch multiply at all).
GRAD_NAMES = ("grad_input", "grad_weight", "grad_bias")

# Beyond the shared grid: the paths the shared grid's 3-4 channel problems do not reach.
TRITON_CASES = [
    Case("stem_c3_7x7_s2", in_channels=3, out_channels=8, kernel_size=(7, 7), stride=2, padding=3, size=(12, 11)),
    Case("per_tap_k_tiles", in_channels=40, out_channels=36, padding=1, size=(7, 6)),
    Case("many_pixels_splits", in_channels=16, out_channels=16, padding=1, size=(10, 9)),
    Case("stride3_dilation2", in_channels=16, out_channels=20, stride=3, dilation=2, padding=2, size=(11, 10)),
    Case("phase_without_taps", in_channels=4, out_channels=4, stride=2, dilation=2, padding=2, size=(8, 9)),
    Case("groups_per_tap", in_channels=32, out_channels=64, groups=2, padding=1, stride=(1, 2)),
    Case("asymmetric_same_even", in_channels=16, out_channels=16, kernel_size=(4, 2), padding="same", size=(7, 8)),
    Case("depthwise_stride2", in_channels=16, out_channels=16, groups=16, stride=2, padding=1, size=(9, 9)),
    Case(
        "depthwise_multiplier_dilated_same", in_channels=8, out_channels=16, groups=8, kernel_size=(3, 2), dilation=(2, 1), padding="same"
    ),
    Case("single_input_channel", in_channels=1, out_channels=8, kernel_size=(5, 5), stride=2, padding=2, size=(9, 8)),
    Case("channels_last_per_tap", in_channels=24, out_channels=16, stride=2, padding=1, layout="channels_last"),
    # Few output tiles over a long K: the forward splits its taps on a GPU too (triton_fwd.choose_tap_splits).
    Case("split_taps", in_channels=128, out_channels=32, padding=1, size=(5, 5)),
    # In 16 bits grad_input reads a channels-last weight where it lies (no K-major copy): groups, per-tap K tiles.
    Case(
        "grouped_channels_last_weight",
        in_channels=32,
        out_channels=48,
        groups=2,
        stride=2,
        padding=1,
        size=(7, 6),
        layout="channels_last_both",
    ),
]
ALL_CASES = CASES + TRITON_CASES
HALF_CASES = [
    case
    for case in ALL_CASES
    if case.id
    in ("basic", "stem_c3_7x7_s2", "per_tap_k_tiles", "depthwise", "channels_last", "channels_last_both", "grouped_channels_last_weight")
]

CPU = pytest.mark.skipif(not INTERPRETED, reason="triton runs on cpu only under TRITON_INTERPRET=1")
GPU = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs CUDA")]


@pytest.fixture
def ieee_float32():
    """nn.Conv2d and ours both in IEEE float32 (TF32 off) for the float32 tolerance; the flags are restored after.

    (Plain assignment: torch's backend modules reject monkeypatch's delattr on undo.)
    """
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def assert_parity(name: str, actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert actual.dtype == dtype, f"{name}: dtype {actual.dtype}, expected {dtype}"
    atol, rtol = tolerance(dtype)
    torch.testing.assert_close(actual.double(), expected, atol=atol, rtol=rtol, msg=lambda message: f"{name}: {message}")


def check_case(case: Case, dtype: torch.dtype, device: str, seed: int = 0) -> None:
    """Output, grad_input, grad_weight, grad_bias vs nn.Conv2d in float64 on the same rounded inputs."""
    input, weight, bias = make_inputs(case, dtype, device, seed)
    leaves = [leaf for leaf in (input, weight, bias) if leaf is not None]
    output = our_conv(case, input, weight, bias, "triton")
    same_dtype = torch_conv(case, input, weight, bias)
    assert output.shape == same_dtype.shape
    assert layout_flags(output) == layout_flags(same_dtype), "output memory format differs from nn.Conv2d's"

    exact_leaves = [leaf.detach().double().requires_grad_(True) for leaf in leaves]
    exact = torch_conv(case, *exact_leaves, *([None] if bias is None else []))
    grad_output = torch.randn(exact.shape, generator=seeded(1), dtype=torch.float64).to(device, dtype)
    assert_parity("output", output, exact, dtype)
    for name, actual, expected in zip(GRAD_NAMES, grads(output, grad_output, leaves), grads(exact, grad_output.double(), exact_leaves)):
        assert_parity(name, actual, expected, dtype)


@CPU
@pytest.mark.parametrize("case", ALL_CASES, ids=lambda case: case.id)
def test_interpreter_float32(case):
    check_case(case, torch.float32, "cpu")


@CPU
@pytest.mark.parametrize("case", HALF_CASES, ids=lambda case: case.id)
def test_interpreter_float16(case):
    check_case(case, torch.float16, "cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=lambda dtype: str(dtype).removeprefix("torch."))
@pytest.mark.parametrize("case", ALL_CASES, ids=lambda case: case.id)
@pytest.mark.parametrize("device", [pytest.param("cuda", id="cuda", marks=GPU)])
def test_cuda(case, dtype, device, ieee_float32):
    check_case(case, dtype, device)


REPEATED_CASES = [c for c in ALL_CASES if c.id in ("basic", "stem_c3_7x7_s2", "stride3_dilation2", "depthwise_stride2", "groups_per_tap")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda dtype: str(dtype).removeprefix("torch."))
@pytest.mark.parametrize("case", REPEATED_CASES, ids=lambda case: case.id)
@pytest.mark.parametrize("device", [pytest.param("cuda", id="cuda", marks=GPU)])
def test_repeated_calls_launch_the_compiled_kernel_directly(case, dtype, device, ieee_float32, monkeypatch):
    """kernels/triton_launch.py: a key's first launch goes through Triton, later ones launch its compiled kernel
    with the new call's tensors. Calls on fresh data each match the oracle, and none goes through Triton again."""
    from kernels import triton_launch

    check_case(case, dtype, device, seed=0)
    through_triton = []
    first_launch = triton_launch._first_launch
    monkeypatch.setattr(triton_launch, "_first_launch", lambda kernel, *rest: through_triton.append(kernel) or first_launch(kernel, *rest))
    for seed in (1, 2):
        check_case(case, dtype, device, seed=seed)
    assert through_triton == []


@pytest.mark.parametrize("device", [pytest.param("cuda", id="cuda", marks=GPU)])
def test_an_unaligned_input_gets_its_own_compiled_kernel(device, ieee_float32):
    """Triton compiles 16-byte-aligned pointers into vector loads: a channels-last input 4 bytes off alignment
    (used as is, no copy) after an aligned one of the same shape must not reuse the aligned kernel."""
    case = Case("aligned_then_not", in_channels=16, out_channels=16, padding=1, size=(6, 6), layout="channels_last")
    input, weight, bias = make_inputs(case, torch.float32, device)
    batch, channels, height, width = input.shape
    shifted = torch.empty(input.numel() + 1, device=device)[1:].view(batch, height, width, channels)
    unaligned = shifted.copy_(input.detach().permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    assert unaligned.data_ptr() % 16 != 0 and unaligned.is_contiguous(memory_format=torch.channels_last)
    exact = torch_conv(case, input.detach().double(), weight.detach().double(), bias.detach().double())
    for x in (input.detach(), unaligned, input.detach()):
        assert_parity("output", our_conv(case, x, weight.detach(), bias.detach(), "triton"), exact, torch.float32)


@pytest.mark.parametrize("device", [pytest.param("cuda", id="cuda", marks=GPU)])
def test_cuda_graph_capture_replays_forward_and_backward(device, ieee_float32):
    """A forward+backward captured in a CUDA graph (after a warm-up that tunes and compiles) replays on new data
    copied into the captured inputs and matches the oracle: nothing in our path syncs with the host or keeps
    a launch argument that changes between replays. How users remove the host cost docs/gpu.md measures."""
    case = Case("graphed", in_channels=16, out_channels=16, stride=2, padding=1, size=(9, 9), layout="channels_last")
    static = [leaf.detach().clone().requires_grad_() for leaf in make_inputs(case, torch.float32, device)]
    grad_output = torch.randn(our_conv(case, *static, "triton").shape, generator=seeded(3)).to(device)

    def step():
        output = our_conv(case, *static, "triton")
        return (output.detach(), *torch.autograd.grad(output, static, grad_output))

    graph, captured = capture(step)  # bench_gpu's recipe: this test checks what its --graphs figures time
    for seed in (1, 2):
        fresh = make_inputs(case, torch.float32, device, seed)
        with torch.no_grad():
            for target, source in zip(static, fresh):
                target.copy_(source)
        graph.replay()
        exact_leaves = [leaf.detach().double().requires_grad_() for leaf in fresh]
        exact = torch_conv(case, *exact_leaves)
        expected = (exact.detach(), *torch.autograd.grad(exact, exact_leaves, grad_output.double()))
        for name, actual, wanted in zip(("output", *GRAD_NAMES), captured, expected):
            assert_parity(name, actual, wanted, torch.float32)


@pytest.mark.parametrize("device", [pytest.param("cpu", id="cpu", marks=CPU), pytest.param("cuda", id="cuda", marks=GPU)])
def test_grad_weight_is_deterministic(device):
    """Split-K partials are summed in split order: two runs give bitwise-equal grad_weight."""
    case = Case("splits", in_channels=8, out_channels=8, padding=1, size=(7, 6))
    input, weight, bias = make_inputs(case, torch.float32, device)
    grad_output = torch.randn(2, 8, 7, 6, generator=seeded(2)).to(device)
    first = grads(our_conv(case, input, weight, bias, "triton"), grad_output, [weight])[0]
    second = grads(our_conv(case, input, weight, bias, "triton"), grad_output, [weight])[0]
    assert torch.equal(first, second)


@pytest.mark.parametrize("device", [pytest.param("cpu", id="cpu", marks=CPU), pytest.param("cuda", id="cuda", marks=GPU)])
@pytest.mark.parametrize("weight_layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("case", [c for c in ALL_CASES if c.id in ("per_tap_k_tiles", "depthwise_stride2")], ids=lambda case: case.id)
def test_grad_weight_comes_in_the_weights_layout(case, weight_layout, device):
    """grad_weight is laid out like the weight (as cuDNN returns it), with the oracle's values."""
    input, weight, bias = make_inputs(case, torch.float32, device)
    if weight_layout == "channels_last":
        weight = weight.contiguous(memory_format=torch.channels_last)
    output = our_conv(case, input, weight, bias, "triton")
    grad_output = torch.randn(output.shape, generator=seeded(3)).to(device)
    ours = grads(output, grad_output, [weight])[0]
    exact_weight = weight.detach().double().requires_grad_()
    expected = grads(torch_conv(case, input.detach().double(), exact_weight, None), grad_output.double(), [exact_weight])[0]
    assert ours.stride() == weight.stride()
    assert_parity("grad_weight", ours, expected, torch.float32)


DEPTHWISE_WEIGHTS = {
    "contiguous": lambda w: w,
    "channels_last": lambda w: w.contiguous(memory_format=torch.channels_last),
    "taps_transposed": lambda w: w.transpose(2, 3).contiguous().transpose(2, 3),  # kw has the big stride
    "sliced": lambda w: torch.cat([w, torch.zeros_like(w)], dim=3)[..., : w.shape[3]],  # rows not one tap stride apart
}


@pytest.mark.parametrize("device", [pytest.param("cpu", id="cpu", marks=CPU), pytest.param("cuda", id="cuda", marks=GPU)])
@pytest.mark.parametrize("kernel_size", [(3, 3), (1, 3), (3, 1)], ids=lambda k: f"{k[0]}x{k[1]}")
@pytest.mark.parametrize("weight_layout", DEPTHWISE_WEIGHTS)
def test_depthwise_reads_the_weight_through_its_strides(weight_layout, kernel_size, device):
    """The depthwise kernels read the weight where it lies when its taps sit at one stride, else a copy
    (triton_depthwise.tap_strides): output, grad_input and grad_weight against the oracle for each."""
    case = Case("depthwise_weight", in_channels=4, out_channels=8, groups=4, kernel_size=kernel_size, padding=1, stride=2, bias=False)
    input, weight, _ = make_inputs(case, torch.float32, device)
    weight = DEPTHWISE_WEIGHTS[weight_layout](weight.detach()).requires_grad_()
    output = our_conv(case, input, weight, None, "triton")
    grad_output = torch.randn(output.shape, generator=seeded(4)).to(device)
    ours = (output, *grads(output, grad_output, [input, weight]))
    exact_leaves = [input.detach().double().requires_grad_(), weight.detach().double().requires_grad_()]
    exact = torch_conv(case, *exact_leaves, None)
    for name, actual, expected in zip(
        ("output", "grad_input", "grad_weight"), ours, (exact, *grads(exact, grad_output.double(), exact_leaves))
    ):
        assert_parity(name, actual, expected.detach(), torch.float32)


@pytest.mark.parametrize("device", [pytest.param("cpu", id="cpu", marks=CPU), pytest.param("cuda", id="cuda", marks=GPU)])
@pytest.mark.parametrize("case", [c for c in ALL_CASES if c.id in ("basic", "depthwise", "stem_c3_7x7_s2")], ids=lambda case: case.id)
def test_math_runs_in_triton_not_torch(case, device):
    """Forward and backward dispatch no torch conv op and no torch multiply: the arithmetic is in our kernels."""
    input, weight, bias = make_inputs(case, torch.float32, device)
    with OpSpy() as spy:
        output = our_conv(case, input, weight, bias, "triton")
        torch.autograd.grad(output, [input, weight, bias], torch.ones_like(output))
    assert forbidden(spy.ops) == [], f"torch conv ops in {sorted(set(spy.ops))}"
    assert multiplies(spy.ops) == [], f"torch multiplies in {sorted(set(spy.ops))}"
    assert {"triton.conv_forward", "triton.conv_grad_input", "triton.conv_grad_weight"} <= set(launches(spy.ops)) or {
        "triton.depthwise_forward",
        "triton.depthwise_grad_input",
        "triton.depthwise_grad_weight",
    } <= set(launches(spy.ops)), f"not every pass launched our kernels: {launches(spy.ops)}"
    assert any("sum" in op for op in spy.ops), "the spy saw nothing (grad_bias's sum should be there)"


@CPU
def test_double_backward_falls_back_to_im2col():
    """double_backward is False: create_graph=True differentiates through im2col's backward instead."""
    case = Case("double", padding=1)
    input, weight, bias = make_inputs(case, torch.float32, "cpu")
    output = our_conv(case, input, weight, bias, "triton")
    (grad_input,) = torch.autograd.grad(output.square().sum(), input, create_graph=True)
    (second,) = torch.autograd.grad(grad_input.sum(), weight)
    exact_input, exact_weight = input.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    exact_output = torch_conv(case, exact_input, exact_weight, bias.detach().double())
    (exact_grad_input,) = torch.autograd.grad(exact_output.square().sum(), exact_input, create_graph=True)
    (exact_second,) = torch.autograd.grad(exact_grad_input.sum(), exact_weight)
    assert_parity("d(grad_input)/d(weight)", second, exact_second, torch.float32)


@CPU
def test_double_backward_fallback_keeps_im2col_within_its_limits(restore_limits):
    # triton's own loop bound (stride phases: 1) passes; im2col's (9 taps and its blocks: 20) does not.
    kernels.set_limits(loop_iterations=5)
    case = Case("double_limit", padding=1)
    input, weight, bias = make_inputs(case, torch.float32, "cpu")
    output = our_conv(case, input, weight, bias, "triton")
    with pytest.raises(kernels.WorkTooLarge, match="'im2col'"):
        torch.autograd.grad(output.square().sum(), input, create_graph=True)


@pytest.mark.parametrize(
    ("stride", "padding", "size", "kernel", "dilation"),
    [
        ((2, 3), (1, 0), (9, 8), (3, 3), (1, 2)),
        ((5, 1), (2, 2), (4, 7), (2, 3), (2, 1)),
        ((1001, 1001), (500, 500), (1, 1), (1, 1), (1, 1)),
    ],
)
def test_stride_phases_partition_the_pixels_and_skip_empty_phases(stride, padding, size, kernel, dilation, monkeypatch):
    """Every input pixel is in exactly one phase, and empty phases are never visited: a stride of 1001 on one
    pixel is one phase, where the old walk over all 1,002,001 took 6.5 s of Python per backward."""
    from kernels import triton_grad_input
    from kernels.params import normalize

    visits = []
    phase_taps = triton_grad_input._phase_taps
    monkeypatch.setattr(triton_grad_input, "_phase_taps", lambda *args: visits.append(args) or phase_taps(*args))
    input, weight = torch.empty(1, 1, *size), torch.empty(1, 1, *kernel)
    spec = normalize(input, weight, None, stride, padding, dilation, 1, "zeros")
    phases = triton_grad_input.stride_phases(spec, *size, *kernel)
    assert len(phases) == min(stride[0], size[0]) * min(stride[1], size[1])
    assert len(visits) <= min(stride[0], size[0]) + min(stride[1], size[1])
    pixels = [
        (phase.first_row + t * stride[0], phase.first_col + u * stride[1])
        for phase in phases
        for t in range(phase.phase_rows)
        for u in range(phase.phase_cols)
    ]
    assert sorted(pixels) == [(y, x) for y in range(size[0]) for x in range(size[1])]
    for phase in phases:  # the taps a phase lists reach its pixels: (pixel + pad - tap * dil) is a multiple of stride
        for i in range(phase.taps_h):
            assert (phase.first_row + padding[0] - (phase.tap0_h + i * phase.tap_step_h) * dilation[0]) % stride[0] == 0


def test_support_lists_cpu_only_under_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert triton_conv.TritonConv().support().devices == ("cuda",)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    support = triton_conv.TritonConv().support()
    assert support.devices == ("cuda", "cpu")
    assert "float64" not in support.dtypes and "float64" in support.notes
    assert support.double_backward is False


@CPU
def test_refuses_float64_and_interpreted_bfloat16():
    algorithm = kernels.get("triton")
    spec = kernels.params.ConvSpec((1, 1), (0, 0, 0, 0), (1, 1), 1)
    weight = torch.zeros(2, 2, 1, 1)
    with pytest.raises(UnsupportedProblem, match="float64"):
        algorithm.check(torch.zeros(1, 2, 3, 3, dtype=torch.float64), weight.double(), spec)
    with pytest.raises(UnsupportedProblem, match="bfloat16"):
        algorithm.check(torch.zeros(1, 2, 3, 3, dtype=torch.bfloat16), weight.bfloat16(), spec)


@pytest.mark.parametrize(
    ("dtype", "device", "matmul", "cudnn", "expected"),
    [
        (torch.float32, "cuda", False, False, "ieee"),
        (torch.float32, "cuda", True, False, "ieee"),
        (torch.float32, "cuda", False, True, "ieee"),
        (torch.float32, "cuda", True, True, "tf32"),
        (torch.float32, "cpu", True, True, "ieee"),
        (torch.bfloat16, "cuda", False, False, "tf32"),
    ],
)
def test_tf32_is_read_from_torch_flags_at_call_time(ieee_float32, dtype, device, matmul, cudnn, expected):
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
    assert triton_conv._dot_precision(dtype, torch.device(device)) == expected


@pytest.mark.parametrize(("stride", "dilation", "kernel"), [(1, 1, 3), (2, 1, 3), (2, 2, 3), (3, 2, 5), (4, 6, 4), (2, 1, 1)])
def test_stride_phases_partition_the_kernel_taps(stride, dilation, kernel):
    """Every tap belongs to exactly one phase: the phase split loses and repeats no work."""
    from kernels.triton_grad_input import _phase_taps

    covered = []
    for phase in range(stride):
        first, step, count = _phase_taps(phase, stride, dilation, kernel)
        taps = [first + q * step for q in range(count)]
        assert all((tap * dilation - phase) % stride == 0 for tap in taps)
        covered += taps
    assert sorted(covered) == list(range(kernel))


@pytest.fixture
def gpu_prune(monkeypatch):
    """The GPU's config space (autotuning on, no interpreter) and its prune with no tile caps: (configs, prune)."""
    from kernels import triton_tuning

    monkeypatch.setattr(triton_tuning, "interpreting", lambda: False)
    monkeypatch.setenv("CONV_TRITON_AUTOTUNE", "1")
    prune = triton_tuning.prune(lambda args: {"BLOCK_M": 1024, "BLOCK_N": 1024, "BLOCK_K": 1024})["early_config_prune"]
    return triton_tuning.configs, prune


@pytest.mark.parametrize(
    ("dtype", "precision", "register_path"),
    [(torch.float32, "tf32", True), (torch.bfloat16, "tf32", False), (torch.float32, "ieee", False)],
)
def test_one_stage_tiles_are_offered_for_tf32_grad_weight_only(gpu_prune, dtype, precision, register_path):
    """grad_weight's autotuner also tries one-stage (register path) tiles, and only for 4-byte tensor-core operands."""
    configs, prune = gpu_prune
    pointers = {name: torch.empty(1, dtype=dtype) for name in ("input_ptr", "grad_output_ptr")}
    pointers["workspace_ptr"] = torch.empty(1, dtype=torch.float32)
    kept = prune(configs(register_path=True), {**pointers, "PRECISION": precision})
    one_stage = [config for config in kept if config.num_stages == 1]
    assert bool(one_stage) == register_path
    assert all(set(config.kwargs) == {"BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M"} for config in kept)  # markers dropped
    # Without register_path (forward, grad_input) no one-stage tile is ever offered.
    assert not [c for c in prune(configs(), {**pointers, "PRECISION": precision}) if c.num_stages == 1]


def test_a_float32_workspace_does_not_make_16_bit_operands_four_byte(gpu_prune):
    """A split forward writes float32 partials through output_ptr: bf16 operands still get the 64-deep K tiles."""
    configs, prune = gpu_prune

    def deepest_k(operand_dtype):
        args = {"input_ptr": torch.empty(1, dtype=operand_dtype), "weight_ptr": torch.empty(1, dtype=operand_dtype)}
        args["output_ptr"] = torch.empty(1, dtype=torch.float32)
        return max(config.kwargs["BLOCK_K"] for config in prune(configs(), {**args, "PRECISION": "tf32"}))

    assert deepest_k(torch.bfloat16) == 64
    assert deepest_k(torch.float32) == 32
