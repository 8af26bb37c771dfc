"""grad_input as a transposed implicit GEMM, split into stride phases so no work lands on inserted zeros.

grad_input[n, ih, iw, c] = sum over (o, i, j) of grad_output[n, oh, ow, o] * weight[o, c, i, j] where
ih + pad_top = oh * stride_h + i * dil_h (and likewise for columns). Only taps with
i * dil_h = ih + pad_top (mod stride_h) contribute to a given input row, so input rows are split by
phase r = (ih + pad_top) mod stride_h: within one phase the contributing taps are fixed
(i = tap0 + q * tap_step) and each is a dense shifted read of grad_output. Each of the
stride_h * stride_w phases is one dense implicit GEMM, per group g:
grad_input_phase[M, N] = grad_output_taps[M, K] @ weight_t[N, K]^T with M = N_img * (phase rows) *
(phase cols), N = C_in/g, K = (taps in the phase) * C_out/g. This is the zero-inserted ("dilated
grad_output") formulation without the zeros: stride**2 less work.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, fields

import triton
import triton.language as tl

from kernels.triton_launch import Launch, cdiv
from kernels.triton_tuning import bench_options, configs, jit, prune


def _extents(args: dict) -> dict[str, int]:
    per_tap = args["out_per_group"] * (args["taps_h"] * args["taps_w"] if args["FLAT_K"] else 1)
    return {"BLOCK_M": args["rows"], "BLOCK_N": args["in_per_group"], "BLOCK_K": per_tap}


@triton.autotune(
    configs=configs(),
    key=["rows", "in_per_group", "out_per_group", "taps_h", "taps_w", "FLAT_K", "PRECISION"],
    prune_configs_by=prune(_extents),
    **bench_options(),
)
@jit
def _grad_input_kernel(
    grad_output_ptr,  # grad_output (N, H_out, W_out, C_out), addressed through the go_stride_* below
    weight_ptr,  # weight (C_out, C_in/g, kH, kW), addressed through the w_stride_* below
    grad_input_ptr,  # grad_input (N, H, W, C_in), contiguous
    rows,  # N * phase_rows * phase_cols
    phase_rows,  # input rows / columns in this phase
    phase_cols,
    first_row,  # first input row / column of this phase
    first_col,
    tap0_h,  # first kernel row / column in this phase, the step between its taps, and how many
    tap0_w,
    tap_step_h,
    tap_step_w,
    taps_h,
    taps_w,
    base_oh,  # grad_output row / column that phase row / column 0 reads through tap0
    base_ow,
    oh_step,  # grad_output rows / columns between consecutive taps of the phase
    ow_step,
    height,
    width,
    out_height,
    out_width,
    in_per_group,
    out_per_group,
    in_channels,
    stride_h,
    stride_w,
    go_stride_n,
    go_stride_h,
    go_stride_w,
    go_stride_c,
    w_stride_g,  # weight element (group, o, c, kh, kw): the groups' stride, then the rest
    w_stride_o,  # 1 for the K-major copy (g, C_in/g, kH, kW, C_out/g) that TF32 needs
    w_stride_c,  # 1 for a channels-last weight, used as is in 16 bits (N-major B tiles)
    w_stride_h,
    w_stride_w,
    FLAT_K: tl.constexpr,  # walk K as one flattened (tap, channel) axis: for C_out/g below one K tile
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    group = tl.program_id(1)
    tiles_m = tl.cdiv(rows, BLOCK_M)
    tiles_n = tl.cdiv(in_per_group, BLOCK_N)
    first_m = (pid // (GROUP_M * tiles_n)) * GROUP_M
    group_size = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * tiles_n)) % group_size
    pid_n = (pid % (GROUP_M * tiles_n)) // group_size

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_m < rows
    col_ok = offs_n < in_per_group
    pixels = phase_rows * phase_cols
    image = offs_m // pixels
    pixel = offs_m % pixels
    phase_row = pixel // phase_cols
    phase_col = pixel % phase_cols
    image_ptr = grad_output_ptr + image.to(tl.int64) * go_stride_n + (group * out_per_group).to(tl.int64) * go_stride_c
    group_weights = weight_ptr + group.to(tl.int64) * w_stride_g
    weight_cols = offs_n * w_stride_c

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if FLAT_K:
        reduction = taps_h * taps_w * out_per_group
        for k0 in range(0, reduction, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < reduction
            tap = offs_k // out_per_group
            channel = offs_k % out_per_group
            q_h = tap // taps_w
            q_w = tap % taps_w
            out_row = base_oh + phase_row[:, None] - q_h[None, :] * oh_step
            out_col = base_ow + phase_col[:, None] - q_w[None, :] * ow_step
            inside = (out_row >= 0) & (out_row < out_height) & (out_col >= 0) & (out_col < out_width)
            a_ptrs = image_ptr[:, None] + out_row * go_stride_h + out_col * go_stride_w + channel[None, :] * go_stride_c
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :] & inside, other=0.0)
            tap_offset = (tap0_h + q_h * tap_step_h) * w_stride_h + (tap0_w + q_w * tap_step_w) * w_stride_w
            b_ptrs = group_weights + (tap_offset + channel * w_stride_o)[:, None] + weight_cols[None, :]
            b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
    else:
        channel_blocks = tl.cdiv(out_per_group, BLOCK_K)
        for step in range(0, taps_h * taps_w * channel_blocks):
            tap = step // channel_blocks
            offs_c = (step % channel_blocks) * BLOCK_K + tl.arange(0, BLOCK_K)
            c_ok = offs_c < out_per_group
            q_h = tap // taps_w
            q_w = tap % taps_w
            out_row = base_oh + phase_row - q_h * oh_step
            out_col = base_ow + phase_col - q_w * ow_step
            pixel_ok = row_ok & (out_row >= 0) & (out_row < out_height) & (out_col >= 0) & (out_col < out_width)
            a_ptrs = image_ptr[:, None] + (out_row * go_stride_h + out_col * go_stride_w)[:, None] + offs_c[None, :] * go_stride_c
            a = tl.load(a_ptrs, mask=pixel_ok[:, None] & c_ok[None, :], other=0.0)
            tap_offset = (tap0_h + q_h * tap_step_h) * w_stride_h + (tap0_w + q_w * tap_step_w) * w_stride_w
            b_ptrs = group_weights + (tap_offset + offs_c * w_stride_o)[:, None] + weight_cols[None, :]
            b = tl.load(b_ptrs, mask=c_ok[:, None] & col_ok[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)

    in_row = first_row + phase_row * stride_h
    in_col = first_col + phase_col * stride_w
    out_offsets = ((image.to(tl.int64) * height + in_row) * width + in_col) * in_channels
    out_ptrs = grad_input_ptr + out_offsets[:, None] + (group * in_per_group + offs_n)[None, :]
    tl.store(out_ptrs, acc.to(grad_input_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def _phase_taps(phase: int, stride: int, dilation: int, kernel: int) -> tuple[int, int, int]:
    """(first tap, tap step, tap count) of the kernel taps i with i * dilation = phase (mod stride)."""
    step = stride // math.gcd(stride, dilation)
    first = next((i for i in range(min(kernel, step)) if (i * dilation - phase) % stride == 0), None)
    if first is None:
        return 0, step, 0
    return first, step, len(range(first, kernel, step))


@dataclass(frozen=True)
class Phase:
    """The input pixels (first_row + t * stride_h, first_col + u * stride_w) and the kernel taps that reach them."""

    phase_rows: int
    phase_cols: int
    first_row: int
    first_col: int
    tap0_h: int
    tap0_w: int
    tap_step_h: int
    tap_step_w: int
    taps_h: int
    taps_w: int
    base_oh: int
    base_ow: int
    oh_step: int
    ow_step: int

    @functools.cached_property  # the phases are cached per layer: so is this, read on every launch
    def kernel_args(self) -> tuple[int, ...]:
        """The phase's arguments in kernel order (phase_rows ... ow_step)."""
        return tuple(getattr(self, field.name) for field in fields(self))


