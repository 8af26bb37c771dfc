"""Depthwise conv (one input channel per group, channel multiplier m = C_out/groups): direct kernels.

A depthwise conv is not a GEMM worth the name: per group its "N" is m (usually 1) and its "K" is
kH*kW, far below tl.dot's 16 x 16 minimum, so the implicit-GEMM kernels would spend >90% of
every tensor-core op on padding. These kernels are memory-bound FMAs over (pixels x channels)
tiles of channels-last tensors instead (cuDNN also uses dedicated depthwise kernels), with float32
accumulation, the same stride-phase split for grad_input, and the same split-K + fixed-order
reduction for grad_weight as the GEMM kernels.

Output channel o reads input channel o // m. Weight layout here: (kH*kW, C_out) contiguous.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_grad_input import stride_phases
from kernels.triton_grad_weight import choose_splits, sum_splits
from kernels.triton_launch import cdiv, launch
from kernels.triton_tuning import bench_options, depthwise_configs, jit, prune


def _pixel_channel_extents(pixels: str, channels: str):
    return lambda args: {"BLOCK_P": args[pixels], "BLOCK_C": args[channels]}


@triton.autotune(
    configs=depthwise_configs(),
    key=["rows", "out_channels", "kernel_h", "kernel_w", "stride_h", "stride_w"],
    prune_configs_by=prune(_pixel_channel_extents("rows", "out_channels")),
    **bench_options(),
)
@jit
def _dw_fwd_kernel(
    input_ptr,  # input (N, H, W, C_in), addressed through the in_stride_* below
    weight_ptr,  # weight (kH*kW, C_out), contiguous
    bias_ptr,  # bias (C_out,); unused when HAS_BIAS is False
    output_ptr,  # output (N, H_out, W_out, C_out), contiguous
    rows,  # N * H_out * W_out
    height,
    width,
    out_height,
    out_width,
    out_channels,
    multiplier,
    kernel_h,
    kernel_w,
    in_stride_n,
    in_stride_h,
    in_stride_w,
    in_stride_c,
    stride_h,
    stride_w,
    pad_top,
    pad_left,
    dil_h,
    dil_w,
    HAS_BIAS: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    p_ok = offs_p < rows
    c_ok = offs_c < out_channels
    pixels = out_height * out_width
    image = offs_p // pixels
    top_row = ((offs_p % pixels) // out_width) * stride_h - pad_top
    left_col = ((offs_p % pixels) % out_width) * stride_w - pad_left
    image_ptr = input_ptr + image.to(tl.int64) * in_stride_n
    channel_offset = (offs_c // multiplier) * in_stride_c
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for tap in range(0, kernel_h * kernel_w):
        in_row = top_row + (tap // kernel_w) * dil_h
        in_col = left_col + (tap % kernel_w) * dil_w
        pixel_ok = p_ok & (in_row >= 0) & (in_row < height) & (in_col >= 0) & (in_col < width)
        x_ptrs = image_ptr[:, None] + (in_row * in_stride_h + in_col * in_stride_w)[:, None] + channel_offset[None, :]
        x = tl.load(x_ptrs, mask=pixel_ok[:, None] & c_ok[None, :], other=0.0)
        w = tl.load(weight_ptr + tap * out_channels + offs_c, mask=c_ok, other=0.0)
        acc += x.to(tl.float32) * w.to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    out_ptrs = output_ptr + offs_p.to(tl.int64)[:, None] * out_channels + offs_c[None, :]
    tl.store(out_ptrs, acc.to(output_ptr.dtype.element_ty), mask=p_ok[:, None] & c_ok[None, :])


@triton.autotune(
    configs=depthwise_configs(),
    key=["rows", "in_channels", "multiplier", "taps_h", "taps_w"],
    prune_configs_by=prune(_pixel_channel_extents("rows", "in_channels")),
    **bench_options(),
)
@jit
def _dw_grad_input_kernel(
    grad_output_ptr,  # grad_output (N, H_out, W_out, C_out), addressed through the go_stride_* below
    weight_ptr,  # weight (kH*kW, C_out), contiguous
    grad_input_ptr,  # grad_input (N, H, W, C_in), contiguous
    rows,  # N * phase_rows * phase_cols; the phase arguments as in kernels/triton_grad_input.py
    phase_rows,
    phase_cols,
    first_row,
    first_col,
    tap0_h,
    tap0_w,
    tap_step_h,
    tap_step_w,
    taps_h,
    taps_w,
    base_oh,
    base_ow,
    oh_step,
    ow_step,
    height,
    width,
    out_height,
    out_width,
    in_channels,
    multiplier,
    kernel_w,
    stride_h,
    stride_w,
    go_stride_n,
    go_stride_h,
    go_stride_w,
    go_stride_c,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    p_ok = offs_p < rows
    c_ok = offs_c < in_channels
    pixels = phase_rows * phase_cols
    image = offs_p // pixels
    phase_row = (offs_p % pixels) // phase_cols
    phase_col = (offs_p % pixels) % phase_cols
    image_ptr = grad_output_ptr + image.to(tl.int64) * go_stride_n
    out_channels = in_channels * multiplier
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for q in range(0, taps_h * taps_w):
        q_h = q // taps_w
        q_w = q % taps_w
        out_row = base_oh + phase_row - q_h * oh_step
        out_col = base_ow + phase_col - q_w * ow_step
        pixel_ok = p_ok & (out_row >= 0) & (out_row < out_height) & (out_col >= 0) & (out_col < out_width)
        tap = (tap0_h + q_h * tap_step_h) * kernel_w + tap0_w + q_w * tap_step_w
        row_ptr = image_ptr + out_row * go_stride_h + out_col * go_stride_w
        for r in range(0, multiplier):
            channel_out = offs_c * multiplier + r
            g = tl.load(row_ptr[:, None] + channel_out[None, :] * go_stride_c, mask=pixel_ok[:, None] & c_ok[None, :], other=0.0)
            w = tl.load(weight_ptr + tap * out_channels + channel_out, mask=c_ok, other=0.0)
            acc += g.to(tl.float32) * w.to(tl.float32)[None, :]
    in_row = first_row + phase_row * stride_h
    in_col = first_col + phase_col * stride_w
    out_offsets = ((image.to(tl.int64) * height + in_row) * width + in_col) * in_channels
    tl.store(
        grad_input_ptr + out_offsets[:, None] + offs_c[None, :], acc.to(grad_input_ptr.dtype.element_ty), mask=p_ok[:, None] & c_ok[None, :]
    )


@triton.autotune(
    configs=depthwise_configs(),
    key=["rows_per_split", "splits", "out_channels", "kernel_h", "kernel_w"],
    prune_configs_by=prune(_pixel_channel_extents("rows_per_split", "out_channels")),
    **bench_options(),
)
@jit
def _dw_grad_weight_kernel(
    input_ptr,  # input (N, H, W, C_in), addressed through the in_stride_* below
    grad_output_ptr,  # grad_output (N, H_out, W_out, C_out), addressed through the go_stride_* below
    workspace_ptr,  # float32 (splits, kH*kW, C_out), contiguous; every element written
    rows,  # N * H_out * W_out: the reduction length
    rows_per_split,
    splits,
    height,
    width,
    out_height,
    out_width,
    out_channels,
    multiplier,
    kernel_h,
    kernel_w,
    in_stride_n,
    in_stride_h,
    in_stride_w,
    in_stride_c,
    go_stride_n,
    go_stride_h,
    go_stride_w,
    go_stride_c,
    stride_h,
    stride_w,
    pad_top,
    pad_left,
    dil_h,
    dil_w,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    tap = tl.program_id(1)
    split = tl.program_id(2)
    c_ok = offs_c < out_channels
    tap_row = (tap // kernel_w) * dil_h - pad_top
    tap_col = (tap % kernel_w) * dil_w - pad_left
    channel_in = (offs_c // multiplier) * in_stride_c
    pixels = out_height * out_width
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    start = split * rows_per_split
    end = min(start + rows_per_split, rows)
    for p0 in range(start, end, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        p_ok = offs_p < end
        image = (offs_p // pixels).to(tl.int64)
        out_row = (offs_p % pixels) // out_width
        out_col = (offs_p % pixels) % out_width
        in_row = out_row * stride_h + tap_row
        in_col = out_col * stride_w + tap_col
        pixel_ok = p_ok & (in_row >= 0) & (in_row < height) & (in_col >= 0) & (in_col < width)
        x_ptrs = input_ptr + (image * in_stride_n + in_row * in_stride_h + in_col * in_stride_w)[:, None] + channel_in[None, :]
        x = tl.load(x_ptrs, mask=pixel_ok[:, None] & c_ok[None, :], other=0.0)
        g_ptrs = (
            grad_output_ptr + (image * go_stride_n + out_row * go_stride_h + out_col * go_stride_w)[:, None] + offs_c[None, :] * go_stride_c
        )
        g = tl.load(g_ptrs, mask=p_ok[:, None] & c_ok[None, :], other=0.0)
        acc += x.to(tl.float32) * g.to(tl.float32)
    total = tl.sum(acc, axis=0)
    ws_ptrs = workspace_ptr + (split * kernel_h * kernel_w + tap).to(tl.int64) * out_channels + offs_c
    tl.store(ws_ptrs, total, mask=c_ok)


def depthwise_forward(input_nhwc, weight_taps, bias, output_nhwc, spec, kernel_size: tuple[int, int]) -> None:
    """Launch: input (N, H, W, C_in) strided, weight_taps (kH*kW, C_out), output (N, H_out, W_out, C_out).

    Grid: (output-pixel tiles, C_out tiles).
    """
    batch, height, width, in_channels = input_nhwc.shape
    _, out_height, out_width, out_channels = output_nhwc.shape
    rows = batch * out_height * out_width

    def grid(meta):
        return (cdiv(rows, meta["BLOCK_P"]), cdiv(out_channels, meta["BLOCK_C"]))

    launch(
        _dw_fwd_kernel,
        grid,
        (input_nhwc, weight_taps, bias if bias is not None else weight_taps, output_nhwc),
        rows,
        height,
        width,
        out_height,
        out_width,
        out_channels,
        out_channels // in_channels,
        *kernel_size,
        *input_nhwc.stride(),
        *spec.stride,
        spec.padding[0],
        spec.padding[2],
        *spec.dilation,
        HAS_BIAS=bias is not None,
    )


def depthwise_grad_input(grad_output_nhwc, weight_taps, grad_input_nhwc, spec, kernel_size: tuple[int, int]) -> None:
    """Launch per stride phase: grad_output (N, H_out, W_out, C_out) strided, weight_taps (kH*kW, C_out),
    grad_input (N, H, W, C_in) contiguous, fully written. Grid per phase: (phase-pixel tiles, C_in tiles).
    """
    batch, out_height, out_width, out_channels = grad_output_nhwc.shape
    _, height, width, in_channels = grad_input_nhwc.shape
    for phase in stride_phases(spec, height, width, *kernel_size):
        if phase.taps_h == 0 or phase.taps_w == 0:
            grad_input_nhwc[:, phase.first_row :: spec.stride[0], phase.first_col :: spec.stride[1]] = 0
            continue
        rows = batch * phase.phase_rows * phase.phase_cols

        def grid(meta, rows=rows):
            return (cdiv(rows, meta["BLOCK_P"]), cdiv(in_channels, meta["BLOCK_C"]))

        launch(
            _dw_grad_input_kernel,
            grid,
            (grad_output_nhwc, weight_taps, grad_input_nhwc),
            rows,
            *phase.kernel_args,
            height,
            width,
            out_height,
            out_width,
            in_channels,
            out_channels // in_channels,
            kernel_size[1],
            *spec.stride,
            *grad_output_nhwc.stride(),
        )


def depthwise_grad_weight(
    input_nhwc, grad_output_nhwc, spec, weight_shape: torch.Size, dtype: torch.dtype, channels_last: bool
) -> torch.Tensor:
    """Launch: input (N, H, W, C_in), grad_output (N, H_out, W_out, C_out), both strided.

    Returns grad_weight (C_out, 1, kH, kW) in `dtype` (channels-last strides when `channels_last`).
    Grid: (C_out tiles, kH*kW, splits).
    """
    kernel_size = (weight_shape[2], weight_shape[3])
    batch, height, width, in_channels = input_nhwc.shape
    _, out_height, out_width, out_channels = grad_output_nhwc.shape
    taps = kernel_size[0] * kernel_size[1]
    rows = batch * out_height * out_width
    splits, rows_per_split = choose_splits(rows, cdiv(out_channels, 64) * taps, input_nhwc.device)
    workspace = torch.empty(splits, taps, out_channels, device=input_nhwc.device, dtype=torch.float32)

    def grid(meta):
        return (cdiv(out_channels, meta["BLOCK_C"]), taps, splits)

    launch(
        _dw_grad_weight_kernel,
        grid,
        (input_nhwc, grad_output_nhwc, workspace),
        rows,
        rows_per_split,
        splits,
        height,
        width,
        out_height,
        out_width,
        out_channels,
        out_channels // in_channels,
        *kernel_size,
        *input_nhwc.stride(),
        *grad_output_nhwc.stride(),
        *spec.stride,
        spec.padding[0],
        spec.padding[2],
        *spec.dilation,
    )
    # As a (splits, 1 group, taps, 1 channel, C_out) workspace, the shared reduction lays it out as (C_out, 1, kH, kW).
    return sum_splits(workspace.view(splits, 1, taps, 1, out_channels), weight_shape, dtype, channels_last)
