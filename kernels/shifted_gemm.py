"""Shifted GEMM: stride-1 conv as a sum over kernel taps of GEMMs on row-offset slices, no patch matrix.

Flatten the zero-padded NHWC input to rows: (N*H_pad*W_pad, C). Output position (n, y, x) lives at
row r = n*H_pad*W_pad + y*W_pad + x of a "wide" output, and kernel tap (i, j) reads input row
r + i*dil_h*W_pad + j*dil_w, so every tap is one contiguous row slice of the flattened input and

    wide[r] = sum_taps rows[r + offset_tap] @ weight_tap            (C, C_out per tap)

is kH*kW GEMMs accumulated in place. Wide rows with x >= W_out or y >= H_out read wrapped-around
data and are cropped away. No buffer is bigger than the padded input or the (wide) output, so
there is nothing to chunk under the im2col workspace limit.

Backward reuses the same slices: grad_weight_tap = rows[slice]^T @ grad_wide (a long reduction,
K = N*H_pad*W_pad, which suits GEMM), and grad_input is the correlation of the zero-padded
grad_output with the flipped kernel: grad_rows[s] = sum_taps grad_wide[s - offset_tap] @ weight_tap^T.

Stride 1 only: a strided conv would waste stride_h*stride_w of the GEMM rows (auto sends those
to im2col). Groups loop over column slices of the same rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.base import ConvAlgorithm, Support, UnsupportedProblem, register
from kernels.params import ConvSpec
from kernels.precision import HALF, narrowed, widened

# Asked for by name (auto only sends it problems with waste <= selection.MAX_SHIFTED_WASTE), it still
# refuses problems whose wide output is more than this many times the real one, unless their whole
# wide product is small: the waste is unbounded (a 1x2 kernel dilated 8000 on a 4096x1 image computes
# 8001 wide rows per output row; 8 GB for a 1 MB output), and its rows cost time and memory that the
# service's MAC and element limits do not count. 2.5 lets a 3x3 "same" conv on 4x4 images through (2.25).
MAX_WASTE = 2.5
SMALL_WIDE_MACS = 1 << 24


def _padded_area(input: torch.Tensor, spec: ConvSpec) -> int:
    top, bottom, left, right = spec.padding
    return (input.shape[2] + top + bottom) * (input.shape[3] + left + right)


def waste(input: torch.Tensor, weight: torch.Tensor, spec: ConvSpec) -> float:
    """Wide output rows per real output position: H_pad*W_pad / (H_out*W_out)."""
    out_height, out_width = spec.output_size(input.shape[2], input.shape[3], weight.shape[2], weight.shape[3])
    return _padded_area(input, spec) / max(1, out_height * out_width)


def padded_rows(input: torch.Tensor, spec: ConvSpec) -> torch.Tensor:
    """input (N, C, H, W), any memory format -> zero-padded NHWC (N, H_pad, W_pad, C), contiguous.

    F.pad (not zeros + copy) so the result stays differentiable for double backward.
    """
    top, bottom, left, right = spec.padding
    return F.pad(input.permute(0, 2, 3, 1), (0, 0, left, right, top, bottom)).contiguous()


def tap_offsets(spec: ConvSpec, kernel: tuple[int, int], padded_width: int) -> list[int]:
    """Row offset of each kernel tap (i, j), in (i, j) row-major order, within the flattened padded input."""
    dil_h, dil_w = spec.dilation
    return [i * dil_h * padded_width + j * dil_w for i in range(kernel[0]) for j in range(kernel[1])]


def weight_taps(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """weight (C_out, C_in/g, kH, kW) -> (groups, kH*kW, C_in/g, C_out/g), contiguous: one GEMM operand per tap."""
    out_channels, in_per_group, kernel_h, kernel_w = weight.shape
    grouped = weight.reshape(groups, out_channels // groups, in_per_group, kernel_h * kernel_w)
    return grouped.permute(0, 3, 2, 1).contiguous()


def weight_from_taps(taps: torch.Tensor, weight_shape: torch.Size) -> torch.Tensor:
    """Inverse of `weight_taps`: (groups, kH*kW, C_in/g, C_out/g) -> (C_out, C_in/g, kH, kW)."""
    out_channels, in_per_group, kernel_h, kernel_w = weight_shape
    return taps.permute(0, 3, 2, 1).reshape(out_channels, in_per_group, kernel_h, kernel_w)


def sum_of_shifted_gemms(
    rows: torch.Tensor, taps: torch.Tensor, offsets: list[int], count: int, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """(count, C_out) = bias + sum_t rows[offsets[t] : offsets[t] + count] @ taps[t].

    rows (R, C), taps (T, C, C_out). addmm_ in place stays differentiable (double backward): it
    saves its two factors, not the accumulator.
    """
    if count <= 0:
        return rows.new_zeros(max(count, 0), taps.shape[-1])
    first = rows[offsets[0] : offsets[0] + count]
    start = torch.mm(first, taps[0]) if bias is None else torch.addmm(bias, first, taps[0])
    for offset, tap in zip(offsets[1:], taps[1:]):
        start.addmm_(rows[offset : offset + count], tap)
    return start


def crop(wide: torch.Tensor, out_shape: tuple[int, int, int], image_rows: int, padded_width: int) -> torch.Tensor:
    """The (N, H_out, W_out, C) view of the valid rows of a wide (R, C) result (R may stop short of N*H_pad*W_pad)."""
    batch, out_height, out_width = out_shape
    channels = wide.shape[1]
    return wide.as_strided((batch, out_height, out_width, channels), (image_rows * channels, padded_width * channels, channels, 1))


def wide_rows(tensor: torch.Tensor, padded_hw: tuple[int, int], margin: int) -> torch.Tensor:
    """tensor (N, C, h, w) -> (margin + N*H_pad*W_pad, C): its values at their wide rows, zeros elsewhere."""
    batch, channels, height, width = tensor.shape
    padded_height, padded_width = padded_hw
    nhwc = tensor.permute(0, 2, 3, 1)
    if torch.is_grad_enabled():  # F.pad keeps the graph for double backward
        wide = F.pad(nhwc, (0, 0, 0, padded_width - width, 0, padded_height - height)).reshape(-1, channels)
        return F.pad(wide, (0, 0, margin, 0))
    rows = tensor.new_zeros(margin + batch * padded_height * padded_width, channels)
    rows[margin:].view(batch, padded_height, padded_width, channels)[:, :height, :width] = nhwc
    return rows


def grouped(matrix: torch.Tensor, groups: int, group: int) -> torch.Tensor:
    """Column block `group` of a (R, channels) matrix: a strided view GEMM reads without a copy."""
    width = matrix.shape[1] // groups
    return matrix[:, group * width : (group + 1) * width]


class ShiftedGemm(ConvAlgorithm):
    name = "shifted_gemm"
    inexact_nonfinite = frozenset({"backward"})  # the wide rows pair inputs with zero gradient rows

    def support(self) -> Support:
        return Support(
            notes="stride 1 only: kH*kW GEMMs on row-shifted slices of the padded NHWC input, no patch copy",
        )

    def check(self, input: torch.Tensor, weight: torch.Tensor, spec: ConvSpec) -> None:
        super().check(input, weight, spec)
        if spec.stride != (1, 1):
            raise UnsupportedProblem(f"algorithm 'shifted_gemm' needs stride (1, 1), got {spec.stride}; use 'im2col'")
        ratio = waste(input, weight, spec)
        wide_macs = input.shape[0] * _padded_area(input, spec) * weight.numel()  # N*H_pad*W_pad*C_out*C_in/g*kH*kW
        if ratio > MAX_WASTE and wide_macs > SMALL_WIDE_MACS:
            raise UnsupportedProblem(
                f"algorithm 'shifted_gemm' computes every padded position, {ratio:,.1f}x the output's here "
                f"(it refuses more than {MAX_WASTE}x on problems over {SMALL_WIDE_MACS:,} MACs); use 'im2col'"
            )

    def loop_iterations(self, input, weight, spec):
        """One GEMM per group and kernel tap."""
        return spec.groups * weight.shape[2] * weight.shape[3]

    def forward(self, input, weight, bias, spec):
        if input.dtype in HALF:  # float32 inside, one rounding at the end (kernels/precision.py)
            return self.forward(*widened(input, weight, bias), spec).to(input.dtype)
        out_channels, _, kernel_h, kernel_w = weight.shape
        out_height, out_width = spec.output_size(input.shape[2], input.shape[3], kernel_h, kernel_w)
        padded = padded_rows(input, spec)
        batch, padded_height, padded_width, channels = padded.shape
        rows = padded.view(-1, channels)
        offsets = tap_offsets(spec, (kernel_h, kernel_w), padded_width)
        count = rows.shape[0] - offsets[-1]  # every valid output row is below this
        taps = weight_taps(weight, spec.groups)
        out_per_group = out_channels // spec.groups
        blocks = [
            sum_of_shifted_gemms(
                grouped(rows, spec.groups, g),
                taps[g],
                offsets,
                count,
                None if bias is None else bias[g * out_per_group : (g + 1) * out_per_group],
            )
            for g in range(spec.groups)
        ]
        wide = blocks[0] if spec.groups == 1 else torch.cat(blocks, dim=1)
        return crop(wide, (batch, out_height, out_width), padded_height * padded_width, padded_width).permute(0, 3, 1, 2)

    def backward(self, grad_output, input, weight, spec, need_input, need_weight):
        if input.dtype in HALF:
            grad_input, grad_weight = self.backward(*widened(grad_output, input, weight), spec, need_input, need_weight)
            return narrowed(grad_input, input.dtype), narrowed(grad_weight, weight.dtype)
        out_channels, in_per_group, kernel_h, kernel_w = weight.shape
        groups = spec.groups
        top, bottom, left, right = spec.padding
        batch, in_channels, height, width = input.shape
        padded_height, padded_width = height + top + bottom, width + left + right
        out_height, out_width = grad_output.shape[2:]
        offsets = tap_offsets(spec, (kernel_h, kernel_w), padded_width)
        margin = offsets[-1]
        total = batch * padded_height * padded_width
        # `margin` zero rows in front so that grad_input's reads at (row - offset) never go negative.
        grad_rows = wide_rows(grad_output, (padded_height, padded_width), margin if need_input else 0)
        grad_wide = grad_rows[grad_rows.shape[0] - total :]

        grad_weight = None
        if need_weight:
            rows = padded_rows(input, spec).view(total, in_channels)
            count = total - margin
            grad_taps = torch.stack(
                [
                    torch.stack([grouped(rows, groups, g)[o : o + count].t() @ grouped(grad_wide, groups, g)[:count] for o in offsets])
                    for g in range(groups)
                ]
            )
            grad_weight = weight_from_taps(grad_taps, weight.shape)

        grad_input = None
        if need_input:
            flipped = weight_taps(weight, groups).transpose(2, 3).flip(1).contiguous()
            read_offsets = [margin - o for o in reversed(offsets)]
            blocks = [sum_of_shifted_gemms(grouped(grad_rows, groups, g), flipped[g], read_offsets, total) for g in range(groups)]
            grad_padded = (blocks[0] if groups == 1 else torch.cat(blocks, dim=1)).view(batch, padded_height, padded_width, in_channels)
            grad_input = grad_padded[:, top : top + height, left : left + width].permute(0, 3, 1, 2)
        return grad_input, grad_weight


register(ShiftedGemm())
