"""Depthwise conv (one input channel per group, channel multiplier m) as tap-wise multiply-adds.

A depthwise conv has no reduction over channels, so it is not a GEMM: every output channel is
sum_taps weight[c, tap] * window_tap(input[c]). Each tap is one fused elementwise pass (addcmul_)
over strided views, with the per-channel weight broadcast as (C, 1, 1), in whatever memory format
the input has (NCHW or channels_last), so the result already has the format nn.Conv2d returns.

No padded copy is made: each tap only touches the output positions whose input pixel lies inside
the image (`_tap_region`); the zero padding contributes nothing. That saves an input-sized
allocation, fill and copy in forward and again in backward, which matter here because the
arithmetic is so light. Output channel c*m + k reads input channel c, so multipliers loop over k
with strided channel slices instead of 5-D broadcasts.

Backward: grad_input scatters each tap back (region += grad * weight), grad_weight is one
per-channel dot product per tap over (N, H_out, W_out). In-place accumulation stays
differentiable for double backward: addcmul_ saves its operands, not the accumulator, and
in-place writes into views of a fresh tensor are recorded.
"""

from __future__ import annotations

import torch

from kernels.base import ConvAlgorithm, Support, UnsupportedProblem, register
from kernels.params import ConvSpec
from kernels.precision import HALF, narrowed, widened


