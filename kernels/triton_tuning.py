"""Tile configurations for the Triton conv kernels, and how they are tuned.

Every kernel is an implicit GEMM, so one small config space serves all three; `prune` trims tiles
that are wider than the problem (a 16-wide channel dimension gains nothing from 128-wide tiles).
Under TRITON_INTERPRET=1 (CPU, CI) there is exactly one small config: the interpreter runs numpy
per block op, so autotuning there would only multiply test time.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable

import torch
import triton

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). Tensor-core tiles (16-bit inputs, TF32): 64-128 x
# 64-128 x 32-64, 3-4 stages, enough for wgmma / mma pipelines on sm80/sm90 while keeping the compile +
# tune time of a cold run to seconds. The first entry is the one used when autotuning is off.
_TENSOR_CORE_TILES = (
    (128, 64, 32, 4, 4),
    (128, 128, 64, 8, 3),
    (64, 64, 32, 4, 3),
)
# IEEE float32 tl.dot runs on FMA units: big tiles only unroll into minutes of compile time for no
# speed, so it gets one moderate tile.
_FMA_TILES = ((64, 64, 32, 4, 3),)
# grad_weight's operands are M- and N-major in memory (channels are contiguous, pixels are the
# reduction). Hopper's TF32 wgmma reads only K-major operands from shared memory, so a pipelined
# (cp.async) load of them copies 4 bytes at a time (H200: TF32 grad_weight 3-5x cuDNN's). One stage
# loads through registers instead, in 16-byte vectors, and transposes on the way to shared memory:
# offered to the autotuner for 4-byte (TF32) grad_weight only.
_REGISTER_PATH_TILES = ((128, 64, 32, 4, 1), (64, 64, 32, 4, 1))
_INTERPRETER_TILE = (64, 64, 32, 4, 1)

# Arguments that only enter index arithmetic: specialising on their value (== 1, % 16 == 0) would
# compile a new variant per layer shape for no gain. Channel counts and strides stay specialised:
# a unit channel stride and 16-divisible channel counts are what make the tile loads 16-byte vectors.
# So does the depthwise channel multiplier: the channel index is offs_c // multiplier, contiguous only
# when the compiler sees multiplier == 1 (left unspecialised, every load was one 2-byte scalar: on the
# H200 our three depthwise kernels took 58-69 us each against cuDNN's 6-7).
_INDEX_ONLY = {
    "rows",
    "rows_per_split",
    "splits",
    "taps_per_split",
    "taps",
    "height",
    "width",
    "out_height",
    "out_width",
    "kernel_h",
    "kernel_w",
    "stride_h",
    "stride_w",
    "pad_top",
    "pad_left",
    "dil_h",
    "dil_w",
    *("phase_rows", "phase_cols", "first_row", "first_col", "tap0_h", "tap0_w", "tap_step_h", "tap_step_w"),
    *("taps_h", "taps_w", "base_oh", "base_ow", "oh_step", "ow_step"),
}


# The tl.dot operands' pointer arguments across the GEMM kernels (forward: input, weight; grad_input:
# grad_output, weight; grad_weight: input, grad_output).
_OPERANDS = ("input_ptr", "weight_ptr", "grad_output_ptr")


def jit(fn):
    """triton.jit with the index-only arguments of `fn` left unspecialised."""
    names = fn.__code__.co_varnames[: fn.__code__.co_argcount]
    return triton.jit(fn, do_not_specialize=[name for name in names if name in _INDEX_ONLY])


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (index None: the current one): how many programs fill it."""
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def autotuning() -> bool:
    """CONV_TRITON_AUTOTUNE=0 uses each kernel's first config: correctness runs on a GPU skip tuning and most compiles."""
    return os.environ.get("CONV_TRITON_AUTOTUNE", "1") != "0" and not interpreting()


