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


def _wide_planes(tensor: torch.Tensor, pads: tuple[int, int, int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
    """tensor (N, C, H, W) zero-padded by (top, bottom, left, right) >= 0 -> (flat buffer, (H_pad, W_pad)).

    The buffer is the padded NCHW planes back to back plus one spare padded row, so a tap's wide
    window (`_wide_window`) never runs off the end.
    """
    top, bottom, left, right = pads
    batch, channels, height, width = tensor.shape
    padded_hw = (height + top + bottom, width + left + right)
    plane = padded_hw[0] * padded_hw[1]
    flat = tensor.new_zeros(batch * channels * plane + padded_hw[1])
    flat[: batch * channels * plane].view(batch, channels, *padded_hw)[:, :, top : top + height, left : left + width] = tensor
    return flat, padded_hw


def _wide_window(flat: torch.Tensor, shape: tuple[int, int, int], plane: int, offset: int) -> torch.Tensor:
    """(N, C, L) view of `flat` starting `offset` into each padded plane: one tap's input for L wide outputs."""
    batch, channels, length = shape
    return flat.as_strided((batch, channels, length), (channels * plane, plane, 1), offset)


def _wide_depthwise(
    flat: torch.Tensor, shape: tuple[int, int], padded_hw: tuple[int, int], taps: torch.Tensor, offsets: list[int], out_height: int
) -> torch.Tensor:
    """Stride-1 depthwise conv of padded planes -> wide output (N, C, H_out, W_pad); columns >= W_out are garbage.

    taps (C, kH*kW) in the order of `offsets`. Every pass is one addcmul over rows of H_out*W_pad
    contiguous values: far fewer, longer inner loops than per-tap (rows, cols) regions.
    """
    batch, channels = shape
    plane, length = padded_hw[0] * padded_hw[1], out_height * padded_hw[1]
    wide = flat.new_empty(batch, channels, length)
    for t, offset in enumerate(offsets):
        window = _wide_window(flat, (batch, channels, length), plane, offset)
        if t == 0:
            torch.mul(window, taps[:, 0].view(-1, 1), out=wide)
        else:
            wide.addcmul_(window, taps[:, t].view(-1, 1))
    return wide.view(batch, channels, out_height, padded_hw[1])


def _tap_offsets(spec: ConvSpec, kernel: tuple[int, int], padded_width: int) -> list[int]:
    return [i * spec.dilation[0] * padded_width + j * spec.dilation[1] for i in range(kernel[0]) for j in range(kernel[1])]


def _use_wide(input: torch.Tensor, weight: torch.Tensor, spec: ConvSpec) -> bool:
    """The wide path: stride 1, multiplier 1, NCHW, not recorded by autograd (it writes with out=).

    Measured (bench dw 96x28 3x3, 1 thread): forward 1.1 -> 0.74 ms, the region path's short
    (W_out-wide) inner loops were the cost. channels_last input keeps the region path, which
    works in its format.
    """
    return (
        spec.stride == (1, 1)
        and weight.shape[0] == input.shape[1]
        and not torch.is_grad_enabled()
        and not _channels_last(input)
        and input.numel() > 0
    )


class Depthwise(ConvAlgorithm):
    name = "depthwise"

    def support(self) -> Support:
        return Support(
            devices=("cpu", "cuda"),
            dtypes=("float64", "float32", "float16", "bfloat16"),
            double_backward=True,
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
        if _use_wide(input, weight, spec):
            flat, padded_hw = _wide_planes(input, spec.padding)
            offsets = _tap_offsets(spec, kernel, padded_hw[1])
            wide = _wide_depthwise(flat, (input.shape[0], channels), padded_hw, weight.flatten(1), offsets, out_hw[0])
            output = wide[..., : out_hw[1]]
            return output if bias is None else output + bias.view(-1, 1, 1)
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
        if _use_wide(input, weight, spec):
            return self._wide_backward(grad_output, input, weight, spec, need_input, need_weight)
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

    @staticmethod
    def _wide_backward(grad_output, input, weight, spec, need_input, need_weight):
        """Stride 1, multiplier 1: grad_input is the depthwise conv of grad_output padded by (span - 1 - pad)
        with the flipped kernel; grad_weight per tap is a per-channel dot of grad and the tap's wide window."""
        batch, channels, height, width = input.shape
        kernel = tuple(weight.shape[2:])
        out_height, out_width = grad_output.shape[2:]
        top, bottom, left, right = spec.padding
        span_h, span_w = (kernel[0] - 1) * spec.dilation[0], (kernel[1] - 1) * spec.dilation[1]
        grad_input = grad_weight = None
        if need_input:
            pads = (span_h - top, span_h - bottom, span_w - left, span_w - right)
            if min(pads) < 0:  # padding wider than the kernel: crop what the flipped conv would read
                grad_input = Depthwise._wide_grad_input_cropped(grad_output, weight, spec, pads, (height, width))
            else:
                flat, padded_hw = _wide_planes(grad_output, pads)
                offsets = _tap_offsets(spec, kernel, padded_hw[1])
                flipped = weight.flip(2, 3).flatten(1)
                grad_input = _wide_depthwise(flat, (batch, channels), padded_hw, flipped, offsets, height)[..., :width]
        if need_weight:
            flat, padded_hw = _wide_planes(input, spec.padding)
            plane, length = padded_hw[0] * padded_hw[1], out_height * padded_hw[1]
            grad_wide = grad_output.new_zeros(batch, channels, out_height, padded_hw[1])
            grad_wide[..., :out_width] = grad_output
            grad_wide = grad_wide.view(batch, channels, length)
            products = torch.empty_like(grad_wide)
            sums = []
            for offset in _tap_offsets(spec, kernel, padded_hw[1]):
                torch.mul(grad_wide, _wide_window(flat, (batch, channels, length), plane, offset), out=products)
                sums.append(products.sum(dim=2).sum(dim=0))
            grad_weight = torch.stack(sums, dim=1).view(weight.shape)
        return grad_input, grad_weight

    @staticmethod
    def _wide_grad_input_cropped(grad_output, weight, spec, pads, in_hw):
        """grad_input when some pad exceeds the kernel span: pad by max(0, p), then crop the -p extra."""
        batch, channels = grad_output.shape[:2]
        kernel = tuple(weight.shape[2:])
        flat, padded_hw = _wide_planes(grad_output, tuple(max(0, p) for p in pads))
        offsets = _tap_offsets(spec, kernel, padded_hw[1])
        out_height = padded_hw[0] - (kernel[0] - 1) * spec.dilation[0]
        full = _wide_depthwise(flat, (batch, channels), padded_hw, weight.flip(2, 3).flatten(1), offsets, out_height)
        row, col = max(0, -pads[0]), max(0, -pads[2])
        return full[:, :, row : row + in_hw[0], col : col + in_hw[1]]


def _channels_last(tensor: torch.Tensor) -> bool:
    return tensor.is_contiguous(memory_format=torch.channels_last) and not tensor.is_contiguous()


register(Depthwise())
