"""grad_weight as an implicit GEMM reduced over output pixels, split-K into an fp32 workspace.

GEMM view, per group g: grad_weight[M, N] = patches[P, M]^T @ grad_output[P, N] with
M = kH * kW * C_in/g ordered (kh, kw, c), N = C_out/g and the reduction over P = N_img * H_out * W_out.
P is large and M * N small, so P is split into `splits` contiguous chunks, each program writes its
partial tile to workspace[split] (plain stores, no atomics), and `_sum_splits_kernel` adds the
splits in index order. Same shapes -> same splits -> same order of additions: bitwise reproducible.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kernels.function import channels_last_strides, strides_prefer_channels_last
from kernels.triton_launch import Launch, cdiv
from kernels.triton_tuning import bench_options, configs, interpreting, jit, prune, sm_count


def _extents(args: dict) -> dict[str, int]:
    per_tap = args["in_per_group"] * (args["kernel_h"] * args["kernel_w"] if args["FLAT_K"] else 1)
    return {"BLOCK_M": per_tap, "BLOCK_N": args["out_per_group"], "BLOCK_K": args["rows_per_split"]}


@triton.autotune(
    configs=configs(register_path=True),
    key=["rows_per_split", "splits", "in_per_group", "out_per_group", "kernel_h", "kernel_w", "FLAT_K", "PRECISION"],
    prune_configs_by=prune(_extents),
    **bench_options(),
)
@jit
def _grad_weight_kernel(
    input_ptr,  # input (N, H, W, C_in), addressed through the in_stride_* below
    grad_output_ptr,  # grad_output (N, H_out, W_out, C_out), addressed through the go_stride_* below
    workspace_ptr,  # float32 (splits, groups, kH*kW*C_in/g, C_out/g), contiguous; every element written
    rows,  # N * H_out * W_out: the reduction length
    rows_per_split,
    splits,
    height,
    width,
    out_height,
    out_width,
    in_per_group,
    out_per_group,
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
    FLAT_K: tl.constexpr,  # tile M over the flattened (tap, channel) axis: for C_in/g below one tile
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,  # over kH*kW*C_in/g (flat) or C_in/g within one tap
    BLOCK_N: tl.constexpr,  # over C_out/g
    BLOCK_K: tl.constexpr,  # over output pixels
    GROUP_M: tl.constexpr,  # unused: the grid here is small enough that tile order does not matter
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    group = tl.program_id(2) // splits
    split = tl.program_id(2) % splits
    reduction = kernel_h * kernel_w * in_per_group
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < out_per_group
    if FLAT_K:
        offs_k = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        k_ok = offs_k < reduction
        tap = offs_k // in_per_group
        channel = offs_k % in_per_group
    else:
        channel_blocks = tl.cdiv(in_per_group, BLOCK_M)
        tap = pid_m // channel_blocks
        channel = (pid_m % channel_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
        k_ok = channel < in_per_group
        offs_k = tap * in_per_group + channel
    tap_row = (tap // kernel_w) * dil_h - pad_top
    tap_col = (tap % kernel_w) * dil_w - pad_left
    # Input address = pixel part + (tap, channel) part: one add per tile element in the loop.
    k_offset = tap_row * in_stride_h + tap_col * in_stride_w + channel * in_stride_c
    input_ptr += (group * in_per_group).to(tl.int64) * in_stride_c
    grad_output_ptr += (group * out_per_group).to(tl.int64) * go_stride_c

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    start = split * rows_per_split
    end = min(start + rows_per_split, rows)
    pixels = out_height * out_width
    for p0 in range(start, end, BLOCK_K):
        offs_p = p0 + tl.arange(0, BLOCK_K)
        p_ok = offs_p < end
        image = (offs_p // pixels).to(tl.int64)
        out_row = (offs_p % pixels) // out_width
        out_col = (offs_p % pixels) % out_width
        pixel_row = out_row * stride_h
        pixel_col = out_col * stride_w
        pixel_offset = image * in_stride_n + pixel_row * in_stride_h + pixel_col * in_stride_w
        # Patches^T tile (BLOCK_M taps/channels, BLOCK_K pixels); zero padding is the mask. Per tap
        # (not flat) the bounds depend on the pixel only.
        if FLAT_K:
            in_row = pixel_row[None, :] + tap_row[:, None]
            in_col = pixel_col[None, :] + tap_col[:, None]
        else:
            in_row = pixel_row[None, :] + tap_row
            in_col = pixel_col[None, :] + tap_col
        inside = (in_row >= 0) & (in_row < height) & (in_col >= 0) & (in_col < width)
        a_ptrs = input_ptr + pixel_offset[None, :] + k_offset[:, None]
        a = tl.load(a_ptrs, mask=k_ok[:, None] & p_ok[None, :] & inside, other=0.0)
        go_offsets = image * go_stride_n + out_row * go_stride_h + out_col * go_stride_w
        b_ptrs = grad_output_ptr + go_offsets[:, None] + offs_n[None, :] * go_stride_c
        b = tl.load(b_ptrs, mask=p_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)

    groups = tl.num_programs(2) // splits
    tile_base = (split * groups + group).to(tl.int64) * reduction * out_per_group
    ws_ptrs = workspace_ptr + tile_base + offs_k[:, None] * out_per_group + offs_n[None, :]
    tl.store(ws_ptrs, acc, mask=k_ok[:, None] & col_ok[None, :])


@jit
def _sum_splits_kernel(
    workspace_ptr,  # float32 (splits, groups, kH*kW, C_in/g, C_out/g), contiguous
    grad_weight_ptr,  # grad_weight (C_out, C_in/g, kH, kW) in the weight's dtype: NCHW or channels-last memory
    splits,
    size,  # groups * kH*kW * C_in/g * C_out/g: one split's elements
    reduction,  # kH*kW * C_in/g: specialised (unlike taps), so a multiple of 16 makes the row stores vectors
    taps,
    in_per_group,
    out_per_group,
    CHANNELS_LAST: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_O: tl.constexpr,
):
    # A (BLOCK_R x BLOCK_O) tile of one group's (kH*kW*C_in/g) x (C_out/g) matrix: read along C_out, the
    # workspace's contiguous axis, written along r, the weight's (one output channel's elements are
    # contiguous in either layout). The tile's r enumerates them in memory order: (c, tap) for NCHW,
    # (tap, c) for channels-last. A 1-D pass read along C_out and so wrote every element to another
    # cache line (37 us for 512 x 512 x 3 x 3 on an H200).
    group = tl.program_id(2)
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    mask = (offs_r < reduction)[:, None] & (offs_o < out_per_group)[None, :]
    if CHANNELS_LAST:
        source_r = offs_r
    else:
        source_r = (offs_r % taps) * in_per_group + offs_r // taps
    split_ptrs = workspace_ptr + (group * reduction + source_r).to(tl.int64)[:, None] * out_per_group + offs_o[None, :]
    acc = tl.zeros((BLOCK_R, BLOCK_O), dtype=tl.float32)
    for _ in range(0, splits):
        acc += tl.load(split_ptrs, mask=mask, other=0.0)
        split_ptrs += size
    dst = (group * out_per_group + offs_o).to(tl.int64)[None, :] * reduction + offs_r[:, None]
    tl.store(grad_weight_ptr + dst, acc.to(grad_weight_ptr.dtype.element_ty), mask=mask)


@functools.lru_cache(maxsize=1024)  # asked on every backward; ~40 us of Python
def choose_splits(rows: int, tiles: int, device: torch.device, max_splits: int = 256) -> tuple[int, int]:
    """(splits, rows_per_split): enough programs to fill the GPU, a fixed function of the shapes.

    `tiles` is the number of output tiles per split at the nominal 64 x 64 tile; `max_splits` keeps a
    grid axis that multiplies splits by something else under CUDA's 65535 limit.
    """
    if interpreting():
        # Small chunks so the CPU tests exercise several splits on small shapes.
        rows_per_split = max(32, cdiv(rows, 4))
    else:
        programs = 4 * sm_count(device)
        splits = max(1, min(256, max_splits, cdiv(programs, tiles), cdiv(rows, 1024)))
        rows_per_split = cdiv(cdiv(rows, splits), 128) * 128
    rows_per_split = max(1, rows_per_split)
    return cdiv(rows, rows_per_split), rows_per_split


class GradWeightPlan(NamedTuple):
    """A layer's grad_weight launches: `conv` into a float32 workspace of partial sums, `sum` into grad_weight."""

    conv: Launch
    sum: Launch
    workspace: tuple[int, ...]  # (splits, groups, kH*kW*C_in/g, C_out/g)
    strides: tuple[int, ...]  # grad_weight's: dense in the weight's own layout, as cuDNN returns it


