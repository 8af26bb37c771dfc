"""The conv2d parameter grid and helpers shared by the kernel tests.

The oracle is torch itself: `nn.Conv2d._conv_forward` (F.conv2d plus nn.Conv2d's padding modes)
on a module built on the meta device, so the oracle applies exactly nn.Conv2d's rules for
"same" padding and padding_mode without us re-implementing them.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import kernels
from kernels import compiled, gemm
from kernels.params import normalize
from kernels.tolerances import tolerance

CUDA = torch.cuda.is_available()
DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(not CUDA, reason="needs CUDA")),
]


def cpu_algorithms() -> list[str]:
    """Registered algorithms that run on CPU, then "auto".

    Triton has its own test file (it only runs under the interpreter without CUDA, far too slowly
    for this grid), so it is left out even where its Support lists a device we have.
    """
    support = kernels.algorithms()
    names = [name for name in kernels.names() if name != "auto" and name != "triton" and "cpu" in support[name]["devices"]]
    return [*names, "auto"]


ALGORITHMS = cpu_algorithms()


@dataclass(frozen=True)
class Case:
    """One conv2d problem. `batch=None` means unbatched (C, H, W) input.

    layout: "contiguous", "noncontiguous" (a strided view of a bigger tensor), "channels_last"
    (input), "channels_last_weight", or "channels_last_both".
    """

    id: str
    in_channels: int = 3
    out_channels: int = 4
    kernel_size: tuple[int, int] = (3, 3)
    stride: int | tuple[int, int] = 1
    padding: int | tuple[int, int] | str = 0
    dilation: int | tuple[int, int] = 1
    groups: int = 1
    bias: bool = True
    padding_mode: str = "zeros"
    batch: int | None = 2
    size: tuple[int, int] = (6, 7)
    layout: str = "contiguous"

    def conv_kwargs(self) -> dict:
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups, padding_mode=self.padding_mode)

    def input_shape(self) -> tuple[int, ...]:
        channels_hw = (self.in_channels, *self.size)
        return channels_hw if self.batch is None else (self.batch, *channels_hw)

    def weight_shape(self) -> tuple[int, int, int, int]:
        return (self.out_channels, self.in_channels // self.groups, *self.kernel_size)


# Every item of issue 2's coverage list appears at least once (ids say which).
CASES = [
    Case("basic"),
    Case("int_stride_padding_dilation", stride=2, padding=1, dilation=2, size=(9, 8)),
    Case("tuple_stride_padding_dilation", stride=(2, 1), padding=(1, 2), dilation=(1, 2), size=(7, 9)),
    Case("stride_wider_than_kernel", kernel_size=(2, 2), stride=3, size=(8, 8)),
    Case("same_odd", padding="same"),
    Case("same_even_nonsquare", kernel_size=(4, 2), padding="same"),
    Case("same_dilated_even", kernel_size=(2, 3), dilation=(2, 3), padding="same", size=(7, 9)),
    Case("valid", padding="valid", kernel_size=(2, 3)),
    Case("nonsquare_1x3", kernel_size=(1, 3), padding=(0, 1)),
    Case("nonsquare_3x1", kernel_size=(3, 1), stride=(1, 2)),
    Case("pointwise_1x1", kernel_size=(1, 1)),
    Case("pointwise_strided_groups", kernel_size=(1, 1), in_channels=4, out_channels=6, groups=2, stride=(2, 3), size=(5, 7)),
    Case("pointwise_depthwise_valid", kernel_size=(1, 1), in_channels=3, out_channels=6, groups=3, padding="valid"),
    Case("pointwise_same_dilated", kernel_size=(1, 1), padding="same", dilation=2, bias=False),
    Case("pointwise_unbatched", kernel_size=(1, 1), batch=None),
    Case("pointwise_empty_batch", kernel_size=(1, 1), batch=0),
    Case("pointwise_noncontiguous", kernel_size=(1, 1), layout="noncontiguous", stride=2),
    Case("pointwise_channels_last", kernel_size=(1, 1), layout="channels_last", groups=1),
    Case("pointwise_channels_last_weight", kernel_size=(1, 1), layout="channels_last_weight", in_channels=4, out_channels=2, groups=2),
    Case("groups", in_channels=4, out_channels=6, groups=2, padding=1),
    Case("depthwise", in_channels=4, out_channels=4, groups=4, padding=1),
    Case("depthwise_multiplier", in_channels=3, out_channels=6, groups=3, padding=1, stride=2),
    Case("depthwise_same_even_dilated", in_channels=2, out_channels=2, groups=2, kernel_size=(2, 4), padding="same", dilation=(2, 1)),
    Case("depthwise_tuple_stride_no_bias", in_channels=3, out_channels=3, groups=3, kernel_size=(3, 2), stride=(1, 2), bias=False),
    Case("depthwise_circular_unbatched", batch=None, in_channels=2, out_channels=4, groups=2, padding=(2, 1), padding_mode="circular"),
    Case("depthwise_channels_last_weight", layout="channels_last_weight", in_channels=4, out_channels=8, groups=4, padding=1),
    Case("no_bias", bias=False, padding=1),
    Case("reflect", padding=(1, 2), padding_mode="reflect"),
    Case("replicate", padding=(2, 1), padding_mode="replicate", stride=2),
    Case("circular", padding=(1, 2), padding_mode="circular", dilation=(2, 1)),
    Case("reflect_same_even", kernel_size=(2, 4), padding="same", padding_mode="reflect"),
    Case("circular_same_groups", in_channels=4, out_channels=4, groups=2, padding="same", padding_mode="circular"),
    Case("replicate_depthwise", in_channels=3, out_channels=3, groups=3, padding=1, padding_mode="replicate"),
    Case("unbatched", batch=None, padding=1),
    Case("unbatched_reflect_groups", batch=None, in_channels=4, out_channels=2, groups=2, padding=1, padding_mode="reflect"),
    Case("empty_batch", batch=0, padding=1),
    Case("empty_batch_depthwise", batch=0, in_channels=2, out_channels=4, groups=2),
    Case("empty_batch_channels_last_weight", batch=0, padding=1, layout="channels_last_weight"),  # torch: NCHW all the same
    Case("noncontiguous", layout="noncontiguous", padding=1),
    Case("noncontiguous_depthwise", layout="noncontiguous", in_channels=4, out_channels=4, groups=4),
    Case("channels_last", layout="channels_last", padding=1),
    Case("channels_last_weight", layout="channels_last_weight", padding=1),
    Case("channels_last_both", layout="channels_last_both", stride=2, groups=1),
    Case(
        "channels_last_groups_reflect", layout="channels_last", in_channels=4, out_channels=4, groups=2, padding=1, padding_mode="reflect"
    ),
    # The padded input's layout decides the output's: F.pad keeps channels_last for reflect/replicate on
    # CPU only, and circular never does.
    Case("channels_last_circular", layout="channels_last", padding=(1, 2), padding_mode="circular"),
    Case("channels_last_replicate_zero_pad", layout="channels_last", padding=0, padding_mode="replicate"),
    Case("channels_last_depthwise", layout="channels_last", in_channels=4, out_channels=8, groups=4),
    Case("channels_last_single_channel", layout="channels_last", in_channels=1, out_channels=3, padding=1),
    Case("channels_last_weight_single_channel", layout="channels_last_weight", in_channels=1, out_channels=2, kernel_size=(2, 3)),
]


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _strided_view(tensor: torch.Tensor) -> torch.Tensor:
    """The same values as every other element of a last axis twice as wide: neither contiguous nor channels_last."""
    wide = tensor.new_zeros(*tensor.shape[:-1], tensor.shape[-1] * 2)
    wide[..., ::2] = tensor
    view = wide[..., ::2]
    assert not view.is_contiguous() and not view.is_contiguous(memory_format=torch.channels_last)
    return view


def _channels_last(tensor: torch.Tensor) -> torch.Tensor:
    """NHWC strides, as torch.empty(..., memory_format=torch.channels_last) gives them.

    Not `.contiguous(memory_format=...)`: that keeps NCHW strides on a tensor that is already both
    contiguous and channels_last (one channel, or a depthwise weight), and torch's conv tells the two apart.
    """
    return torch.empty_like(tensor, memory_format=torch.channels_last).copy_(tensor)


def make_inputs(case: Case, dtype: torch.dtype, device: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(input, weight, bias) leaves requiring grad, drawn in float64, rounded to `dtype`, laid out per case."""
    generator = seeded(seed)
    input = torch.randn(case.input_shape(), generator=generator, dtype=torch.float64).to(device, dtype)
    weight = torch.randn(case.weight_shape(), generator=generator, dtype=torch.float64).to(device, dtype)
    bias = torch.randn(case.out_channels, generator=generator, dtype=torch.float64).to(device, dtype) if case.bias else None
    if case.layout == "noncontiguous":
        input = _strided_view(input)
    if case.layout in ("channels_last", "channels_last_both"):
        input = _channels_last(input)
    if case.layout in ("channels_last_weight", "channels_last_both"):
        weight = _channels_last(weight)
    for leaf in (input, weight, bias):
        if leaf is not None:
            leaf.requires_grad_(True)
    return input, weight, bias


