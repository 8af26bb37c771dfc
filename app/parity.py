"""The oracle: nn.Conv2d's own math, and how far our results are from it.

This is the only module that calls torch's convolution. `reference_conv` is what nn.Conv2d computes
(`_conv_forward`): for a non-zero padding mode, F.pad(mode) then F.conv2d with zero padding (asymmetric
for "same" with an even kernel), else F.conv2d with the padding as given. The optional exact oracle is
the same math in float64 on the CPU, against which both ours and torch's results are measured.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from app.codec import json_number

REFERENCE = "torch.nn.functional.conv2d"
EXACT_REFERENCE = "torch.nn.functional.conv2d in float64 on cpu"


@contextmanager
def tf32(allowed: bool, device: torch.device) -> Iterator[None]:
    """TF32 for matmul and cuDNN conv, as the request says, for both ours and the reference; restored after.

    Only CUDA reads these flags, so on other devices this does nothing (setting and restoring them cost
    ~10 us, a few percent of a seed-sized request). The flags are process-wide; device workers run one
    job each, so on a multi-GPU host two workers could overlap here. Each sets the same flags from its
    own request, which is right unless two requests with different allow_tf32 run at the same instant
    on different GPUs.
    """
    if device.type != "cuda":
        yield
        return
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = allowed
    torch.backends.cudnn.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _mode_padding(padding: int | list[int] | str, weight: torch.Tensor, dilation: tuple[int, int]) -> tuple[int, int, int, int]:
    """F.pad's (left, right, top, bottom) for nn.Conv2d's non-zero padding modes.

    Written from nn.Conv2d's own rule rather than taken from kernels/params.py, so the oracle does
    not share code with what it checks.
    """
    if padding == "valid":
        return (0, 0, 0, 0)
    if padding == "same":
        sides: list[int] = []
        for kernel, dil in zip(reversed(weight.shape[2:]), reversed(dilation)):
            total = dil * (kernel - 1)
            sides += [total // 2, total - total // 2]
        return (sides[0], sides[1], sides[2], sides[3])
    pad_h, pad_w = (padding, padding) if isinstance(padding, int) else padding
    return (pad_w, pad_w, pad_h, pad_h)


def _pair(value: int | list[int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (value[0], value[1])


def reference_conv(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: int | list[int],
    padding: int | list[int] | str,
    dilation: int | list[int],
    groups: int,
    padding_mode: str,
) -> torch.Tensor:
    """nn.Conv2d(..., padding_mode)'s forward: input (N, C_in, H, W) or (C_in, H, W) -> output of the same rank."""
    stride_hw, dilation_hw = _pair(stride), _pair(dilation)
    if padding_mode != "zeros":
        padded = F.pad(input, _mode_padding(padding, weight, dilation_hw), mode=padding_mode)
        return F.conv2d(padded, weight, bias, stride_hw, 0, dilation_hw, groups)
    conv_padding = padding if isinstance(padding, str) else _pair(padding)
    return F.conv2d(input, weight, bias, stride_hw, conv_padding, dilation_hw, groups)


# Up to this many elements the comparison runs on Python floats: the seed's 4-element output took
# ~230 us through ~20 tiny float64 torch ops (~4-5 us each) and takes ~10 us this way. The float64
# arithmetic is the same IEEE operations in the same order, so both paths give the same numbers
# (tests/app/test_parity.py checks them against each other, NaN and infinities included).
SMALL_ELEMENTS = 256


def errors(result: torch.Tensor, expected: torch.Tensor, atol: float) -> tuple[float, float]:
    """(max |result - expected|, max |result - expected| / |expected| over |expected| > atol), in float64.

    The relative error skips elements no larger than atol: near zero it measures only the cancellation
    in the sum, which the absolute error already reports. Equal values count as no error, non-finite
    ones included (NaN where both are NaN); a non-finite value on one side only is an infinite error.
    """
    if result.numel() == 0:
        return 0.0, 0.0
    comparison = _small_comparison if result.numel() <= SMALL_ELEMENTS else _chunked_comparison
    max_abs, max_rel, _, _ = comparison(result, expected, atol, None)
    return max_abs, max_rel


