"""Argument normalisation shared by every algorithm: one place that knows conv2d's rules.

`normalize` turns the user-facing arguments of `kernels.conv2d` (ints, tuples, "same", "valid",
a padding mode) into a `ConvSpec` that algorithms consume, and raises the same exception types as
`torch.nn.functional.conv2d` / `nn.Conv2d` for what they reject.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kernels.memo import BoundedMemo

IntPair = int | Sequence[int]
PaddingArg = int | Sequence[int] | str

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


@dataclass(frozen=True)
class ConvSpec:
    """A fully normalised 2-D convolution with zero padding on each side.

    `padding` is (top, bottom, left, right): "same" with an even kernel pads unevenly, as torch does.
    Algorithms only ever see zero padding; other padding modes are applied before them.
    """

    stride: tuple[int, int]
    padding: tuple[int, int, int, int]
    dilation: tuple[int, int]
    groups: int

    def output_size(self, in_height: int, in_width: int, kernel_height: int, kernel_width: int) -> tuple[int, int]:
        top, bottom, left, right = self.padding
        out_height = (in_height + top + bottom - self.dilation[0] * (kernel_height - 1) - 1) // self.stride[0] + 1
        out_width = (in_width + left + right - self.dilation[1] * (kernel_width - 1) - 1) // self.stride[1] + 1
        return out_height, out_width

    def with_padding(self, padding: tuple[int, int, int, int]) -> ConvSpec:
        return ConvSpec(self.stride, padding, self.dilation, self.groups)


def integer(value: object) -> int | None:
    """`value` as an int where torch's argument parser takes it as one: an int, numpy's integers (configs read
    through numpy), a 0-d integer tensor; None for anything else, bool included."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_floating_point() and not value.is_complex():
        return None if value.dtype == torch.bool else int(value)
    return None