def refusal(case: Case, algorithm: str, dtype: torch.dtype = torch.float64, device: str = "cpu") -> str | None:
    """Why `algorithm` refuses this problem (its own UnsupportedProblem message), or None if it runs it."""
    if algorithm == "auto" or (device == "cuda" and not CUDA):
        return None
    input, weight, bias = make_inputs(case, dtype, device)
    batched = input.unsqueeze(0) if case.batch is None else input
    spec = normalize(batched, weight, bias, case.stride, case.padding, case.dilation, case.groups, case.padding_mode)
    try:
        kernels.get(algorithm).accept(batched, weight, spec)
    except kernels.UnsupportedProblem as why:
        return str(why)
    return None


def force_gemm(monkeypatch: pytest.MonkeyPatch, backend: str) -> None:
    """Pin kernels/gemm.py's backend for one test (restored after it); skips where "onednn" cannot run here."""
    if backend == "onednn" and not gemm._onednn_available():
        pytest.skip("this torch build has no oneDNN matmul (torch.ops.mkldnn._linear_pointwise)")
    monkeypatch.setattr(gemm._state, "setting", backend)


def unless_refused(case: Case, algorithm: str, *values, id: str):
    """pytest.param(*values), skipped with the algorithm's own reason where it refuses `case` (as in `grid`)."""
    why = refusal(case, algorithm)
    return pytest.param(*values, id=id, marks=[pytest.mark.skip(reason=why)] if why else [])