# Elements compared at a time: each float64 temporary is 8 MB, where whole tensors (16.7M elements at the
# element limit) made ~1 GB of them.
CHUNK_ELEMENTS = 1 << 20


def _chunked_comparison(result: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float | None) -> tuple[float, float, bool, float]:
    """`_small_comparison`'s figures in float64 torch ops, a chunk at a time."""
    flat_result, flat_expected = result.detach().reshape(-1), expected.detach().reshape(-1)
    max_abs = max_rel = scale = 0.0
    close = True
    for start in range(0, flat_result.numel(), CHUNK_ELEMENTS):
        ours = flat_result[start : start + CHUNK_ELEMENTS].double()
        exact = flat_expected[start : start + CHUNK_ELEMENTS].double()
        same = (ours == exact) | (ours.isnan() & exact.isnan())
        difference = (ours - exact).abs().masked_fill(same, 0.0).nan_to_num(nan=torch.inf, posinf=torch.inf)  # not max float
        magnitude = exact.abs()
        scale = max(scale, magnitude.masked_fill(~magnitude.isfinite(), 0.0).max().item())
        relative = torch.where(magnitude > atol, difference / magnitude, 0.0)
        relative = relative.nan_to_num(nan=torch.inf, posinf=torch.inf).masked_fill(same, 0.0)
        max_abs, max_rel = max(max_abs, difference.max().item()), max(max_rel, relative.max().item())
        if rtol is not None and close:
            close = torch.allclose(ours, exact, rtol=rtol, atol=atol, equal_nan=True)
    return max_abs, max_rel, close, scale


def _small_comparison(result: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float | None) -> tuple[float, float, bool, float]:
    """`errors`, (rtol given) torch.allclose(..., equal_nan=True), and max |expected| over its finite values,
    of a few elements, on Python floats (float64)."""
    max_abs = max_rel = scale = 0.0
    close = True
    for ours, exact in zip(result.detach().reshape(-1).tolist(), expected.detach().reshape(-1).tolist()):
        if math.isfinite(exact):
            scale = max(scale, abs(exact))
        if ours == exact or (ours != ours and exact != exact):  # equal, or both NaN
            continue
        difference = abs(ours - exact)
        if difference != difference:  # one side NaN
            difference = math.inf
        magnitude = abs(exact)
        relative = difference / magnitude if magnitude > atol else 0.0
        max_abs = max(max_abs, difference)
        max_rel = max(max_rel, math.inf if relative != relative else relative)
        # torch.isclose: |a - b| finite and <= atol + |rtol * b|
        if rtol is not None and not (math.isfinite(difference) and difference <= atol + abs(rtol * exact)):
            close = False
    return max_abs, max_rel, close, scale


def compare(result: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float) -> dict:
    """One entry of parity.tensors: max errors, torch.allclose(result, expected, rtol, atol, equal_nan=True),
    and `close`, the verdict: max |result - expected| <= atol + rtol * max |expected| (the tensor's scale).

    allclose holds every element to its own magnitude, which a long sum's near-zero elements cannot meet:
    their rounding error follows the terms' size, not the result's. Two correct float32 grad_weights
    (3,200-term sums, values to 145) differed by 2.5e-4 where an element was near 1, so allclose failed on
    2 to 3 of 5 random backward requests although ours was closer to float64 than torch's. A real fault (a
    missed tap, a wrong index) moves elements by about the terms' size, far past rtol * scale."""
    comparison = _small_comparison if result.numel() <= SMALL_ELEMENTS else _chunked_comparison
    max_abs, max_rel, all_close, scale = comparison(result, expected, atol, rtol)
    close = all_close or (math.isfinite(max_abs) and max_abs <= atol + rtol * scale)
    return {"max_abs_err": json_number(max_abs), "max_rel_err": json_number(max_rel), "allclose": bool(all_close), "close": bool(close)}


def exact_errors(result: torch.Tensor, exact: torch.Tensor, atol: float) -> dict:
    max_abs, max_rel = errors(result.cpu(), exact, atol)
    return {"max_abs_err": json_number(max_abs), "max_rel_err": json_number(max_rel)}
