"""Forward conv as an implicit GEMM: no patch matrix, the input tile is gathered straight from the input.

GEMM view, per group g: output[M, N] = patches[M, K] @ weight[N, K]^T with
M = N_img * H_out * W_out (one row per output pixel), N = C_out/g, K = kH * kW * C_in/g ordered
(kh, kw, c). A row of `patches` is the input under the kernel at that pixel; zero padding is a
load mask, so nothing is padded in memory. With a channels-last input the K tile reads C_in
contiguously, which is why the launcher converts to channels_last. The weight is stored (N, K),
K contiguous (the channels-last weight layout): both dot operands are K-major, the layout Hopper's
wgmma needs for TF32 and the cheapest one for 16-bit types.

Few output tiles over a long K (512 -> 512 3x3 at 7x7, batch 32: ~100 tiles of a 4,608-long
reduction for 132 SMs on an H200) leave SMs idle while each program walks K alone, so such problems
split the taps into `splits` ranges: each program writes its float32 partial tile to a workspace and
`_sum_taps_kernel` adds the splits in index order (deterministic), then the bias, then casts.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kernels.triton_launch import Launch, cdiv
from kernels.triton_tuning import bench_options, configs, interpreting, jit, prune, sm_count


def _extents(args: dict) -> dict[str, int]:
    per_tap = args["in_per_group"] * (args["kernel_h"] * args["kernel_w"] if args["FLAT_K"] else 1)
    return {"BLOCK_M": args["rows"], "BLOCK_N": args["out_per_group"], "BLOCK_K": per_tap}


@triton.autotune(
    configs=configs(),
    key=["rows", "in_per_group", "out_per_group", "kernel_h", "kernel_w", "stride_h", "stride_w", "splits", "FLAT_K", "PRECISION"],
    prune_configs_by=prune(_extents),
    **bench_options(),
)
@jit
def _fwd_kernel(
    input_ptr,  # input (N, H, W, C_in), addressed through the in_stride_* below
    weight_ptr,  # weight (groups, C_out/g, kH*kW*C_in/g), contiguous, K ordered (kh, kw, c): K-major B tiles
    bias_ptr,  # bias (C_out,); unused (any pointer) when HAS_BIAS is False
    output_ptr,  # output (N, H_out, W_out, C_out), contiguous; with splits > 1, float32 (splits, N*H_out*W_out, C_out)
    rows,  # N * H_out * W_out
    splits,  # ranges the taps are split into (grid axis 1 is groups * splits); 1 = no split
    taps_per_split,
    height,
    width,
    out_height,
    out_width,
    in_per_group,
    out_per_group,
    out_channels,
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
    FLAT_K: tl.constexpr,  # walk K as one flattened (tap, channel) axis: for C_in/g below one K tile
    PRECISION: tl.constexpr,  # tl.dot input_precision: "ieee" or "tf32" (ignored for 16-bit inputs)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Grouped tile order (tutorial 03) so consecutive programs share weight tiles in L2.
    pid = tl.program_id(0)
    group = tl.program_id(1) // splits
    split = tl.program_id(1) % splits
    tiles_m = tl.cdiv(rows, BLOCK_M)
    tiles_n = tl.cdiv(out_per_group, BLOCK_N)
    first_m = (pid // (GROUP_M * tiles_n)) * GROUP_M
    group_size = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * tiles_n)) % group_size
    pid_n = (pid % (GROUP_M * tiles_n)) // group_size

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_m < rows
    col_ok = offs_n < out_per_group
    pixels = out_height * out_width
    image = offs_m // pixels
    pixel = offs_m % pixels
    top_row = (pixel // out_width) * stride_h - pad_top
    left_col = (pixel % out_width) * stride_w - pad_left
    # int64: N * H * W * C may pass 2**31; offsets inside one image stay int32.
    image_ptr = input_ptr + image.to(tl.int64) * in_stride_n + (group * in_per_group).to(tl.int64) * in_stride_c
    # Input address = pixel part (per row) + (tap, channel) part (per column): one add per element.
    pixel_ptr = image_ptr + top_row * in_stride_h + left_col * in_stride_w
    reduction = kernel_h * kernel_w * in_per_group
    weight_ptr += group.to(tl.int64) * reduction * out_per_group

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if FLAT_K:
        for k0 in range(0, reduction, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < reduction
            tap = offs_k // in_per_group
            tap_row = (tap // kernel_w) * dil_h
            tap_col = (tap % kernel_w) * dil_w
            k_offset = tap_row * in_stride_h + tap_col * in_stride_w + (offs_k % in_per_group) * in_stride_c
            in_row = top_row[:, None] + tap_row[None, :]
            in_col = left_col[:, None] + tap_col[None, :]
            inside = (in_row >= 0) & (in_row < height) & (in_col >= 0) & (in_col < width)
            a_mask = row_ok[:, None] & k_ok[None, :] & inside
            a_ptrs = pixel_ptr[:, None] + k_offset[None, :]
            a = tl.load(a_ptrs, mask=a_mask, other=0.0)
            b_ptrs = weight_ptr + offs_k[:, None] + offs_n[None, :] * reduction
            b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
    else:
        # One loop over (tap, channel block) so the software pipeline sees kH*kW*C/BLOCK_K steps.
        channel_blocks = tl.cdiv(in_per_group, BLOCK_K)
        first_tap = split * taps_per_split
        last_tap = min(first_tap + taps_per_split, kernel_h * kernel_w)
        for step in range(first_tap * channel_blocks, last_tap * channel_blocks):
            tap = step // channel_blocks
            offs_c = (step % channel_blocks) * BLOCK_K + tl.arange(0, BLOCK_K)
            c_ok = offs_c < in_per_group
            tap_row = (tap // kernel_w) * dil_h
            tap_col = (tap % kernel_w) * dil_w
            in_row = top_row + tap_row
            in_col = left_col + tap_col
            pixel_ok = row_ok & (in_row >= 0) & (in_row < height) & (in_col >= 0) & (in_col < width)
            a_ptrs = pixel_ptr[:, None] + (tap_row * in_stride_h + tap_col * in_stride_w + offs_c * in_stride_c)[None, :]
            a = tl.load(a_ptrs, mask=pixel_ok[:, None] & c_ok[None, :], other=0.0)
            b_ptrs = weight_ptr + (tap * in_per_group + offs_c)[:, None] + offs_n[None, :] * reduction
            b = tl.load(b_ptrs, mask=c_ok[:, None] & col_ok[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)

    channel_out = group * out_per_group + offs_n
    if HAS_BIAS:
        acc += tl.load(bias_ptr + channel_out, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    # With splits, output_ptr is the float32 workspace and the bias is added by _sum_taps_kernel (HAS_BIAS False here).
    out_ptrs = output_ptr + (split * rows + offs_m).to(tl.int64)[:, None] * out_channels + channel_out[None, :]
    tl.store(out_ptrs, acc.to(output_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@jit
def _sum_taps_kernel(
    workspace_ptr,  # float32 (splits, N*H_out*W_out, C_out), contiguous
    bias_ptr,  # bias (C_out,); unused when HAS_BIAS is False
    output_ptr,  # output (N, H_out, W_out, C_out), contiguous
    splits,
    size,  # N*H_out*W_out*C_out: one split's elements
    out_channels,
    HAS_BIAS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < size
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    split_ptrs = workspace_ptr + offs
    for _ in range(0, splits):  # in split order: the same sum every run
        acc += tl.load(split_ptrs, mask=mask, other=0.0)
        split_ptrs += size
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % out_channels, mask=mask, other=0.0).to(tl.float32)
    tl.store(output_ptr + offs, acc.to(output_ptr.dtype.element_ty), mask=mask)


@functools.lru_cache(maxsize=1024)
def choose_tap_splits(rows: int, columns: int, groups: int, taps: int, per_tap: int, device: torch.device) -> int:
    """How many tap ranges to split a GEMM's reduction (taps x per_tap) into, for a (rows x columns) output per group.

    1 unless the output tiles leave SMs idle over a long K.

    Counted at the nominal 128 x 64 tile: below one program per SM, split so that about two per SM run,
    keeping at least 2 taps of at least 256 channels' reduction per split (shorter ranges would spend
    more on the workspace round trip than they save). Under the interpreter (CPU tests) problems with a
    reduction of 64+ split in two and smaller ones do not, so CI runs both paths.
    """
    if interpreting():
        return 2 if taps >= 2 and taps * per_tap >= 64 else 1
    tiles = cdiv(rows, 128) * cdiv(columns, 64) * groups
    sms = sm_count(device)
    if tiles >= sms or taps * per_tap < 1024:
        return 1
    return max(1, min(cdiv(2 * sms, tiles), taps // 2, 4))


class ForwardPlan(NamedTuple):
    """A layer's forward launches: `conv` into the output, or into a float32 workspace that `sum` reduces."""

    conv: Launch
    sum: Launch | None
    workspace: tuple[int, ...] | None  # (splits, N*H_out*W_out, C_out) when the taps are split


