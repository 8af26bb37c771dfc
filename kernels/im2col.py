"""im2col + GEMM: forward as a GEMM over unfolded patches, grad_weight as a GEMM, grad_input by col2im.

Layout: everything runs channels-last. A patch row for output position (n, y, x) is the
(kH, kW, C_in/groups) block under the kernel, which in an NHWC padded input is a strided view
(`_patches`), so unfolding is a single gather-copy and each GEMM reads contiguous memory. The
patch matrix is built in row blocks (`_row_blocks`) so it never exceeds the workspace limit; 1x1
stride-1 convs need no copy at all. NCHW inputs with few channels (the 7x7 stem) instead gather
F.unfold-order columns from a stride-phase split of the input (`_phase_columns`), for the forward and for
grad_weight (`_phase_forward`, `_phase_grad_weight`). grad_input is a
chunked per-tap scatter of the column gradient, or, for few input channels per group,
W^T @ grad_output folded back by F.fold in NCHW.
Depthwise convs (one input channel per group) are not GEMMs:
they run as a sum over kernel taps of per-channel multiply-adds.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from kernels import compiled, gemm
from kernels.base import ConvAlgorithm, Support, register
from kernels.limits import get_limits, keepable
from kernels.params import ConvSpec
from kernels.precision import HALF, narrowed, widened
from kernels.workspace import scratch


def _padded_nhwc(input: torch.Tensor, spec: ConvSpec) -> torch.Tensor:
    """input (N, C, H, W) -> zero-padded (N, H_pad, W_pad, C), contiguous."""
    top, bottom, left, right = spec.padding
    nhwc = input.permute(0, 2, 3, 1)
    if not any(spec.padding) and nhwc.is_contiguous():  # channels_last input: already the layout we need
        return nhwc
    batch, height, width, channels = nhwc.shape
    shape = (batch, height + top + bottom, width + left + right, channels)
    padded = scratch("im2col_padded", shape[0] * shape[1] * shape[2] * shape[3], input).view(shape)
    if any(spec.padding):
        padded.zero_()
    padded[:, top : top + height, left : left + width] = nhwc
    return padded


def _gathered_columns(
    source: torch.Tensor,
    top: int,
    bottom: int,
    left: int,
    right: int,
    kernel_h: int,
    kernel_w: int,
    stride_h: int,
    stride_w: int,
    dilation_h: int,
    dilation_w: int,
    out_height: int,
    out_width: int,
) -> torch.Tensor:
    """The groups-1 columns (N*H_out*W_out, kH*kW*C) straight from the NCHW source (N, C, H, W), for Inductor: zero
    padding, the NHWC transpose and the patch gather in one pass, where `_padded_nhwc` and the gather from it make two
    (128x28 stride 2, batch 4: 0.093 against 0.144 ms)."""
    grid = F.pad(source, (left, right, top, bottom)).permute(0, 2, 3, 1)
    taps = [
        grid[
            :,
            i * dilation_h : i * dilation_h + stride_h * (out_height - 1) + 1 : stride_h,
            j * dilation_w : j * dilation_w + stride_w * (out_width - 1) + 1 : stride_w,
        ]
        for i in range(kernel_h)
        for j in range(kernel_w)
    ]
    # clone: Inductor lowers a one-tap stack (a 1x1 kernel) to a view of the transposed grid, which the view below
    # cannot take ("Cannot view a tensor"), and a failed compile turns compiling off for the process
    columns = torch.stack(taps, dim=3).clone(memory_format=torch.contiguous_format)
    return columns.view(-1, kernel_h * kernel_w * source.shape[1])


def _patches(padded: torch.Tensor, spec: ConvSpec, kernel: tuple[int, int], rows: slice, out_width: int) -> torch.Tensor:
    """View (N_b, rows, W_out, kH, kW, C) of padded (N_b, H_pad, W_pad, C): the input under each output position."""
    (stride_h, stride_w), (dil_h, dil_w) = spec.stride, spec.dilation
    batch_stride, row_stride, col_stride, _ = padded.stride()
    return padded.as_strided(
        (padded.shape[0], rows.stop - rows.start, out_width, kernel[0], kernel[1], padded.shape[3]),
        (batch_stride, stride_h * row_stride, stride_w * col_stride, dil_h * row_stride, dil_w * col_stride, 1),
        padded.storage_offset() + rows.start * stride_h * row_stride,
    )


def _row_blocks(batch: int, out_height: int, row_bytes: int, limit: int | None = None) -> Iterator[tuple[slice, slice]]:
    """(images, output rows) blocks whose patch matrix stays under the workspace limit.

    Whole images are grouped while they fit; an image too big on its own is split by output rows.
    A single output row is the smallest block, so a row wider than the limit still runs alone.
    """
    rows_per_block, images = _block_size(out_height, row_bytes, limit)
    if images:
        for start in range(0, batch, images):
            yield slice(start, min(batch, start + images)), slice(0, out_height)
        return
    for image in range(batch):
        for start in range(0, out_height, rows_per_block):
            yield slice(image, image + 1), slice(start, min(out_height, start + rows_per_block))


def _block_count(batch: int, out_height: int, row_bytes: int, limit: int | None = None) -> int:
    """How many blocks `_row_blocks` yields, without walking them."""
    rows_per_block, images = _block_size(out_height, row_bytes, limit)
    return -(-batch // images) if images else batch * -(-out_height // rows_per_block)


def _block_size(out_height: int, row_bytes: int, limit: int | None) -> tuple[int, int]:
    """(output rows per block, whole images per block, 0 when one image is split by rows)."""
    limit = get_limits().im2col_workspace_bytes if limit is None else limit
    rows_per_block = max(1, limit // max(1, row_bytes))
    return rows_per_block, (max(1, rows_per_block // max(1, out_height)) if rows_per_block >= out_height else 0)


def _grouped_columns(patches: torch.Tensor, groups: int, own: bool = False) -> torch.Tensor:
    """(N_b, R, W_out, kH, kW, C) patches -> (groups, N_b*R*W_out, kH*kW*C/groups) columns; `own`: groups 1 gathers
    into a tensor of its own instead of the reused patch buffer (columns kept past the call)."""
    *lead, kernel_h, kernel_w, channels = patches.shape
    if groups == 1:  # one gather-copy into the reused patch buffer (kernels/workspace.py)
        columns = patches.new_empty(patches.shape) if own else scratch("im2col_columns", patches.numel(), patches).view(patches.shape)
        return columns.copy_(patches).view(1, -1, kernel_h * kernel_w * channels)
    split = patches.reshape(*lead, kernel_h, kernel_w, groups, channels // groups)
    return split.permute(5, 0, 1, 2, 3, 4, 6).reshape(groups, -1, kernel_h * kernel_w * (channels // groups))


def _weight_matrix(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """weight (C_out, C_in/g, kH, kW) -> (groups, kH*kW*C_in/g, C_out/g), matching the column order.

    A transposed view of (groups, C_out/g, kH*kW*C_in/g) rows: the copy only moves each kernel's taps in front of
    its channels (256 channels, 3x3: 0.11 ms, where a contiguous (K, C_out) took 0.32-0.92 ms), and oneDNN's GEMMs
    read the rows as they are, faster than a contiguous (K, C_out) (kernels/gemm.py; grad_input's columns at
    256x14, batch 1: 0.47 against 0.58 ms).
    """
    out_channels, in_per_group, kernel_h, kernel_w = weight.shape
    grouped = weight.reshape(groups, out_channels // groups, in_per_group, kernel_h, kernel_w)
    rows = grouped.permute(0, 1, 3, 4, 2).reshape(groups, out_channels // groups, kernel_h * kernel_w * in_per_group)
    return rows.transpose(1, 2)


def _weight_from_matrix(matrix: torch.Tensor, weight_shape: torch.Size) -> torch.Tensor:
    """Inverse of `_weight_matrix`: (groups, kH*kW*C_in/g, C_out/g) -> (C_out, C_in/g, kH, kW)."""
    out_channels, in_per_group, kernel_h, kernel_w = weight_shape
    groups = matrix.shape[0]
    grouped = matrix.reshape(groups, kernel_h, kernel_w, in_per_group, out_channels // groups)
    return grouped.permute(0, 4, 3, 1, 2).reshape(weight_shape)


def _is_depthwise(weight: torch.Tensor, groups: int) -> bool:
    return groups > 1 and weight.shape[1] == 1


def _tap_window(tensor: torch.Tensor, spec: ConvSpec, i: int, j: int, rows: int, cols: int) -> torch.Tensor:
    """The (N, rows, cols, C) strided slice of an NHWC padded tensor that kernel tap (i, j) touches."""
    (stride_h, stride_w), (dil_h, dil_w) = spec.stride, spec.dilation
    return tensor[
        :, i * dil_h : i * dil_h + stride_h * (rows - 1) + 1 : stride_h, j * dil_w : j * dil_w + stride_w * (cols - 1) + 1 : stride_w
    ]


def _use_phases(input: torch.Tensor, weight: torch.Tensor, spec: ConvSpec) -> bool:
    """`_phase_forward` for groups 1, dilation 1, NCHW input with few channels (short channels-last patch runs)."""
    return spec.groups == 1 and spec.dilation == (1, 1) and weight.shape[1] < FOLD_MAX_CHANNELS and input.is_contiguous()


def _phase_split(input: torch.Tensor, spec: ConvSpec) -> torch.Tensor:
    """input (N, C, H, W) -> (N, C, H_pad, s_w, W_ph), [.., R, t, X] = zero-padded input[.., R, s_w*X + q(t)].

    Slot t holds the padded columns of phase q(t) = (t + left) mod s_w, which are the input's columns
    j = t (mod s_w): splitting by column phase turns every strided tap window into rows of contiguous
    reads (`_phase_plane`), while rows need no split (a row stride is free in a view). Ordered by the
    input's residue t, every slot's columns start at the same or the next X, so for s_w = 2 and an even
    width the whole split is one strided copy (the 7x7 stem: 1 op instead of a copy per phase).
    """
    top, bottom, left, right = spec.padding
    stride_w = spec.stride[1]
    batch, channels, height, width = input.shape
    shape = (batch, channels, height + top + bottom, stride_w, -(-(width + left + right) // stride_w))
    split = scratch("im2col_phases", math.prod(shape), input).view(shape).zero_()
    offsets = [(t + left) // stride_w for t in range(stride_w)]  # X of the slot's first input column
    step = offsets[1] - offsets[0] if stride_w > 1 else 0
    if width % stride_w == 0 and all(offset == offsets[0] + t * step for t, offset in enumerate(offsets)):
        batch_stride, channel_stride, row_stride, slot_stride, _ = split.stride()
        target = split.as_strided(
            (batch, channels, height, stride_w, width // stride_w),
            (batch_stride, channel_stride, row_stride, slot_stride + step, 1),
            split.storage_offset() + top * row_stride + offsets[0],
        )
        target.copy_(input.view(batch, channels, height, width // stride_w, stride_w).transpose(3, 4))
        return split
    for t in range(min(stride_w, width)):
        source = input[:, :, :, t::stride_w]
        split[:, :, top : top + height, t, offsets[t] : offsets[t] + source.shape[3]] = source
    return split


def _phase_plane(split: torch.Tensor, spec: ConvSpec, p: int, q: int) -> torch.Tensor:
    """Phase (p, q) of the padded input as (N, C, H_ph, W_ph): [.., Y, X] = padded[.., s_h*Y + p, s_w*X + q]."""
    stride_h, stride_w = spec.stride
    return split[:, :, p::stride_h, (q - spec.padding[2]) % stride_w]


def _phase_columns(
    split: torch.Tensor, spec: ConvSpec, weight_shape: torch.Size, out_hw: tuple[int, int], ones: bool, own: bool = False
) -> Iterator:
    """(images, output rows, columns (C_in*kH*kW [+ 1], N_b, R*W_out)) blocks in F.unfold's (c, i, j) row order,
    gathered from `_phase_split`'s stride phases; with `ones` a last row of ones (a bias in the GEMM).

    Image-minor (each row holds the block's images one after another), so that one GEMM takes the whole block:
    per image, oneDNN's products would each be copied into the output (it has no out=), and at batch 4 those copies
    and the GEMM's shorter rows cost the stem 13-18% of its forward.
    Taps i = p + s_h*a, j = q + s_w*b read phase (p, q) at (y + a, x + b), so each phase's taps copy as whole output
    rows. The columns live in a reused scratch buffer (`own`: each block in a tensor of its own): consume each block
    before taking the next.
    """
    _, in_channels, kernel_h, kernel_w = weight_shape
    (stride_h, stride_w), (out_height, out_width) = spec.stride, out_hw
    taps = in_channels * kernel_h * kernel_w
    row_bytes = out_width * (taps + ones) * split.element_size()
    for images, rows in _row_blocks(split.shape[0], out_height, row_bytes):
        count, block_rows = images.stop - images.start, rows.stop - rows.start
        shape = (taps + ones, count, block_rows * out_width)
        matrix = split.new_empty(shape) if own else scratch("im2col_columns", math.prod(shape), split).view(shape)
        if ones:
            matrix[taps].fill_(1)
        columns = matrix[:taps].view(in_channels, kernel_h, kernel_w, count, block_rows, out_width).permute(3, 0, 1, 2, 4, 5)
        for p in range(min(stride_h, kernel_h)):
            for q in range(min(stride_w, kernel_w)):
                phase = _phase_plane(split, spec, p, q)[images]
                taps_h, taps_w = len(range(p, kernel_h, stride_h)), len(range(q, kernel_w, stride_w))
                batch_stride, channel_stride, row_stride, _ = phase.stride()
                window = phase.as_strided(
                    (count, in_channels, taps_h, taps_w, block_rows, out_width),
                    (batch_stride, channel_stride, row_stride, 1, row_stride, 1),
                    phase.storage_offset() + rows.start * row_stride,
                )
                columns[:, :, p::stride_h, q::stride_w] = window
        yield images, rows, matrix


# Below this many input channels per group the channels-last per-tap scatter moves rows too short
# to be fast (the 3-channel stem: 49 taps of 3-wide rows), and F.fold's NCHW col2im wins.
FOLD_MAX_CHANNELS = 32


def _use_fold(input_shape: torch.Size, weight_shape: torch.Size, out_positions: int, element_size: int) -> bool:
    """F.fold for grad_input: few channels per group, and one image's column gradient fits the workspace limit."""
    _, in_per_group, kernel_h, kernel_w = weight_shape
    fits = input_shape[1] * kernel_h * kernel_w * out_positions * element_size <= get_limits().im2col_workspace_bytes
    return in_per_group < FOLD_MAX_CHANNELS and fits


def _correlation_grad_input(input: torch.Tensor, weight: torch.Tensor, spec: ConvSpec) -> bool:
    """grad_input as a forward conv of grad_output with the flipped kernel: stride 1, no dilation, groups 1, padding within the kernel (so the flipped conv's
    padding is >= 0), no autograd recording, and GEMMs through oneDNN. There the scatter's (M, C_out) @ (C_out, K)
    GEMM has a short inner dimension and a big output (64x56 at batch 1: 1.85 ms, then a 0.24 ms copy and 9 adds),
    while the same work as a forward conv is one GEMM with K = C_out*kH*kW (0.6 ms)."""
    kernel_h, kernel_w = weight.shape[2:]
    top, bottom, left, right = spec.padding
    return (
        spec.stride == (1, 1)
        and spec.dilation == (1, 1)
        and spec.groups == 1
        and max(top, bottom) < kernel_h
        and max(left, right) < kernel_w
        and not torch.is_grad_enabled()
        and gemm.routes_to_onednn(input.dtype)
    )


def _fold_images(weight_shape: torch.Size, groups: int, out_positions: int, element_size: int) -> int:
    """Images per block of `_fold_grad_input`: as many as keep their column gradient under the workspace limit."""
    _, in_per_group, kernel_h, kernel_w = weight_shape
    column_bytes = groups * in_per_group * kernel_h * kernel_w * out_positions * element_size
    return max(1, get_limits().im2col_workspace_bytes // max(1, column_bytes))


def _fold_grad_input(grad_output: torch.Tensor, weight: torch.Tensor, spec: ConvSpec, padded_hw: tuple[int, int]) -> torch.Tensor:
    """grad of the padded input, (N, C_in, H_pad, W_pad) NCHW: col2im (F.fold) of W^T @ grad_output, per image block.

    In NCHW each image's grad_output is already a (C_out, H_out*W_out) matrix and weight.view(C_out, -1)
    has F.fold's (c, i, j) row order, so no transposes are needed; F.fold's col2im replaces a
    per-tap scatter that crawls when C_in is small (the 3-channel stem: kH*kW adds of 3-wide rows).
    Whole images are grouped while their column gradient stays under the workspace limit.
    """
    groups = spec.groups
    out_channels, in_per_group, kernel_h, kernel_w = weight.shape
    batch, out_per_group = grad_output.shape[0], out_channels // groups
    if batch == 0:
        return grad_output.new_zeros(0, in_per_group * groups, *padded_hw)
    grad = grad_output.reshape(batch, out_channels, grad_output.shape[2] * grad_output.shape[3])  # (N, C_out, L): a view for NCHW
    # (g, C_in/g*kH*kW, C_out/g), row-major: the layout oneDNN's GEMM takes without a copy per image (kernels/gemm.py)
    matrices = weight.reshape(groups, out_per_group, in_per_group * kernel_h * kernel_w).transpose(1, 2).contiguous()
    images = _fold_images(weight.shape, groups, grad.shape[2], grad.element_size())
    blocks = []
    for start in range(0, batch, images):
        block = grad[start : start + images]
        columns = [
            gemm.bmm(matrices[g].expand(block.shape[0], -1, -1), block[:, g * out_per_group : (g + 1) * out_per_group])
            for g in range(groups)
        ]
        columns = columns[0] if groups == 1 else torch.cat(columns, dim=1)  # (N_b, C_in*kH*kW, L), channel-major
        blocks.append(F.fold(columns, padded_hw, (kernel_h, kernel_w), dilation=spec.dilation, padding=0, stride=spec.stride))
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks)


class Im2col(ConvAlgorithm):
    name = "im2col"

    def support(self) -> Support:
        return Support(
            notes="channels-last patch GEMM, chunked under a workspace cap; depthwise as tap-wise multiply-adds",
            limits={"workspace_bytes": get_limits().im2col_workspace_bytes},
        )

    def loop_iterations(self, input, weight, spec):
        """Depthwise: one per tap. Otherwise per row block one GEMM, and in backward one scatter per tap (or
        per F.fold image block one GEMM per group); the stride-phase gather adds at most one per tap."""
        _, in_per_group, kernel_h, kernel_w = weight.shape
        taps = kernel_h * kernel_w
        if _is_depthwise(weight, spec.groups):
            return taps
        out_height, out_width = spec.output_size(input.shape[2], input.shape[3], kernel_h, kernel_w)
        element_size = max(input.element_size(), 4)  # half precision runs in float32
        blocks = _block_count(input.shape[0], out_height, out_width * input.shape[1] * taps * element_size)
        fold_blocks = -(-input.shape[0] // _fold_images(weight.shape, spec.groups, out_height * out_width, element_size))
        return blocks * (taps + 1) + taps + fold_blocks * spec.groups

    def forward(self, input, weight, bias, spec):
        return self._forward(input, weight, bias, spec, keep=False, compiled_gather=True)[0]

    def forward_keeping(self, input, weight, bias, spec):
        """A one-block GEMM forward keeps its columns for grad_weight, which would gather them again, where the stride is
        more than 1 (128x28 s2 4-9% faster forward+backward, the stem 7-12%). At stride 1 grad_input is a forward conv
        that gathers columns as big into the scratch buffer, and kept ones beside them doubled that working set: in
        `bench_kernels`' alternation with nn.Conv2d, 64x56 at batch 1 read 6-8% slower (docs/performance.md round 20)."""
        keep = input.dtype not in HALF and spec.stride != (1, 1)
        return self._forward(input, weight, bias, spec, keep=keep, compiled_gather=keep)

    def _forward(self, input, weight, bias, spec, keep, compiled_gather=False):
        """(output, the columns grad_weight can reuse or None); with `keep`, a one-block GEMM forward whose columns fit
        `Limits.kept_for_backward_bytes` gathers them into a tensor of their own and returns it.

        compiled_gather: where the stride is more than 1, one-block columns may come from compiled code, straight from the
        NCHW input (`_gathered_columns`): for an inference forward, and a training one that keeps them anyway. Same
        process, ours / nn.Conv2d at batch 4 (docs/performance.md, round 24): 128x28 stride 2 forward 1.17-1.41 against
        1.15-1.52, forward+backward 1.15-1.26 against 1.17-1.30. Not at stride 1: the gather alone is slower there (64x56,
        batch 1: 0.23 against 0.155 ms; that layer's inference forward 1.78x against 1.42-1.51x), and in training a fresh
        column buffer beside the one grad_weight gathers made 64x28 forward+backward 1.89-1.90x against 1.63x."""
        if input.dtype in HALF:  # float32 inside, one rounding at the end (kernels/precision.py)
            return self.forward(*widened(input, weight, bias), spec).to(input.dtype), None
        out_channels, _, kernel_h, kernel_w = weight.shape
        out_height, out_width = spec.output_size(input.shape[2], input.shape[3], kernel_h, kernel_w)
        if _use_phases(input, weight, spec):
            return self._phase_forward(input, weight, bias, spec, (out_height, out_width), keep)
        strided = spec.stride != (1, 1)
        if compiled_gather and strided and spec.groups == 1 and gemm.routes_to_onednn(input.dtype) and compiled.takes(input):
            columns = self._compiled_columns(input, spec, (kernel_h, kernel_w), (out_height, out_width))
            if columns is not None:
                output = gemm.mm(columns, _weight_matrix(weight, 1)[0], bias=bias).view(input.shape[0], out_height, out_width, out_channels)
                keep = keep and keepable(columns.numel(), columns)
                return output.permute(0, 3, 1, 2), (columns.unsqueeze(0) if keep else None)
        padded = _padded_nhwc(input, spec)
        batch = padded.shape[0]
        if _is_depthwise(weight, spec.groups):
            output = self._depthwise_forward(padded, weight, spec, out_height, out_width)
        elif spec.groups == 1 and input.is_contiguous() and not gemm.routes_to_onednn(input.dtype):
            return self._nchw_forward(padded, weight, bias, spec, (out_height, out_width)), None
        else:
            weights = _weight_matrix(weight, spec.groups)
            row_bytes = out_width * weights.shape[0] * weights.shape[1] * padded.element_size()
            blocks = list(_row_blocks(batch, out_height, row_bytes))
            if spec.groups == 1 and len(blocks) == 1:  # one block: the product, bias included, is the output (no copy)
                keep = keep and keepable(batch * out_height * out_width * weights.shape[1], padded)
                columns = _grouped_columns(_patches(padded, spec, (kernel_h, kernel_w), slice(0, out_height), out_width), 1, own=keep)
                output = gemm.mm(columns[0], weights[0], bias=bias).view(batch, out_height, out_width, out_channels)
                return output.permute(0, 3, 1, 2), (columns if keep else None)
            output = padded.new_empty(batch, out_height, out_width, out_channels)
            for images, rows in blocks:
                patches = _patches(padded[images], spec, (kernel_h, kernel_w), rows, out_width)
                columns = _grouped_columns(patches, spec.groups)
                block = output[images, rows].view(-1, out_channels)
                if spec.groups == 1:
                    gemm.mm(columns[0], weights[0], out=block)
                else:
                    block.view(-1, spec.groups, out_channels // spec.groups).copy_(torch.bmm(columns, weights).transpose(0, 1))
        if bias is not None:
            output += bias
        return output.permute(0, 3, 1, 2), None

    @staticmethod
    def _compiled_columns(input, spec, kernel, out_hw):
        """The one-block columns (N*H_out*W_out, kH*kW*C_in), a tensor of their own, from compiled code (`_gathered_columns`),
        or None: more than one block under the workspace limit, or no compiled code for the problem (yet)."""
        out_height, out_width = out_hw
        row_bytes = out_width * kernel[0] * kernel[1] * input.shape[1] * input.element_size()
        if _block_count(input.shape[0], out_height, row_bytes) != 1:
            return None
        return compiled.run(_gathered_columns, input, *spec.padding, *kernel, *spec.stride, *spec.dilation, *out_hw)

    @staticmethod
    def _nchw_forward(padded, weight, bias, spec, out_hw):
        """groups == 1, NCHW input: each image's output (C_out, H_out*W_out) = weight_rows @ columns^T.

        The same GEMM as the NHWC one with the operands swapped (MKL runs it as fast), but the result
        is already NCHW, which saves the NHWC -> NCHW copy of the output that NCHW callers get
        (measured on the 7x7 stem, 1 thread: 1.5 ms of a 9 ms forward). Not where the GEMMs go through
        oneDNN (kernels/gemm.py): its per-image GEMMs are copied into place, and one GEMM over the whole
        block in the NHWC orientation plus the output copy is faster (128x28 s2: 1.32-1.35x nn.Conv2d's
        forward against 1.62x, round 18).
        """
        out_channels, _, kernel_h, kernel_w = weight.shape
        batch = padded.shape[0]
        out_height, out_width = out_hw
        output = padded.new_empty(batch, out_channels, out_height * out_width)
        weight_rows = weight.permute(0, 2, 3, 1).reshape(out_channels, -1)  # (C_out, kH*kW*C_in): the column order
        row_bytes = out_width * weight_rows.shape[1] * padded.element_size()
        for images, rows in _row_blocks(batch, out_height, row_bytes):
            columns = _grouped_columns(_patches(padded[images], spec, (kernel_h, kernel_w), rows, out_width), 1)
            columns = columns.view(images.stop - images.start, -1, weight_rows.shape[1])
            block = output[images, :, rows.start * out_width : rows.stop * out_width]
            gemm.bmm(weight_rows.expand(columns.shape[0], -1, -1), columns.transpose(1, 2), out=block)
        if bias is not None:
            output += bias.view(-1, 1)
        return output.view(batch, out_channels, out_height, out_width)

    @staticmethod
    def _phase_forward(input, weight, bias, spec, out_hw, keep):
        """groups == 1, few input channels, NCHW: columns in F.unfold's (c, i, j) order, gathered from stride phases.

        With C_in = 3 (the 7x7 stem) a channels-last patch row is made of kW*C = 21-float runs and
        the NCHW -> NHWC padded copy is a transpose; here each copied run is a whole output row
        (`_phase_split` makes the stride-2 reads contiguous), and weight.view(C_out, -1) is already
        the matching (c, i, j) matrix. One GEMM per block, (C_out, N_b*L_b), its images put in place by one copy. ->
        (output, the columns (C_in*kH*kW, N, L) for `_phase_grad_weight` where `keep` and they are one block within the
        keep limit, or None).
        """
        out_channels = weight.shape[0]
        out_height, out_width = out_hw
        split = _phase_split(input, spec)
        batch = split.shape[0]
        weight_rows = weight.reshape(out_channels, -1)  # (C_out, C_in*kH*kW): the column order
        taps = weight_rows.shape[1]
        if bias is not None:  # the bias rides in the GEMM as one more column row of ones: no pass over the output
            weight_rows = torch.cat([weight_rows, bias.view(-1, 1)], dim=1)
        row_bytes = out_width * weight_rows.shape[1] * input.element_size()
        one_block = _block_count(batch, out_height, row_bytes) == 1
        keep = keep and one_block and keepable(batch * weight_rows.shape[1] * out_height * out_width, input)
        output = None if one_block else input.new_empty(batch, out_channels, out_height * out_width)
        kept = None
        for images, rows, matrix in _phase_columns(split, spec, weight.shape, out_hw, ones=bias is not None, own=keep):
            product = gemm.mm(weight_rows, matrix.view(matrix.shape[0], -1)).view(out_channels, matrix.shape[1], -1)  # (C_out, N_b, L_b)
            if one_block:  # (N, C_out, L) as a view: the caller's copy into the output's layout is the only one
                output = product.transpose(0, 1)
            else:
                output[images, :, rows.start * out_width : rows.stop * out_width] = product.transpose(0, 1)
            kept = matrix[:taps] if keep else None
        return output.view(batch, out_channels, out_height, out_width), kept

    @staticmethod
    def _phase_grad_weight(grad_output, input, weight, spec, columns=None):
        """grad_weight of `_phase_forward`'s problems: per block grad_output (C_out, N_b*L_b) @ columns (N_b*L_b, C_in*kH*kW).

        The columns are the forward's (c, i, j) ones as they are, row-major for oneDNN, and the NCHW grad is copied
        image-minor to match (contiguous rows of L); the channels-last path transposed the grad and gathered 21-float
        patch runs (the stem: 1.9 ms against oneDNN's 0.67).
        """
        out_channels = weight.shape[0]
        out_hw = grad_output.shape[2:]
        grad = grad_output.reshape(grad_output.shape[0], out_channels, out_hw[0] * out_hw[1])  # (N, C_out, L): a view for NCHW
        if columns is not None:  # the forward's, one block of every image and row (`_phase_forward`)
            blocks = [(slice(0, grad.shape[0]), slice(0, out_hw[0]), columns)]
        else:
            blocks = _phase_columns(_phase_split(input, spec), spec, weight.shape, out_hw, ones=False)
        total = None
        for images, rows, matrix in blocks:
            block = grad[images, :, rows.start * out_hw[1] : rows.stop * out_hw[1]].transpose(0, 1)  # (C_out, N_b, L_b)
            product = gemm.mm(block.reshape(out_channels, -1), matrix.reshape(matrix.shape[0], -1).t())  # (C_out, C_in*kH*kW)
            total = product if total is None else total.add_(product)
        return torch.zeros_like(weight) if total is None else total.view(weight.shape)

    def _depthwise_forward(self, padded, weight, spec, out_height, out_width):
        """padded (N, H_pad, W_pad, C) -> (N, H_out, W_out, C*m) for a channel multiplier m."""
        groups = spec.groups
        multiplier = weight.shape[0] // groups
        taps = weight.reshape(groups, multiplier, weight.shape[2], weight.shape[3])
        output = padded.new_zeros(padded.shape[0], out_height, out_width, groups, multiplier)
        for i in range(weight.shape[2]):
            for j in range(weight.shape[3]):
                window = _tap_window(padded, spec, i, j, out_height, out_width).unsqueeze(-1)
                output.addcmul_(window, taps[:, :, i, j])
        return output.view(padded.shape[0], out_height, out_width, groups * multiplier)

    def backward(self, grad_output, input, weight, spec, need_input, need_weight):
        return self._backward(grad_output, input, weight, spec, need_input, need_weight, None)

    def backward_kept(self, kept, grad_output, input, weight, spec, need_input, need_weight):
        return self._backward(grad_output, input, weight, spec, need_input, need_weight, kept)

    def _backward(self, grad_output, input, weight, spec, need_input, need_weight, columns):
        """columns: the forward's (`_forward` with keep), or None."""
        if input.dtype in HALF:
            grad_input, grad_weight = self.backward(*widened(grad_output, input, weight), spec, need_input, need_weight)
            return narrowed(grad_input, input.dtype), narrowed(grad_weight, weight.dtype)
        out_channels, _, kernel_h, kernel_w = weight.shape
        top, bottom, left, right = spec.padding
        height, width = input.shape[2:]
        batch, _, out_height, out_width = grad_output.shape
        pad_shape = (batch, height + top + bottom, width + left + right, input.shape[1])
        depthwise = _is_depthwise(weight, spec.groups)
        folded = need_input and not depthwise and _use_fold(input.shape, weight.shape, out_height * out_width, grad_output.element_size())
        correlated = need_input and not depthwise and not folded and _correlation_grad_input(input, weight, spec)
        scattered = need_input and not folded and not correlated
        # grad_weight from the forward's stride-phase columns (not while autograd records: they fill a scratch buffer)
        phased = need_weight and _use_phases(input, weight, spec) and not torch.is_grad_enabled()
        grad_weight = self._phase_grad_weight(grad_output, input, weight, spec, columns) if phased else None
        if scattered or (need_weight and not phased):  # the channels-last paths
            padded = _padded_nhwc(input, spec) if need_weight and not phased and columns is None else None
            grad_nhwc = grad_output.permute(0, 2, 3, 1).contiguous()
            grad_padded = grad_nhwc.new_zeros(pad_shape) if scattered else None
            if depthwise:
                grad_weight = self._depthwise_backward(grad_nhwc, padded, grad_padded, weight, spec)
            elif phased:  # grad_weight is in hand: this pass only scatters grad_input
                self._gemm_backward(grad_nhwc, None, grad_padded, weight, spec, False)
            else:
                grad_weight = self._gemm_backward(grad_nhwc, padded, grad_padded, weight, spec, need_weight, columns)
        grad_input = None
        if correlated:  # the stride-1 grad_input as a forward conv of grad_output with the flipped, transposed kernel
            flipped = spec.with_padding((kernel_h - 1 - top, kernel_h - 1 - bottom, kernel_w - 1 - left, kernel_w - 1 - right))
            grad_input = self._forward(grad_output, weight.flip(2, 3).transpose(0, 1), None, flipped, keep=False)[0]
        elif folded:
            grad_input = _fold_grad_input(grad_output, weight, spec, pad_shape[1:3])[:, :, top : top + height, left : left + width]
        elif need_input:
            grad_input = grad_padded[:, top : top + height, left : left + width].permute(0, 3, 1, 2)
        return grad_input, grad_weight

    def _gemm_backward(self, grad_nhwc, padded, grad_padded, weight, spec, need_weight, kept_columns=None):
        """kept_columns: the forward's one-block (1, N*H_out*W_out, kH*kW*C_in) columns, used instead of `padded`'s."""
        groups = spec.groups
        out_channels, in_per_group, kernel_h, kernel_w = weight.shape
        batch, out_height, out_width, _ = grad_nhwc.shape
        weights = _weight_matrix(weight, groups)
        grad_matrix = None  # the first block's product, then a sum (a zero matrix plus it cost a pass at one block)
        row_bytes = out_width * groups * weights.shape[1] * grad_nhwc.element_size()
        for images, rows in _row_blocks(batch, out_height, row_bytes):
            grad_block = grad_nhwc[images, rows].reshape(-1, groups, out_channels // groups).transpose(0, 1)
            if need_weight:
                if kept_columns is not None and kept_columns.shape[1] == grad_block.shape[1]:  # one block, as in the forward
                    columns = kept_columns
                else:
                    columns = _grouped_columns(_patches(padded[images], spec, (kernel_h, kernel_w), rows, out_width), groups)
                if groups == 1:  # as (C_out, M) @ (M, K): the operand oneDNN wants row-major is the small one
                    product = gemm.mm(grad_block[0].t(), columns[0]).t().unsqueeze(0)
                else:
                    product = torch.bmm(columns.transpose(1, 2), grad_block)
                grad_matrix = product if grad_matrix is None else grad_matrix + product
            if grad_padded is not None:
                if torch.is_grad_enabled():  # double backward: no out=
                    grad_columns = torch.bmm(grad_block, weights.transpose(1, 2))
                elif groups == 1 and gemm.onednn_takes(grad_block[0], weights[0].t()):  # its product, not a copy in a buffer
                    grad_columns = gemm.mm(grad_block[0], weights[0].t()).unsqueeze(0)
                else:
                    grad_columns = scratch("im2col_grad_columns", grad_block.shape[0] * grad_block.shape[1] * weights.shape[1], grad_block)
                    grad_columns = grad_columns.view(grad_block.shape[0], grad_block.shape[1], weights.shape[1])
                    gemm.bmm(grad_block, weights.transpose(1, 2), out=grad_columns)
                self._col2im(grad_columns, grad_padded[images], spec, weight.shape, rows, out_width)
        if not need_weight:
            return None
        return _weight_from_matrix(torch.zeros_like(weights) if grad_matrix is None else grad_matrix, weight.shape)

    @staticmethod
    def _col2im(grad_columns, grad_padded, spec, weight_shape, rows, out_width):
        """Scatter-add (groups, N_b*R*W_out, kH*kW*C/g) column gradients into grad_padded (N_b, H_pad, W_pad, C)."""
        groups = grad_columns.shape[0]
        _, in_per_group, kernel_h, kernel_w = weight_shape
        batch = grad_padded.shape[0]
        block = grad_columns.reshape(groups, batch, rows.stop - rows.start, out_width, kernel_h, kernel_w, in_per_group)
        block = block.permute(1, 2, 3, 4, 5, 0, 6).reshape(
            batch, rows.stop - rows.start, out_width, kernel_h, kernel_w, groups * in_per_group
        )
        stride_h = spec.stride[0]
        shifted = grad_padded[:, rows.start * stride_h :]
        for i in range(kernel_h):
            for j in range(kernel_w):
                window = _tap_window(shifted, spec, i, j, rows.stop - rows.start, out_width)
                window += block[:, :, :, i, j]

    def _depthwise_backward(self, grad_nhwc, padded, grad_padded, weight, spec):
        groups = spec.groups
        multiplier = weight.shape[0] // groups
        batch, out_height, out_width, _ = grad_nhwc.shape
        grad_split = grad_nhwc.view(batch, out_height, out_width, groups, multiplier)
        taps = weight.reshape(groups, multiplier, weight.shape[2], weight.shape[3])
        # Outside grad mode (not double backward) each tap's product goes to one reused buffer and its sum
        # straight into grad_taps: a fresh product per tap with its small sum allocated after it left
        # glibc unable to reuse the freed products (801 taps of a 16 MB product held 13 GB).
        reuse = padded is not None and not torch.is_grad_enabled()
        product = torch.empty_like(grad_split) if reuse else None
        grad_taps = grad_split.new_empty(weight.shape[2] * weight.shape[3], groups, multiplier) if reuse else []
        for i in range(weight.shape[2]):
            for j in range(weight.shape[3]):
                if padded is not None:
                    window = _tap_window(padded, spec, i, j, out_height, out_width).unsqueeze(-1)
                    if reuse:
                        torch.sum(torch.mul(grad_split, window, out=product), dim=(0, 1, 2), out=grad_taps[i * weight.shape[3] + j])
                    else:
                        grad_taps.append((grad_split * window).sum(dim=(0, 1, 2)))
                if grad_padded is not None:
                    grad_window = _tap_window(grad_padded, spec, i, j, out_height, out_width)
                    grad_window += (grad_split * taps[:, :, i, j]).sum(dim=-1)
        if padded is None:
            return None
        stacked = grad_taps.permute(1, 2, 0) if reuse else torch.stack(grad_taps, dim=-1)  # (groups, m, kH*kW)
        return stacked.reshape(weight.shape)


register(Im2col())