def grid(cases: list[Case], algorithms: list[str], dtypes: tuple[torch.dtype, ...], devices: list = DEVICES) -> list:
    """pytest.params of (case, algorithm, dtype, device).

    A combination an algorithm refuses in its own `check` (e.g. shifted_gemm with a stride) is
    skipped with the algorithm's reason rather than run and counted as a pass; that the refusal is
    a clean UnsupportedProblem is tested separately (test_algorithms.py).
    """
    params = []
    for case in cases:
        for algorithm in algorithms:
            for dtype in dtypes:
                for device in devices:
                    device_name, device_marks = device.values[0], list(device.marks)
                    why = refusal(case, algorithm, dtype, device_name)
                    marks = device_marks + ([pytest.mark.skip(reason=why)] if why else [])
                    name = f"{case.id}-{algorithm}-{str(dtype).removeprefix('torch.')}-{device_name}"
                    params.append(pytest.param(case, algorithm, dtype, device_name, marks=marks, id=name))
    return params


def oracle_module(case: Case) -> nn.Conv2d:
    """An nn.Conv2d with the case's hyper-parameters; only its config is used (weights are passed in)."""
    return nn.Conv2d(
        case.in_channels,
        case.out_channels,
        case.kernel_size,
        bias=case.bias,
        device="meta",
        **case.conv_kwargs(),
    )


def torch_conv(case: Case, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """nn.Conv2d's forward for this case, on the given tensors."""
    return oracle_module(case)._conv_forward(input, weight, bias)


def our_conv(case: Case, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, algorithm: str) -> torch.Tensor:
    return kernels.conv2d(input, weight, bias, algorithm=algorithm, **case.conv_kwargs())


def grads(output: torch.Tensor, grad_output: torch.Tensor, leaves: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(output, leaves, grad_output)


def layout_flags(tensor: torch.Tensor) -> tuple[bool, bool]:
    """(contiguous, channels_last): both are checked, since size-1 dims make a tensor both."""
    channels_last = tensor.dim() == 4 and tensor.is_contiguous(memory_format=torch.channels_last)
    return tensor.is_contiguous(), channels_last


GRAD_NAMES = ("grad_input", "grad_weight", "grad_bias")


def assert_parity(name: str, actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """`actual` (in `dtype`) against the float64 oracle `expected`, with the dtype's row of the tolerance table."""
    assert actual.dtype == dtype, f"{name}: dtype {actual.dtype}, expected {dtype}"
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    atol, rtol = tolerance(dtype)
    torch.testing.assert_close(actual.double(), expected, atol=atol, rtol=rtol, msg=lambda message: f"{name}: {message}")


def assert_compiled_ran(before: dict) -> None:
    """Since `before` (kernels.compiled.stats()), something was compiled, and compiled code ran, without a failure."""
    after = compiled.stats()
    assert after["failed"] is None, f"compiling failed: {after['failed']}"
    assert after["compiled"] > before["compiled"], "nothing was compiled"
    assert after["calls"] > before["calls"], "the compiled code did not run"


def assert_matches_oracle(case: Case, algorithm: str, dtype: torch.dtype, seed: int) -> None:
    """Output and every gradient of `algorithm` on `case` in `dtype` against the float64 oracle."""
    input, weight, bias = make_inputs(case, dtype, "cpu", seed=seed)
    leaves = [leaf for leaf in (input, weight, bias) if leaf is not None]
    output = our_conv(case, input, weight, bias, algorithm)
    exact_leaves = [leaf.detach().double().requires_grad_(True) for leaf in leaves]
    exact = torch_conv(case, *exact_leaves, *([None] if bias is None else []))
    assert_parity("output", output, exact, dtype)
    grad_output = torch.randn(exact.shape, generator=seeded(seed + 1), dtype=torch.float64)
    for name, actual, wanted in zip(GRAD_NAMES, grads(output, grad_output.to(dtype), leaves), grads(exact, grad_output, exact_leaves)):
        assert_parity(name, actual, wanted, dtype)


def has_cxx() -> bool:
    """Whether a C++ compiler is here, which Inductor needs (kernels/compiled.py); CI machines have gcc."""
    return bool(os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++"))