@functools.lru_cache(maxsize=1024)
def forward_plan(
    input_shape, input_strides, dtype, device, weight_shape, spec, flat_k: bool, precision: str, has_bias: bool
) -> ForwardPlan:
    """The launches for one layer: input (N, C_in, H, W) with `input_strides`, weight (C_out, C_in/g, kH, kW), all in `dtype`.

    Grid: (output-pixel tiles x C_out/g tiles, groups x tap splits); then, with splits, one program per
    1,024 output elements for the sum.
    """
    batch, in_channels, height, width = input_shape
    out_channels, in_per_group, kernel_h, kernel_w = weight_shape
    out_height, out_width = spec.output_size(height, width, kernel_h, kernel_w)
    groups = spec.groups
    rows = batch * out_height * out_width
    out_per_group = out_channels // groups

    taps = kernel_h * kernel_w
    splits = 1 if flat_k else choose_tap_splits(rows, out_per_group, groups, taps, in_per_group, device)
    taps_per_split = cdiv(taps, splits)
    splits = cdiv(taps, taps_per_split)

    def grid(meta):
        return (cdiv(rows, meta["BLOCK_M"]) * cdiv(out_per_group, meta["BLOCK_N"]), groups * splits)

    stride_n, stride_c, stride_h, stride_w = input_strides
    scalars = (rows, splits, taps_per_split, height, width, out_height, out_width, in_per_group, out_per_group, out_channels)
    scalars += (kernel_h, kernel_w, stride_n, stride_h, stride_w, stride_c, *spec.stride, spec.padding[0], spec.padding[2], *spec.dilation)
    conv = Launch(_fwd_kernel, grid, scalars, {"HAS_BIAS": has_bias and splits == 1, "FLAT_K": flat_k, "PRECISION": precision})
    if splits == 1:
        return ForwardPlan(conv, None, None)
    size, block = rows * out_channels, 1024
    summed = Launch(_sum_taps_kernel, (cdiv(size, block),), (splits, size, out_channels), {"HAS_BIAS": has_bias, "BLOCK": block})
    return ForwardPlan(conv, summed, (splits, rows, out_channels))


def conv_forward(input, weight, bias, output, spec, flat_k: bool, precision: str) -> None:
    """output = conv(input, weight) + bias, written in full.

    input (N, C_in, H, W), any strides (channels-last memory makes each K tile one contiguous run of
    channels); weight (C_out, C_in/g, kH, kW) in channels-last memory, which is the GEMM's
    (g, C_out/g, kH*kW*C_in/g) K-major operand; bias (C_out,) contiguous or None; output
    (N, C_out, H_out, W_out) in channels-last memory. All in one dtype (conv2d validates it).
    """
    plan = forward_plan(input.shape, input.stride(), input.dtype, input.device, weight.shape, spec, flat_k, precision, bias is not None)
    if plan.sum is None:
        plan.conv(input, weight, weight if bias is None else bias, output)
        return
    # Few output tiles over a long K: split partial sums, added in split order with the bias, then cast.
    workspace = torch.empty(plan.workspace, device=output.device, dtype=torch.float32)
    plan.conv(input, weight, weight, workspace)
    plan.sum(workspace, workspace if bias is None else bias, output)