def _config(m: int, n: int, k: int, warps: int, stages: int, fma: bool, four_byte_only: bool = False) -> triton.Config:
    # FMA marks the IEEE-float32 configs and FOUR_BYTE the TF32-only ones for `prune`; both are dropped before launch.
    kwargs = {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8, "FMA": fma}
    if four_byte_only:
        kwargs["FOUR_BYTE"] = True
    return triton.Config(kwargs, num_warps=warps, num_stages=stages)


def configs(register_path: bool = False) -> list[triton.Config]:
    """GEMM-kernel configs: tensor-core tiles, then FMA tiles; `prune` keeps the kind the call needs.

    register_path: also offer the one-stage tiles for 4-byte operands (grad_weight; see _REGISTER_PATH_TILES).
    Always at least two entries: Triton's autotuner skips `prune` (and so the FMA filter and the
    tile caps) when it holds a single config.
    """
    if interpreting():
        return [_config(*_INTERPRETER_TILE, fma=False), _config(*_INTERPRETER_TILE, fma=True)]
    if not autotuning():
        return [_config(*_TENSOR_CORE_TILES[0], fma=False), _config(*_FMA_TILES[0], fma=True)]
    tiles = [_config(*tile, fma=False) for tile in _TENSOR_CORE_TILES] + [_config(*tile, fma=True) for tile in _FMA_TILES]
    if register_path:
        tiles += [_config(*tile, fma=False, four_byte_only=True) for tile in _REGISTER_PATH_TILES]
    return tiles


def depthwise_configs() -> list[triton.Config]:
    """(pixels x channels) tiles for the depthwise kernels, which are memory-bound elementwise FMAs."""
    if interpreting():
        tiles = ((64, 32, 4),)
    else:
        tiles = ((64, 64, 4), (128, 32, 4), (32, 128, 4), (128, 64, 8))[: None if autotuning() else 1]
    return [triton.Config({"BLOCK_P": p, "BLOCK_C": c}, num_warps=warps, num_stages=2) for p, c, warps in tiles]


def _cap(block: int, size: int) -> int:
    return min(block, max(16, triton.next_power_of_2(size)))


def prune(extents: Callable[[dict], dict[str, int]]) -> dict:
    """An early_config_prune that shrinks each BLOCK_* to the problem's (power-of-2) extent, deduplicated.

    `extents(args)` -> {"BLOCK_M": extent, ...}: how far each tile dimension can usefully reach (for
    BLOCK_K, the per-tap channel count, or the whole flattened reduction where the kernel flattens
    (tap, channel)).
    """

    def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
        seen, kept = set(), []
        args = {**named_args, **kwargs}
        limits = extents(args)
        fma = args.get("PRECISION") == "ieee" and not interpreting()
        # TF32 tiles hold 4-byte elements: a 64-deep K stage doubles shared memory (192 KB at 128x128)
        # and compile time for no gain, so float32 keeps the 32-deep tiles. Read off the dot operands
        # only: a split forward writes a float32 workspace through output_ptr whatever its inputs are.
        four_byte = any(getattr(args.get(name), "dtype", None) == torch.float32 for name in _OPERANDS)
        for config in configs:
            if config.kwargs.get("FMA", fma) != fma or (four_byte and config.kwargs.get("BLOCK_K", 0) > 32):
                continue
            if config.kwargs.get("FOUR_BYTE") and not four_byte:
                continue
            blocks = {
                name: _cap(value, limits[name]) if name in limits else value
                for name, value in config.kwargs.items()
                if name not in ("FMA", "FOUR_BYTE")
            }
            signature = (*sorted(blocks.items()), config.num_warps, config.num_stages)
            if signature not in seen:
                seen.add(signature)
                kept.append(triton.Config(blocks, num_warps=config.num_warps, num_stages=config.num_stages))
        return kept

    return {"early_config_prune": _prune}


def bench_options() -> dict:
    """Shorter autotune timing runs (default is 25 ms warm-up + 100 ms per config) where Triton allows it."""
    if "do_bench" not in inspect.signature(triton.autotune).parameters:
        return {}

    def do_bench(kernel_call, quantiles=None, **_ignored):
        return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)

    return {"do_bench": do_bench}