@functools.lru_cache(maxsize=1024)
def stride_phases(spec, height: int, width: int, kernel_h: int, kernel_w: int) -> tuple[Phase, ...]:
    """The stride phases that hold input pixels, which partition them: min(stride, size) per axis.

    Walked by first pixel (first_row < min(stride_h, height)), not by phase: a stride far past the
    image (the service allows one up to the kernel's span) has stride_h * stride_w phases, nearly all empty.
    """
    (stride_h, stride_w), (dil_h, dil_w) = spec.stride, spec.dilation
    top, left = spec.padding[0], spec.padding[2]
    columns = []
    for first_col in range(min(stride_w, width)):
        phase_w = (first_col + left) % stride_w
        columns.append((first_col, _phase_taps(phase_w, stride_w, dil_w, kernel_w)))
    phases = []  # returned as a tuple: the result is cached (a layer's backward asks again every step)
    for first_row in range(min(stride_h, height)):
        tap0_h, tap_step_h, taps_h = _phase_taps((first_row + top) % stride_h, stride_h, dil_h, kernel_h)
        for first_col, (tap0_w, tap_step_w, taps_w) in columns:
            phases.append(
                Phase(
                    phase_rows=len(range(first_row, height, stride_h)),
                    phase_cols=len(range(first_col, width, stride_w)),
                    first_row=first_row,
                    first_col=first_col,
                    tap0_h=tap0_h,
                    tap0_w=tap0_w,
                    tap_step_h=tap_step_h,
                    tap_step_w=tap_step_w,
                    taps_h=taps_h,
                    taps_w=taps_w,
                    # Exact divisions: first_row + top = tap0_h * dil_h (mod stride_h) by construction.
                    base_oh=(first_row + top - tap0_h * dil_h) // stride_h,
                    base_ow=(first_col + left - tap0_w * dil_w) // stride_w,
                    oh_step=tap_step_h * dil_h // stride_h,
                    ow_step=tap_step_w * dil_w // stride_w,
                )
            )
    return tuple(phases)