def _axis_region(size: int, out_size: int, before: int, stride: int, offset: int) -> tuple[slice, slice] | None:
    """(output slice, input slice) along one axis where output o reads input o*stride + offset - before in [0, size)."""
    shift = offset - before
    first = max(0, -(shift // stride) if shift < 0 else 0)  # smallest o with o*stride + shift >= 0
    last = min(out_size, (size - 1 - shift) // stride + 1) if size - 1 - shift >= 0 else 0  # one past the largest valid o
    if first >= last:
        return None
    start = first * stride + shift
    return slice(first, last), slice(start, start + (last - first - 1) * stride + 1, stride)


def _tap_region(
    spec: ConvSpec, i: int, j: int, in_hw: tuple[int, int], out_hw: tuple[int, int]
) -> tuple[tuple[slice, slice], tuple[slice, slice]] | None:
    """((out rows, out cols), (in rows, in cols)) that kernel tap (i, j) connects inside the unpadded image, or None."""
    top, _, left, _ = spec.padding
    rows = _axis_region(in_hw[0], out_hw[0], top, spec.stride[0], i * spec.dilation[0])
    cols = _axis_region(in_hw[1], out_hw[1], left, spec.stride[1], j * spec.dilation[1])
    if rows is None or cols is None:
        return None
    return (rows[0], cols[0]), (rows[1], cols[1])


def _taps(spec: ConvSpec, kernel: tuple[int, int], in_hw: tuple[int, int], out_hw: tuple[int, int]):
    """(i, j, (out rows, out cols), (in rows, in cols)) for every tap that touches the image."""
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            region = _tap_region(spec, i, j, in_hw, out_hw)
            if region is not None:
                yield i, j, region[0], region[1]


def _covers(region: tuple[slice, slice], out_hw: tuple[int, int]) -> bool:
    return region[0] == slice(0, out_hw[0]) and region[1] == slice(0, out_hw[1])


class Depthwise(ConvAlgorithm):
    name = "depthwise"

    def support(self) -> Support:
        return Support(
            notes="depthwise only (C_in/groups == 1, any multiplier): one fused multiply-add per kernel tap, no padded copy",
        )

    def check(self, input: torch.Tensor, weight: torch.Tensor, spec: ConvSpec) -> None:
        super().check(input, weight, spec)
        if weight.shape[1] != 1 or spec.groups != input.shape[1]:
            raise UnsupportedProblem(
                f"algorithm 'depthwise' needs groups == C_in (one input channel per group), got groups={spec.groups}, C_in={input.shape[1]}"
            )

    def forward(self, input, weight, bias, spec):
        """input (N, C, H, W), weight (C*m, 1, kH, kW) -> (N, C*m, H_out, W_out) in input's memory format."""
        if input.dtype in HALF:  # float32 inside, one rounding at the end (kernels/precision.py)
            return self.forward(*widened(input, weight, bias), spec).to(input.dtype)
        channels, multiplier = input.shape[1], weight.shape[0] // input.shape[1]
        kernel = tuple(weight.shape[2:])
        in_hw = tuple(input.shape[2:])
        out_hw = spec.output_size(*in_hw, *kernel)
        memory_format = torch.channels_last if _channels_last(input) else torch.contiguous_format
        taps = list(_taps(spec, kernel, in_hw, out_hw))
        # A tap that reads a valid pixel for every output (the centre one, usually) writes first:
        # one pass fewer than zero-filling and accumulating.
        first = next((tap for tap in taps if _covers(tap[2], out_hw)), None)
        channel_blocks = []
        for k in range(multiplier):
            scale = weight[k::multiplier, 0]  # (C, kH, kW): output channels c*m + k
            output = torch.empty((input.shape[0], channels, *out_hw), dtype=input.dtype, device=input.device, memory_format=memory_format)
            if first is None:
                output.zero_()
            else:
                i, j, _, (rows, cols) = first
                torch.mul(input[:, :, rows, cols], scale[:, i, j].view(-1, 1, 1), out=output)
            for tap in taps:
                if tap is not first:
                    i, j, (out_rows, out_cols), (rows, cols) = tap
                    output[:, :, out_rows, out_cols].addcmul_(input[:, :, rows, cols], scale[:, i, j].view(-1, 1, 1))
            if bias is not None:
                output += bias[k::multiplier].view(-1, 1, 1)
            channel_blocks.append(output)
        if multiplier == 1:
            return channel_blocks[0]
        return torch.stack(channel_blocks, dim=2).flatten(1, 2)  # (N, C, m, H_out, W_out): channel c*m + k

    def backward(self, grad_output, input, weight, spec, need_input, need_weight):
        if input.dtype in HALF:
            grad_input, grad_weight = self.backward(*widened(grad_output, input, weight), spec, need_input, need_weight)
            return narrowed(grad_input, input.dtype), narrowed(grad_weight, weight.dtype)
        channels, multiplier = input.shape[1], weight.shape[0] // input.shape[1]
        kernel = tuple(weight.shape[2:])
        in_hw, out_hw = tuple(input.shape[2:]), tuple(grad_output.shape[2:])
        taps = list(_taps(spec, kernel, in_hw, out_hw))
        grad_input = torch.zeros_like(input) if need_input else None
        grad_weight = weight.new_zeros(channels, multiplier, *kernel) if need_weight else None
        # One reused buffer for grad * input: a fresh output-sized temporary per tap costs page
        # faults. Not under grad mode, where autograd may keep each product.
        buffer = None if torch.is_grad_enabled() or grad_weight is None else torch.empty_like(grad_output[:, :channels])
        for k in range(multiplier):
            grad = grad_output[:, k::multiplier]  # (N, C, H_out, W_out) for output channels c*m + k
            scale = weight[k::multiplier, 0]
            for i, j, (out_rows, out_cols), (rows, cols) in taps:
                grad_region = grad[:, :, out_rows, out_cols]
                if grad_weight is not None:
                    # Reduce the contiguous (H, W) axes first, then the batch: a (0, 2, 3) reduction
                    # that keeps the middle axis vectorises poorly.
                    products = grad_region * input[:, :, rows, cols] if buffer is None else buffer[:, :, out_rows, out_cols]
                    if buffer is not None:
                        torch.mul(grad_region, input[:, :, rows, cols], out=products)
                    grad_weight[:, k, i, j] = products.sum(dim=(2, 3)).sum(dim=0)
                if grad_input is not None:
                    grad_input[:, :, rows, cols].addcmul_(grad_region, scale[:, i, j].view(-1, 1, 1))
        if grad_weight is not None:
            grad_weight = grad_weight.view(weight.shape)  # (C, m, kH, kW) -> (C*m, 1, kH, kW): index c*m + k
        return grad_input, grad_weight


def _channels_last(tensor: torch.Tensor) -> bool:
    return tensor.is_contiguous(memory_format=torch.channels_last) and not tensor.is_contiguous()


register(Depthwise())
