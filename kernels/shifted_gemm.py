"""Shifted GEMM: stride-1 conv as a sum over kernel taps of GEMMs on row-offset slices, no patch matrix.

Flatten the zero-padded NHWC input to rows: (N*H_pad*W_pad, C). Output position (n, y, x) lives at
row r = n*H_pad*W_pad + y*W_pad + x of a "wide" output, and kernel tap (i, j) reads input row
r + i*dil_h*W_pad + j*dil_w, so every tap is one contiguous row slice of the flattened input and

    wide[r] = sum_taps rows[r + offset_tap] @ weight_tap            (C, C_out per tap)

is kH*kW GEMMs summed (kernels/gemm.py `sum_of_products`: through oneDNN each GEMM adds the running sum in
its epilogue, which runs these K = C GEMMs near the CPU's peak). Wide rows with x >= W_out or y >= H_out
read wrapped-around data and are cropped away; zero rows after the input keep the last taps' slices in
bounds. No buffer is bigger than the padded input or the (wide) output, so there is nothing to chunk
under the im2col workspace limit.

Backward reuses the same slices: grad_weight_tap = grad_wide^T @ rows[slice] (a long reduction,
K = N*H_pad*W_pad, which suits GEMM; through oneDNN the grad channel-major as its row-major operand), and
grad_input is the correlation of the zero-padded grad_output with the flipped kernel:
grad_rows[s] = sum_taps grad_wide[s - offset_tap] @ weight_tap^T. Under autograd the forward keeps its
padded rows for grad_weight (`forward_keeping`).

Stride 1 only: a strided conv would waste stride_h*stride_w of the GEMM rows (auto sends those
to im2col). Groups loop over column slices of the same rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels import gemm
from kernels.base import ConvAlgorithm, Support, UnsupportedProblem, register
from kernels.limits import keepable
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


def wide_row_count(input: torch.Tensor, spec: ConvSpec) -> int:
    """Rows of the wide output (and of each tap's GEMM): N*H_pad*W_pad."""
    return input.shape[0] * _padded_area(input, spec)


def waste(input: torch.Tensor, weight: torch.Tensor, spec: ConvSpec) -> float:
    """Wide output rows per real output position: H_pad*W_pad / (H_out*W_out)."""
    out_height, out_width = spec.output_size(input.shape[2], input.shape[3], weight.shape[2], weight.shape[3])
    return _padded_area(input, spec) / max(1, out_height * out_width)


def padded_rows(input: torch.Tensor, spec: ConvSpec, tail: int = 0) -> torch.Tensor:
    """input (N, C, H, W), any memory format -> its zero-padded NHWC (N, H_pad, W_pad, C) as rows (N*H_pad*W_pad + tail, C),
    contiguous, with `tail` zero rows after them (so that every tap's slice of a whole wide output stays in bounds)."""
    return nhwc_rows(input, spec.padding, 0, tail)


def nhwc_rows(tensor: torch.Tensor, pads: tuple[int, int, int, int], front: int, back: int) -> torch.Tensor:
    """tensor (N, C, h, w) zero-padded by pads (top, bottom, left, right), NHWC, as rows (front + N*H_pad*W_pad + back, C)
    between `front` and `back` zero rows: F.pad where autograd records (double backward); else zeros only at the
    borders, then one transposing copy."""
    top, bottom, left, right = pads
    batch, channels, height, width = tensor.shape
    nhwc = tensor.permute(0, 2, 3, 1)
    if torch.is_grad_enabled() and tensor.requires_grad:
        return F.pad(F.pad(nhwc, (0, 0, left, right, top, bottom)).reshape(-1, channels), (0, 0, front, back))
    padded_height, padded_width = height + top + bottom, width + left + right
    rows = tensor.new_empty(front + batch * padded_height * padded_width + back, channels)
    grid = rows[front : rows.shape[0] - back].view(batch, padded_height, padded_width, channels)
    for border in (
        rows[:front],
        rows[rows.shape[0] - back :],
        grid[:, :top],
        grid[:, top + height :],
        grid[:, :, :left],
        grid[:, :, left + width :],
    ):
        border.zero_()
    grid[:, top : top + height, left : left + width] = nhwc
    return rows


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
    """(count, C_out) = bias + sum_t rows[offsets[t] : offsets[t] + count] @ taps[t]: rows (R, C), taps (T, C, C_out).

    kernels/gemm.py sums the products: through oneDNN, each GEMM adds the running sum in its epilogue."""
    if count <= 0:
        return rows.new_zeros(max(count, 0), taps.shape[-1])
    return gemm.sum_of_products([(rows[offset : offset + count], tap) for offset, tap in zip(offsets, taps)], bias=bias)


def crop(wide: torch.Tensor, out_shape: tuple[int, int, int], image_rows: int, padded_width: int) -> torch.Tensor:
    """The (N, H_out, W_out, C) view of the valid rows of a wide (R, C) result (R may stop short of N*H_pad*W_pad)."""
    batch, out_height, out_width = out_shape
    channels = wide.shape[1]
    return wide.as_strided((batch, out_height, out_width, channels), (image_rows * channels, padded_width * channels, channels, 1))


def wide_rows(tensor: torch.Tensor, padded_hw: tuple[int, int], margin: int) -> torch.Tensor:
    """tensor (N, C, h, w) -> (margin + N*H_pad*W_pad, C): its values at their wide rows, zeros elsewhere."""
    height, width = tensor.shape[2:]
    return nhwc_rows(tensor, (0, padded_hw[0] - height, 0, padded_hw[1] - width), margin, 0)


def wide_channels(tensor: torch.Tensor, padded_hw: tuple[int, int]) -> torch.Tensor:
    """tensor (N, C, h, w) -> (C, N*H_pad*W_pad): `wide_rows` channel-major (grad_weight's row-major GEMM operand)."""
    batch, channels, height, width = tensor.shape
    columns = tensor.new_zeros(channels, batch, *padded_hw)
    columns[:, :, :height, :width] = tensor.transpose(0, 1)
    return columns.view(channels, -1)


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
            raise UnsupportedProblem(f"algorithm {self.name!r} needs stride (1, 1), got {spec.stride}; use 'im2col'")
        ratio = waste(input, weight, spec)
        wide_macs = wide_row_count(input, spec) * weight.numel()  # N*H_pad*W_pad*C_out*C_in/g*kH*kW
        if ratio > MAX_WASTE and wide_macs > SMALL_WIDE_MACS:
            raise UnsupportedProblem(
                f"algorithm {self.name!r} computes every padded position, {ratio:,.1f}x the output's here "
                f"(it refuses more than {MAX_WASTE}x on problems over {SMALL_WIDE_MACS:,} MACs); use 'im2col'"
            )

    def loop_iterations(self, input, weight, spec):
        """One GEMM per group and kernel tap."""
        return spec.groups * weight.shape[2] * weight.shape[3]

    def forward(self, input, weight, bias, spec):
        return self._forward(input, weight, bias, spec)[0]

    def forward_keeping(self, input, weight, bias, spec):
        """The padded input rows, for grad_weight (which would build them again), where they fit the keep limit."""
        output, rows = self._forward(input, weight, bias, spec)
        return output, (rows if rows is not None and keepable(rows.numel(), rows) else None)

    def _forward(self, input, weight, bias, spec):
        """(output (N, C_out, H_out, W_out) as a view of the wide NHWC result, the padded input rows or None for half
        precision)."""
        if input.dtype in HALF:  # float32 inside, one rounding at the end (kernels/precision.py)
            return self.forward(*widened(input, weight, bias), spec).to(input.dtype), None
        out_channels, _, kernel_h, kernel_w = weight.shape
        out_height, out_width = spec.output_size(input.shape[2], input.shape[3], kernel_h, kernel_w)
        batch = input.shape[0]
        padded_height, padded_width = input.shape[2] + spec.padding[0] + spec.padding[1], input.shape[3] + spec.padding[2] + spec.padding[3]
        offsets = tap_offsets(spec, (kernel_h, kernel_w), padded_width)
        total = batch * padded_height * padded_width
        rows = padded_rows(input, spec, tail=offsets[-1])  # every tap's slice of all `total` wide rows is in bounds
        taps = weight_taps(weight, spec.groups)
        out_per_group = out_channels // spec.groups
        blocks = [
            sum_of_shifted_gemms(
                grouped(rows, spec.groups, g),
                taps[g],
                offsets,
                total,
                None if bias is None else bias[g * out_per_group : (g + 1) * out_per_group],
            )
            for g in range(spec.groups)
        ]
        wide = blocks[0] if spec.groups == 1 else torch.cat(blocks, dim=1)
        output = crop(wide, (batch, out_height, out_width), padded_height * padded_width, padded_width).permute(0, 3, 1, 2)
        return output, rows

    def backward(self, grad_output, input, weight, spec, need_input, need_weight):
        return self._backward(grad_output, input, weight, spec, need_input, need_weight, None)

    def backward_kept(self, kept, grad_output, input, weight, spec, need_input, need_weight):
        return self._backward(grad_output, input, weight, spec, need_input, need_weight, kept)

    def _backward(self, grad_output, input, weight, spec, need_input, need_weight, rows):
        """rows: the forward's padded input rows (`_forward`), or None."""
        if input.dtype in HALF:
            grad_input, grad_weight = self.backward(*widened(grad_output, input, weight), spec, need_input, need_weight)
            return narrowed(grad_input, input.dtype), narrowed(grad_weight, weight.dtype)
        out_channels, in_per_group, kernel_h, kernel_w = weight.shape
        groups = spec.groups
        top, bottom, left, right = spec.padding
        batch, in_channels, height, width = input.shape
        padded_height, padded_width = height + top + bottom, width + left + right
        offsets = tap_offsets(spec, (kernel_h, kernel_w), padded_width)
        margin = offsets[-1]
        total = batch * padded_height * padded_width

        # oneDNN runs a GEMM with a row-major left operand: grad_weight takes the grad channel-major (C_out, wide rows)
        channel_major = need_weight and groups == 1 and gemm.routes_to_onednn(input.dtype) and not torch.is_grad_enabled()
        # The grad's wide rows, once for grad_input and a row-major grad_weight: `margin` zero rows in front so that
        # grad_input's reads at (row - offset) never go negative.
        grad_rows = None
        if need_input or (need_weight and not channel_major):
            grad_rows = wide_rows(grad_output, (padded_height, padded_width), margin if need_input else 0)

        grad_weight = None
        if need_weight:
            if rows is None:
                rows = padded_rows(input, spec, tail=margin)
            if channel_major:  # against each tap's rows (a transposed view), straight into the weight's (C_out, C_in) order
                columns = wide_channels(grad_output, (padded_height, padded_width))
                grad_weight = torch.stack([gemm.mm(columns, rows[o : o + total]) for o in offsets], dim=-1).view(weight.shape)
            else:
                grad_wide = grad_rows[grad_rows.shape[0] - total :]
                grad_taps = torch.stack(
                    [
                        torch.stack([grouped(rows, groups, g)[o : o + total].t() @ grouped(grad_wide, groups, g) for o in offsets])
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