def weight_layout(weight_shape, weight_strides) -> tuple[tuple[int, ...], bool]:
    """(strides, channels_last) of a dense gradient for a weight of this shape and these strides.

    The gradient takes the weight's layout, channels-last or contiguous, with the strides torch.empty
    gives that memory format (allocated with torch.empty_strided)."""
    _, in_per_group, kernel_h, kernel_w = weight_shape
    if strides_prefer_channels_last(weight_shape, weight_strides):
        return channels_last_strides(weight_shape), True
    return (in_per_group * kernel_h * kernel_w, kernel_h * kernel_w, kernel_w, 1), False


@functools.lru_cache(maxsize=1024)
def grad_weight_plan(
    input_shape,
    input_strides,
    grad_output_shape,
    grad_output_strides,
    dtype,
    device,
    weight_shape,
    weight_strides,
    spec,
    flat_k: bool,
    precision: str,
) -> GradWeightPlan:
    """The launches for one layer: input (N, C_in, H, W), grad_output (N, C_out, H_out, W_out), weight, with these strides.

    Grid: (K tiles, C_out/g tiles, groups x splits), then `sum_splits_launch`'s.
    """
    batch, in_channels, height, width = input_shape
    _, out_channels, out_height, out_width = grad_output_shape
    groups = spec.groups
    in_per_group, out_per_group = in_channels // groups, out_channels // groups
    kernel_h, kernel_w = weight_shape[2], weight_shape[3]
    reduction = kernel_h * kernel_w * in_per_group
    rows = batch * out_height * out_width
    tiles = cdiv(reduction, 64) * cdiv(out_per_group, 64) * groups
    splits, rows_per_split = choose_splits(rows, tiles, device, max_splits=65535 // groups)

    def grid(meta):
        if flat_k:
            tiles_m = cdiv(reduction, meta["BLOCK_M"])
        else:
            tiles_m = kernel_h * kernel_w * cdiv(in_per_group, meta["BLOCK_M"])
        return (tiles_m, cdiv(out_per_group, meta["BLOCK_N"]), groups * splits)

    in_n, in_c, in_h, in_w = input_strides
    go_n, go_c, go_h, go_w = grad_output_strides
    scalars = (rows, rows_per_split, splits, height, width, out_height, out_width, in_per_group, out_per_group, kernel_h, kernel_w)
    scalars += (in_n, in_h, in_w, in_c, go_n, go_h, go_w, go_c, *spec.stride, spec.padding[0], spec.padding[2], *spec.dilation)
    conv = Launch(_grad_weight_kernel, grid, scalars, {"FLAT_K": flat_k, "PRECISION": precision})
    strides, channels_last = weight_layout(weight_shape, weight_strides)
    summed = sum_splits_launch(splits, groups, kernel_h * kernel_w, in_per_group, out_per_group, channels_last, device)
    return GradWeightPlan(conv, summed, (splits, groups, reduction, out_per_group), strides)


def conv_grad_weight(input, grad_output, weight, spec, flat_k: bool, precision: str) -> torch.Tensor:
    """grad_weight, shaped like `weight` (C_out, C_in/g, kH, kW) and in its layout (channels-last or contiguous).

    input (N, C_in, H, W) and grad_output (N, C_out, H_out, W_out), any strides (channels-last
    memory makes the tile loads contiguous runs of channels). All in one dtype.
    """
    plan = grad_weight_plan(
        input.shape,
        input.stride(),
        grad_output.shape,
        grad_output.stride(),
        input.dtype,
        input.device,
        weight.shape,
        weight.stride(),
        spec,
        flat_k,
        precision,
    )
    return run_grad_weight(plan, input, grad_output, weight.shape)


def run_grad_weight(plan: GradWeightPlan, input: torch.Tensor, grad_output: torch.Tensor, weight_shape: torch.Size) -> torch.Tensor:
    """Run a grad_weight plan (this module's or the depthwise one): partial sums, then their ordered reduction."""
    workspace = torch.empty(plan.workspace, device=input.device, dtype=torch.float32)
    grad_weight = torch.empty_strided(weight_shape, plan.strides, device=input.device, dtype=input.dtype)
    plan.conv(input, grad_output, workspace)
    plan.sum(workspace, grad_weight)
    return grad_weight


def sum_splits_launch(splits: int, groups: int, taps: int, in_per_group: int, out_per_group: int, channels_last: bool, device) -> Launch:
    """The launch that reduces a float32 workspace (splits, groups, kH*kW, C_in/g, C_out/g) into grad_weight (C_out, C_in/g, kH, kW).

    Called with (workspace, grad_weight). The splits are added in index order, then laid out and cast
    in the same pass; grad_weight is channels-last memory when `channels_last` (the weight's own
    layout), else contiguous. Grid: (kH*kW*C_in/g tiles, C_out/g tiles, groups).
    """
    block, warps = _sum_tile(groups * taps * in_per_group * out_per_group, device)
    grid = (cdiv(taps * in_per_group, block), cdiv(out_per_group, block), groups)
    scalars = (splits, groups * taps * in_per_group * out_per_group, taps * in_per_group, taps, in_per_group, out_per_group)
    return Launch(
        _sum_splits_kernel, grid, scalars, {"CHANNELS_LAST": channels_last, "BLOCK_R": block, "BLOCK_O": block, "num_warps": warps}
    )


def _sum_tile(elements: int, device: torch.device) -> tuple[int, int]:
    """(square tile side, warps) for `_sum_splits_kernel`: the biggest tile that still gives ~2 programs per SM.

    Each program walks every split in turn, so with many splits over a small weight (the stem: 176
    splits of 147 x 64) the time goes as splits / programs: 64 x 64 tiles gave the stem 3 programs and
    260 us on an H200, where 1-D blocks of 1,024 had taken 24. 16 x 16 tiles (one warp) are the floor.
    """
    if interpreting():
        return 16, 1
    programs = 2 * sm_count(device)
    for side, warps in ((64, 4), (32, 4)):
        if cdiv(elements, side * side) >= programs:
            return side, warps
    return 16, 1