def pair(value: IntPair, name: str) -> tuple[int, int]:
    """An int or a 1- or 2-sequence of ints as (h, w), with torch's error for other lengths."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a pair of ints, got bool")
    if (single := integer(value)) is not None:
        return (single, single)
    if isinstance(value, torch.Tensor) and value.dim() == 0:
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    values = tuple(value)
    if len(values) == 1:
        values = values * 2
    if len(values) != 2:
        raise RuntimeError(
            f"expected {name} to be a single integer value or a list of 2 values to match the "
            f"convolution dimensions, but got {name}={list(values)}"
        )
    ints = [integer(item) for item in values]
    for item, number in zip(values, ints):
        if number is None:
            raise TypeError(f"{name} must contain ints, got {item!r}")
    return (ints[0], ints[1])


def same_padding(kernel_size: tuple[int, int], dilation: tuple[int, int]) -> tuple[int, int, int, int]:
    """Padding that keeps H and W for stride 1; the odd extra pixel goes bottom/right, as in torch."""
    sides = []
    for k, d in zip(kernel_size, dilation):
        total = d * (k - 1)
        sides += [total // 2, total - total // 2]
    return (sides[0], sides[1], sides[2], sides[3])


def resolve_padding(
    padding: PaddingArg, kernel_size: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int]
) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) for an int, a pair, "same" or "valid"."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0, 0, 0)
        if padding == "same":
            if stride != (1, 1):
                # RuntimeError, as F.conv2d raises (nn.Conv2d's constructor raises ValueError before we run).
                raise RuntimeError("padding='same' is not supported for strided convolutions")
            return same_padding(kernel_size, dilation)
        # RuntimeError, as F.conv2d raises (nn.Conv2d's constructor raises ValueError before we run).
        raise RuntimeError(f"Invalid padding string: {padding!r}, expected 'same', 'valid' or ints")
    pad_h, pad_w = pair(padding, "padding")
    return (pad_h, pad_h, pad_w, pad_w)


def check_padding_mode(padding_mode: str) -> None:
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {set(PADDING_MODES)}, but got padding_mode={padding_mode!r}")


def call_key(
    input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride, padding, dilation, groups, padding_mode
) -> tuple:
    """What `normalize`'s answer depends on: shapes, dtypes and devices, and the arguments as written.

    The arguments enter by repr, so values that compare equal but validate differently (True and 1,
    a list and a tuple) are different keys."""
    return (
        input.shape,
        input.dtype,
        input.device,
        weight.shape,
        weight.dtype,
        weight.device,
        None if bias is None else (bias.shape, bias.dtype, bias.device),
        repr(stride),
        repr(padding),
        repr(dilation),
        repr(groups),
        repr(padding_mode),
    )


# Validated calls by `call_key`: validating took ~20 us of a seed-sized conv's ~80. Errors are not
# cached (they raise every time).
_SPECS = BoundedMemo(1024)


def normalize(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: IntPair,
    padding: PaddingArg,
    dilation: IntPair,
    groups: int,
    padding_mode: str,
) -> ConvSpec:
    """Validate a batched conv2d call (input (N, C_in, H, W), weight (C_out, C_in/groups, kH, kW)).

    Raises RuntimeError / ValueError with torch's wording where torch rejects the same call.
    """
    key = call_key(input, weight, bias, stride, padding, dilation, groups, padding_mode)
    spec = _SPECS.get(key)
    if spec is None:
        spec = _SPECS.remember(key, _validate(input, weight, bias, stride, padding, dilation, groups, padding_mode))
    return spec


def _validate(input, weight, bias, stride, padding, dilation, groups, padding_mode) -> ConvSpec:
    """`normalize` without the cache."""
    check_padding_mode(padding_mode)
    if weight.dim() != 4:
        raise RuntimeError(f"Expected 4D weight (C_out, C_in/groups, kH, kW) for conv2d, but got weight of size {list(weight.shape)}")
    if input.dim() != 4:
        raise RuntimeError(f"Expected 3D (unbatched) or 4D (batched) input to conv2d, but got input of size: {list(input.shape)}")
    stride_hw = pair(stride, "stride")
    dilation_hw = pair(dilation, "dilation")
    if min(stride_hw) <= 0:
        raise RuntimeError("non-positive stride is not supported")
    if min(dilation_hw) <= 0:
        raise RuntimeError(f"dilation should be greater than zero, but got {list(dilation_hw)}")
    if (number := integer(groups)) is None:
        raise TypeError(f"groups must be an int, got {groups!r}")
    groups = number
    if groups <= 0:
        raise RuntimeError("non-positive groups is not supported")
    out_channels, in_per_group, kernel_height, kernel_width = weight.shape
    if out_channels < groups or out_channels % groups:
        raise RuntimeError(
            f"Given groups={groups}, expected weight to be divisible by {groups} at dimension 0, "
            f"but got weight of size {list(weight.shape)} instead"
        )
    if input.shape[1] != in_per_group * groups:
        raise RuntimeError(
            f"Given groups={groups}, weight of size {list(weight.shape)}, expected input{list(input.shape)} to have "
            f"{in_per_group * groups} channels, but got {input.shape[1]} channels instead"
        )
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != out_channels):
        raise RuntimeError(
            f"Given weight of size {list(weight.shape)}, expected bias to be 1-dimensional with "
            f"{out_channels} elements, but got bias of size {list(bias.shape)} instead"
        )
    for other, what in ((weight, "weight"), (bias, "bias")):
        if other is not None and other.dtype != input.dtype:
            raise RuntimeError(f"Input type ({input.dtype}) and {what} type ({other.dtype}) should be the same")
        if other is not None and other.device != input.device:
            raise RuntimeError(f"Input ({input.device}) and {what} ({other.device}) should be on the same device")
    pads = resolve_padding(padding, (kernel_height, kernel_width), stride_hw, dilation_hw)
    if min(pads) < 0:
        raise RuntimeError("negative padding is not supported")
    in_height, in_width = input.shape[2:]
    top, bottom, left, right = pads
    padded = (in_height + top + bottom, in_width + left + right)
    span = (dilation_hw[0] * (kernel_height - 1) + 1, dilation_hw[1] * (kernel_width - 1) + 1)
    if padded[0] < span[0] or padded[1] < span[1]:
        raise RuntimeError(
            f"Calculated padded input size per channel: ({padded[0]} x {padded[1]}). Kernel size: "
            f"({span[0]} x {span[1]}). Kernel size can't be greater than actual input size"
        )
    if input.numel() == 0 and input.shape[0] and input.shape[1]:
        # torch runs an empty batch (or zero channels) but refuses an empty image, even when padding would make room.
        raise RuntimeError(f"Only zero batch or zero channel inputs are supported, but got input shape: {list(input.shape)}")
    if padding_mode != "zeros" and any(pads):
        check_mode_padding(padding_mode, pads, in_height, in_width)
    return ConvSpec(stride_hw, pads, dilation_hw, groups)


def check_mode_padding(padding_mode: str, pads: tuple[int, int, int, int], in_height: int, in_width: int) -> None:
    """The limits torch's reflect / circular padding impose, with the offending side named."""
    for before, after, size, axis in ((pads[0], pads[1], in_height, "height"), (pads[2], pads[3], in_width, "width")):
        widest = max(before, after)
        if padding_mode == "reflect" and widest >= size:
            raise RuntimeError(
                f"Padding size should be less than the corresponding input dimension, but got: "
                f"padding ({before}, {after}) at dimension {axis} of size {size} (reflect)"
            )
        if padding_mode == "circular" and widest > size:
            raise RuntimeError(
                f"Padding value causes wrapping around more than once: padding ({before}, {after}) at {axis} of size {size} (circular)"
            )
        if padding_mode == "replicate" and size == 0 and widest:
            raise RuntimeError(f"replicate padding needs a non-empty {axis}")
