"""Depthwise conv (one input channel per group, channel multiplier m = C_out/groups): direct kernels.

A depthwise conv is not a GEMM worth the name: per group its "N" is m (usually 1) and its "K" is
kH*kW, far below tl.dot's 16 x 16 minimum, so the implicit-GEMM kernels would spend >90% of
every tensor-core op on padding. These kernels are memory-bound FMAs over (pixels x channels)
tiles of channels-last tensors instead (cuDNN also uses dedicated depthwise kernels), with float32
accumulation, the same stride-phase split for grad_input, and the same split-K + fixed-order
reduction for grad_weight as the GEMM kernels.

Output channel o reads input channel o // m. The weight (C_out, 1, kH, kW) is read where it lies
(`tap_strides`): it is tiny, so its strided channel loads cost nothing next to the activations'.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from kernels.triton_grad_input import run_phases, stride_phases
from kernels.triton_grad_weight import GradWeightPlan, choose_splits, run_grad_weight, sum_splits_launch, weight_layout
from kernels.triton_launch import Launch, cdiv
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
    weight_ptr,  # weight (C_out, 1, kH, kW): element (o, tap) at o * w_stride_c + tap * w_stride_tap
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
    w_stride_c,
    w_stride_tap,
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
        w = tl.load(weight_ptr + tap * w_stride_tap + offs_c * w_stride_c, mask=c_ok, other=0.0)
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
    weight_ptr,  # weight (C_out, 1, kH, kW): element (o, tap) at o * w_stride_c + tap * w_stride_tap
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
    w_stride_c,
    w_stride_tap,
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
            w = tl.load(weight_ptr + tap * w_stride_tap + channel_out * w_stride_c, mask=c_ok, other=0.0)
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


def tap_strides(weight: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """(weight, (channel stride, tap stride)): the kernels read element (o, tap = kh * kW + kw) at o * channel stride + tap * tap stride.

    A contiguous or channels-last depthwise weight (C_out, 1, kH, kW) has its taps at one stride and
    is used as it is; any other strides get a contiguous copy.
    """
    _, _, kernel_h, kernel_w = weight.shape
    stride_o, _, stride_h, stride_w = weight.stride()
    if kernel_w == 1:
        return weight, (stride_o, stride_h)
    if kernel_h == 1 or stride_h == kernel_w * stride_w:
        return weight, (stride_o, stride_w)
    return tap_strides(weight.contiguous())


@functools.lru_cache(maxsize=1024)
def depthwise_forward_plan(input_shape, input_strides, dtype, device, weight_shape, weight_strides, spec, has_bias: bool) -> Launch:
    """The forward launch for one layer: input (N, C_in, H, W) with `input_strides`, weight (C_out, 1, kH, kW)
    at `weight_strides` (channel, tap). Grid: (output-pixel tiles, C_out tiles).
    """
    batch, in_channels, height, width = input_shape
    out_channels, _, kernel_h, kernel_w = weight_shape
    out_height, out_width = spec.output_size(height, width, kernel_h, kernel_w)
    rows = batch * out_height * out_width

    def grid(meta):
        return (cdiv(rows, meta["BLOCK_P"]), cdiv(out_channels, meta["BLOCK_C"]))

    in_n, in_c, in_h, in_w = input_strides
    scalars = (rows, height, width, out_height, out_width, out_channels, out_channels // in_channels, kernel_h, kernel_w)
    scalars += (in_n, in_h, in_w, in_c, *spec.stride, spec.padding[0], spec.padding[2], *spec.dilation, *weight_strides)
    return Launch(_dw_fwd_kernel, grid, scalars, {"HAS_BIAS": has_bias})


def depthwise_forward(input, weight, bias, output, spec) -> None:
    """output (N, C_out, H_out, W_out) in channels-last memory, written in full.

    input (N, C_in, H, W), any strides; weight (C_out, 1, kH, kW); bias (C_out,) contiguous or None.
    All in one dtype.
    """
    weight, weight_strides = tap_strides(weight)
    plan = depthwise_forward_plan(
        input.shape, input.stride(), input.dtype, input.device, weight.shape, weight_strides, spec, bias is not None
    )
    plan(input, weight, weight if bias is None else bias, output)


@functools.lru_cache(maxsize=1024)
def depthwise_grad_input_plan(
    grad_output_shape, grad_output_strides, dtype, device, input_shape, weight_shape, weight_strides, spec
) -> tuple:
    """One layer's launches per stride phase: a Launch, or the (first_row, first_col) of a phase no tap reaches.

    Grid per phase: (phase-pixel tiles, C_in tiles).
    """
    batch, out_channels, out_height, out_width = grad_output_shape
    _, in_channels, height, width = input_shape
    kernel_h, kernel_w = weight_shape[2], weight_shape[3]
    go_n, go_c, go_h, go_w = grad_output_strides
    steps = []
    for phase in stride_phases(spec, height, width, kernel_h, kernel_w):
        if phase.taps_h == 0 or phase.taps_w == 0:
            steps.append((phase.first_row, phase.first_col))
            continue
        rows = batch * phase.phase_rows * phase.phase_cols

        def grid(meta, rows=rows):
            return (cdiv(rows, meta["BLOCK_P"]), cdiv(in_channels, meta["BLOCK_C"]))

        scalars = (rows, *phase.kernel_args, height, width, out_height, out_width, in_channels, out_channels // in_channels, kernel_w)
        scalars += (*spec.stride, go_n, go_h, go_w, go_c, *weight_strides)
        steps.append(Launch(_dw_grad_input_kernel, grid, scalars, {}))
    return tuple(steps)


def depthwise_grad_input(grad_output, weight, grad_input, spec) -> None:
    """grad_input (N, C_in, H, W) in channels-last memory, written in full (the phases partition its pixels).

    grad_output (N, C_out, H_out, W_out), any strides; weight (C_out, 1, kH, kW).
    """
    weight, weight_strides = tap_strides(weight)
    steps = depthwise_grad_input_plan(
        grad_output.shape, grad_output.stride(), grad_output.dtype, grad_output.device, grad_input.shape, weight.shape, weight_strides, spec
    )
    run_phases(steps, grad_output, weight, grad_input, spec)


@functools.lru_cache(maxsize=1024)
def depthwise_grad_weight_plan(
    input_shape, input_strides, grad_output_shape, grad_output_strides, dtype, device, weight_shape, weight_strides, spec
) -> GradWeightPlan:
    """The launches for one layer, as for the GEMM kernels' grad_weight (`GradWeightPlan`).

    Grid: (C_out tiles, kH*kW, splits), then `sum_splits_launch`'s.
    """
    batch, in_channels, height, width = input_shape
    _, out_channels, out_height, out_width = grad_output_shape
    kernel_h, kernel_w = weight_shape[2], weight_shape[3]
    taps = kernel_h * kernel_w
    rows = batch * out_height * out_width
    splits, rows_per_split = choose_splits(rows, cdiv(out_channels, 64) * taps, device)

    def grid(meta):
        return (cdiv(out_channels, meta["BLOCK_C"]), taps, splits)

    in_n, in_c, in_h, in_w = input_strides
    go_n, go_c, go_h, go_w = grad_output_strides
    scalars = (rows, rows_per_split, splits, height, width, out_height, out_width, out_channels, out_channels // in_channels)
    scalars += (
        kernel_h,
        kernel_w,
        in_n,
        in_h,
        in_w,
        in_c,
        go_n,
        go_h,
        go_w,
        go_c,
        *spec.stride,
        spec.padding[0],
        spec.padding[2],
        *spec.dilation,
    )
    conv = Launch(_dw_grad_weight_kernel, grid, scalars, {})
    # As a (splits, 1 group, taps, 1 channel, C_out) workspace, the shared reduction lays it out as (C_out, 1, kH, kW).
    strides, channels_last = weight_layout(weight_shape, weight_strides)
    summed = sum_splits_launch(splits, 1, taps, 1, out_channels, channels_last, device)
    return GradWeightPlan(conv, summed, (splits, taps, out_channels), strides)


def depthwise_grad_weight(input, grad_output, weight, spec) -> torch.Tensor:
    """grad_weight, shaped like `weight` (C_out, 1, kH, kW) and in its layout (channels-last or contiguous).

    input (N, C_in, H, W) and grad_output (N, C_out, H_out, W_out), any strides.
    """
    plan = depthwise_grad_weight_plan(
        input.shape, input.stride(), grad_output.shape, grad_output.stride(), input.dtype, input.device, weight.shape, weight.stride(), spec
    )
    return run_grad_weight(plan, input, grad_output, weight.shape)