@functools.lru_cache(maxsize=1024)
def grad_input_plan(
    grad_output_shape, grad_output_strides, dtype, device, input_shape, weight_shape, weight_strides, spec, flat_k: bool, precision: str
):
    """One layer's launches, per stride phase: a Launch, or the (first_row, first_col) of a phase no tap reaches.

    grad_output (N, C_out, H_out, W_out) with `grad_output_strides`; input (N, C_in, H, W); weight
    (C_out, C_in/g, kH, kW) addressed through `weight_strides` (group, C_out/g, C_in/g, kh, kw).
    Grid per phase: (phase-pixel tiles x C_in/g tiles, groups).
    """
    batch, out_channels, out_height, out_width = grad_output_shape
    _, in_channels, height, width = input_shape
    _, in_per_group, kernel_h, kernel_w = weight_shape
    groups = spec.groups
    out_per_group = out_channels // groups
    go_stride_n, go_stride_c, go_stride_h, go_stride_w = grad_output_strides
    steps = []
    for phase in stride_phases(spec, height, width, kernel_h, kernel_w):
        if phase.taps_h == 0 or phase.taps_w == 0:
            steps.append((phase.first_row, phase.first_col))
            continue
        rows = batch * phase.phase_rows * phase.phase_cols

        def grid(meta, rows=rows):
            return (cdiv(rows, meta["BLOCK_M"]) * cdiv(in_per_group, meta["BLOCK_N"]), groups)

        scalars = (rows, *phase.kernel_args, height, width, out_height, out_width, in_per_group, out_per_group, in_channels)
        scalars += (*spec.stride, go_stride_n, go_stride_h, go_stride_w, go_stride_c, *weight_strides)
        steps.append(Launch(_grad_input_kernel, grid, scalars, {"FLAT_K": flat_k, "PRECISION": precision}))
    return tuple(steps)


def conv_grad_input(grad_output, weight, weight_strides, weight_shape, grad_input, spec, flat_k: bool, precision: str) -> None:
    """grad_input, written in full (the phases partition the input pixels).

    grad_output (N, C_out, H_out, W_out), any strides (channels-last memory makes the K tiles
    contiguous); `weight` holds the (C_out, C_in/g, kH, kW) weight of `weight_shape` at
    `weight_strides` (group, C_out/g, C_in/g, kh, kw): the weight itself or a re-laid-out copy;
    grad_input (N, C_in, H, W) in channels-last memory. All in one dtype.
    """
    steps = grad_input_plan(
        grad_output.shape,
        grad_output.stride(),
        grad_output.dtype,
        grad_output.device,
        grad_input.shape,
        weight_shape,
        weight_strides,
        spec,
        flat_k,
        precision,
    )
    run_phases(steps, grad_output, weight, grad_input, spec)


def run_phases(steps: tuple, grad_output, weight, grad_input, spec) -> None:
    """Run a grad_input plan (this module's or the depthwise one): each phase's launch, or zeros where no tap reaches."""
    for step in steps:
        if isinstance(step, Launch):
            step(grad_output, weight, grad_input)
        else:  # no kernel tap reaches these input pixels (e.g. even dilation with stride 2): zero gradient
            first_row, first_col = step
            grad_input[:, :, first_row :: spec.stride[0], first_col :: spec.stride[1]] = 0
