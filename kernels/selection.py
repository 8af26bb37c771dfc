"""`auto`: pick the fastest algorithm that supports the problem on its device."""

from __future__ import annotations

import torch

from kernels import compiled, gemm, shifted_gemm, winograd_rows
from kernels.base import ConvAlgorithm, UnsupportedProblem, WorkTooLarge, get, registered
from kernels.layout import strictly_channels_last
from kernels.limits import macs
from kernels.params import ConvSpec
from kernels.precision import HALF

# In order of preference per device type; the first that accepts the problem wins. The CPU order
# puts the specialised algorithms first (each refuses what it cannot run): depthwise and 1x1 convs
# are not well served by a generic patch GEMM. Measurements: bench/bench_kernels.py, docs/performance.md.
_PREFERENCE = {
    "cuda": ("triton", "im2col"),
    "cpu": ("unfold", "depthwise", "pointwise", "winograd", "winograd_rows", "shifted_gemm", "im2col"),
}

# Below this many multiply-adds the time of a CPU conv is its count of torch calls, and `unfold`
# (three calls) wins; above it its unchunked patch matrix and small batched matmuls lose.
# Measured (1 thread, forward / forward+backward, us): seed 2x1x3x3 unfold 90 / 419 vs im2col
# 175 / 760 and depthwise 422; 1x8x16x16 (147K MACs) 193 / 496 vs im2col 212 / 725;
# 1x16x32x32 (2.4M) 460 / 1808 vs im2col 358 / 1704; depthwise 4x32x28x28 (0.9M) 3.6 ms vs 1.1 ms.
SMALL_MACS = 1 << 18

# unfold also takes plain convs (groups 1, dilation 1, a kernel bigger than 1x1) with at most this many
# output positions per call (N*H_out*W_out: one 14x14 image, four 7x7 ones), whatever their size: there
# im2col's per-tap scatter and winograd's per-position GEMMs have too few rows, while unfold's one
# GEMM with K = C_in*kH*kW and F.fold stay efficient. Measured round 9 (2026-11-27, ours/nn.Conv2d fwd /
# fwd+bwd, 11 reps, 2 threads, batch 1): 64x14 unfold 1.75/2.09 vs auto 2.24/2.51, 256x14 1.15/1.33 vs
# 1.30/1.71, 512x14 0.99/1.23 vs 1.17/1.75, 256x7 1.24/1.54 vs 2.16/3.25, 512x7 0.90/1.12 vs 1.50/2.80;
# batch 2 of 7x7 (98 positions) 1.15/1.39 vs 1.50/2.07 and 0.99/1.25 vs 1.33/2.12; 1 thread alike
# (512x7 batch 1: 0.83/1.01 vs 1.49/3.17), except a few % slower forward on 64-128 x 14x14. At 392
# positions (14x14, batch 2) it ties or loses (128x14 1.56/1.71 vs im2col 1.31/1.74; 512x14 1.05/1.25
# vs winograd 0.85/1.06). Strided convs up to UNFOLD_MAX_STRIDED_POSITIONS: 3x3 stride 2 onto 7x7 and
# 8x8 (49-128 positions, 64-512 channels, batch 1 and 2, 1 and 2 threads) unfold wins all 20 cases
# measured (512 at batch 1, 2 threads: 0.88/0.98 vs im2col 1.42/2.22; 64 at batch 2, 1 thread:
# 1.50/1.36 vs 1.59/1.82); at 196 (28x28 -> 14x14 at batch 1) forward read 1.33-2.08 vs 1.33-1.40.
UNFOLD_MAX_POSITIONS = 256
UNFOLD_MAX_STRIDED_POSITIONS = 128

# shifted_gemm computes H_pad*W_pad "wide" output rows per image for H_out*W_out real ones, and its
# per-tap GEMMs (K = C) run below the efficiency of im2col's one long-K GEMM; it only wins where
# im2col's 9x patch copy is large relative to the work, i.e. big images with little padding waste.
# Measured (docs/performance.md): 56x56 (waste 58*58/56*56 = 1.07) wins clearly for forward and
# backward. 28x28 (1.148) lost forward+backward in the first rounds; re-measured in round 9 (2026-11-27,
# 16, 32, 64, 96 channels x batch 1 and 4 x 1 and 2 threads, 11 reps) it beats or ties im2col in 14 of
# 16 forward+backward cases (e.g. 64x28 at batch 1, 2 threads: 1.66/1.73 vs 1.60-2.18/1.68-1.90; at
# batch 4, 1 thread: 1.44/1.31 vs 1.78/1.76), so the cut now takes it; 14x14 (1.31) still loses
# (128x14, 256x14 at batch 1 and 2: shifted 1.34-1.59/1.49-2.15 vs im2col 1.14-1.69/1.39-1.89).
MAX_SHIFTED_WASTE = 1.15


# winograd (F(2x2, 3x3), 3x3 stride 1 only) trades 2.25x fewer GEMM flops for tile transforms whose
# cost is per element, so it needs enough channels for the GEMM to dominate, and images big enough
# for the 16 per-position GEMMs (M = tiles) to run efficiently. Measured (N=4, 1 thread, ours/nn.Conv2d
# fwd / fwd+bwd): 64x56 1.63/1.49 vs shifted_gemm 1.75/1.67; 128x28 1.28/1.16 vs im2col 1.50/1.50.
# 256x14 lost to im2col until round 5 (2026-11-27) replaced the weight-transform einsums by GEMMs
# (5.8 -> 0.4 ms per transform at 256 channels); since then (2 threads, wall / 1 thread, CPU clock)
# 256x14 is 1.01/1.08 vs im2col 1.17/1.32, and 0.90/0.91 vs 1.30/1.26. Below 24 it needs many
# channels (fwd+bwd, N=4, 2 threads, winograd / im2col): 64x14 1.49, 32x16 1.62, 128x14 0.98 (1 thread
# 0.86), 256x14 ~0.8, 512x14 0.70; at 7x7 it ties (256: 1.05, 512: 0.98), so 7x7 stays with im2col.
# From this many intra-op threads, images that shifted_gemm takes (waste <= MAX_SHIFTED_WASTE, e.g. 56x56)
# with at most SHIFTED_OVER_WINOGRAD_MAX_CHANNELS channels go to it instead of winograd: its few big
# GEMMs (M = N*H_pad*W_pad, K = C) split across threads better than winograd's 16 bmm's plus ~30
# elementwise transform passes. Measured round 7 (2026-11-27), same process, N=4, 2 threads:
# bench 64x56 ours/nn.Conv2d fwd / fwd+bwd shifted_gemm 1.50/1.30 and 1.63/1.43 vs winograd 1.73/1.55 and
# 1.86/1.68; direct calls, ms, winograd vs shifted_gemm fwd / fwd+bwd: 64x56 12.8/39.7 vs 11.6/35.1,
# 64x64 16.9/51.7 vs 15.9/46.2, but 96x56 22.9/66.2 vs 28.0/81.1 and 128x56 34.2/100 vs 53.4/159.
# At 1 thread (CPU clock) 64x56 is a tie or a winograd win (1.71/1.52 vs 1.85/1.68; 1.48/1.39 vs 1.51/1.37).
# Not where winograd's transforms compile (round 14, kernels/winograd_compiled.py): same process, N=4,
# 2 threads, 64x56 fwd / fwd+bwd winograd compiled 1.34/1.10 vs shifted_gemm 1.44/1.18 (eager winograd
# 1.55/1.28, which is what runs until the compile is done).
SHIFTED_OVER_WINOGRAD_THREADS = 2
SHIFTED_OVER_WINOGRAD_MAX_CHANNELS = 64
# winograd also needs its 16 per-position GEMMs (M = tiles, N*ceil(H_out/2)*ceil(W_out/2); K =
# C_in/groups; C_out columns) to hold enough multiply-adds each: small ones run far below peak (and
# from 2 threads do not split well), while im2col and shifted_gemm run one long GEMM of 2.25x the
# flops. Measured round 9 (2026-11-27, ours/nn.Conv2d fwd / fwd+bwd; single runs swing by up to 30%,
# so batch 1 and 2 are means of 6 and 4 runs). 2 threads: at 3.2M per GEMM (128x28 and 256x14 at
# batch 1, the service's usual request) winograd 1.78/1.54 and 1.51/1.85 vs im2col 1.59/1.41 and
# 1.34/1.74; at 6.4M (batch 2) a tie or a winograd win (1.36/1.27 vs 1.33/1.34; 1.24/1.36 vs
# 1.26/1.43); from 7.2M (192x28 batch 1, batch 4) winograd ahead (256x28 batch 1: 1.06/0.90 vs
# im2col 1.28/1.17). 1 thread: 3.2M still wins (128x28 batch 1: 1.26/0.98 vs im2col 1.43/1.24),
# 1.8M and less lose to shifted_gemm (96x28 batch 1: 1.54/1.29 vs 1.32/1.23; 64x28: 2.44/2.04 vs
# 1.52/1.14; 32x28: 3.35/3.40 vs 1.46/1.81; 32x28 batch 4, 0.8M: 2.90/2.45 vs 1.76/1.62).
WINOGRAD_MIN_GEMM_MACS = 2 << 20
WINOGRAD_MIN_THREADED_GEMM_MACS = 4 << 20  # from SHIFTED_OVER_WINOGRAD_THREADS threads
WINOGRAD_MIN_CHANNELS = 32
WINOGRAD_MIN_OUTPUT = 24
WINOGRAD_WIDE_CHANNELS = 128  # from this many channels (in and out), outputs down to WINOGRAD_WIDE_MIN_OUTPUT
WINOGRAD_WIDE_MIN_OUTPUT = 14

# Where the GEMMs go through oneDNN (kernels/gemm.py: round 18, the AVX-512 host) im2col's few long GEMMs
# gain the most, and the thresholds above (measured with MKL) move. Measured 2026-11-28, 2 threads, 3x3
# stride 1, C_in = C_out, ours/nn.Conv2d fwd / fwd+bwd, 7 reps (docs/performance.md round 18):
# - shifted_gemm, its per-tap GEMMs then on MKL (accumulated in place by addmm_), lost to im2col in all 13 cases,
#   batch 1-4 (64x56 batch 1: 2.39/2.60 vs 1.38/2.05; 128x28 batch 1: 2.39/2.62 vs 1.28/1.63). Since round 21 they
#   run on oneDNN, each adding the running sum in its epilogue (kernels/gemm.py `sum_of_products`), at ~400 GFLOP/s:
#   the ONEDNN_SHIFTED_* rules below.
# - unfold (its GEMMs through oneDNN too): wins at 196 positions from 256 channels (14x14 at batch 1, 256
#   and 512 channels: 1.57/1.72 and 1.12/1.50 vs im2col 1.89/2.40 and 1.86/2.36; 512x7: 0.87/1.68), splits
#   with im2col at 64-128 channels (128: 1.86/1.88 vs 1.67/1.96), and loses from 256 positions (64x16 at
#   batch 1: 1.24/1.72 vs 0.87/1.51; 392 positions, 14x14 at batch 2: 2.17/1.95-2.21 vs 1.45-1.64/1.77-1.80).
# - winograd's 16 per-position GEMMs are 16 oneDNN calls: it lost at 6.4M multiply-adds each (64x56 and
#   128x28 at batch 2: 2.11/2.18 and 1.74/1.88 vs im2col 1.44/2.23 and 1.34/1.64) and won at 12.8M
#   (batch 4: 1.72/1.73, 1.11/1.24, 1.17/1.44 vs im2col 2.23/2.35, 1.45/1.77, 1.52/1.70). Since round 21 images under
#   32x32 run its compiled code channels-last (kernels/winograd_compiled.py), and 6.4M wins: 128x28 at batch 2
#   1.19-1.21/1.30 vs im2col 1.25-1.27/1.35-1.38, 256x14 at batch 2 1.17-1.22/1.28 vs 1.18/1.31 (two runs each).
ONEDNN_UNFOLD_MAX_POSITIONS = 196
# - where no backward follows (inference: `choose(..., backward=False)`), unfold only up to 128 positions: its
#   gain is in the backward (F.fold), and its forward (F.unfold's NCHW patches) loses to im2col's from there
#   (round 21, forward, ours/nn.Conv2d, unfold vs im2col: 196 positions 256x14 batch 1 2.00 vs 1.44, 512x14 1.40 vs
#   1.30, 128x14 2.39 vs 1.80, 512x7 batch 4 1.69 vs 1.33; 144 positions 64x12 1.52 vs 1.48; 98-100 positions
#   256x7 batch 2 1.41 vs 1.34, 128x10 0.98 vs 1.01, 32x10 2.08 vs 2.77; 64 positions 256x8 0.65 vs 0.94, 512x8
#   0.73 vs 1.25; 49, 512x7 0.87 vs 1.31).
ONEDNN_UNFOLD_INFERENCE_MAX_POSITIONS = 128
ONEDNN_WINOGRAD_MIN_GEMM_MACS = 6 << 20
# shifted_gemm through oneDNN (round 21, 2 threads, 3x3 stride 1, C_in = C_out, ours/nn.Conv2d fwd / fwd+bwd, one
# process per row, noisy host): at 56x56 (waste 1.07) with 64 channels it beats winograd and im2col from batch 2
# (batch 4: 1.61/1.53 vs winograd 2.04/1.73, im2col 1.81/2.17; batch 2: 1.63/1.55 vs im2col 1.56/1.99) and 32
# channels at batch 4 (1.97/2.11 vs im2col 1.90/2.78), but not at batch 1 (64: 1.53/1.56 vs im2col 1.26/1.64) nor
# from 96 channels, where winograd's 2.25x fewer multiply-adds win (96 at batch 4: 1.46/1.50 vs 1.45/1.20). At 28x28
# (waste 1.15) im2col wins every case (64 at batch 4: 1.77/1.77 vs 1.38/1.50). Its per-tap GEMMs are
# (wide rows x C_in) @ (C_in x C_out): it needs this many rows (one 56x56 image has 3,364; 32 channels at batch 2,
# 6.9M multiply-adds a GEMM: 2.30/2.27 vs im2col 1.78/2.46) and this many multiply-adds per GEMM, at most this many
# channels and this much waste. Not for channels-last input, whose Winograd path has no transposing copy either
# (64x56 batch 4 in two alternated runs: forward 1.40-1.43x vs 1.29-1.33x, forward+backward 1.49-1.52x vs 1.47x).
# Nor at one thread, where Winograd's transforms weigh less against its fewer multiply-adds (64x56 at batch 4:
# winograd 1.49/1.23 vs shifted_gemm 1.84/1.57; batch 2: 1.45/1.31 vs 1.49/1.39).
# And it needs each tap GEMM's traffic (its rows in, the running sum in and out: wide rows x (C_in + 2 C_out) floats)
# to stay under this: past it the sums leave the caches, and Winograd's fewer passes win (same process, ours /
# nn.Conv2d fwd / fwd+bwd, shifted_gemm vs winograd: 64 channels at batch 4, 10.3 MB, 1.56/1.44 vs 1.78/1.61; batch 6,
# 15.5 MB, 1.72/1.51 vs 1.59/1.44; batch 8 1.87-1.92/1.64-1.71 vs 1.58/1.36-1.40; 32 channels at batch 8, 10.3 MB,
# 2.09/1.88 vs 2.36/2.26; batch 16 2.61/2.30 vs 2.40/2.21).
ONEDNN_SHIFTED_MIN_ROWS = 6000
ONEDNN_SHIFTED_MIN_GEMM_MACS = 12 << 20
ONEDNN_SHIFTED_MAX_PASS_BYTES = 12 << 20
ONEDNN_SHIFTED_MAX_CHANNELS = 64
ONEDNN_SHIFTED_MAX_WASTE = 1.1


def _worth_running(name: str, input: torch.Tensor, weight: torch.Tensor, spec: ConvSpec, backward: bool = True) -> bool:
    """Speed heuristics on top of `check` (which is about correctness): False skips an algorithm in "auto".
    backward: whether a backward pass will follow (autograd records), so forward+backward is what counts."""
    onednn = input.device.type == "cpu" and gemm.routes_to_onednn(torch.float32 if input.dtype in HALF else input.dtype)
    if name == "unfold":
        out_height, out_width = spec.output_size(input.shape[2], input.shape[3], weight.shape[2], weight.shape[3])
        if macs(input.shape[0], weight.shape[0], out_height, out_width, *weight.shape[1:]) <= SMALL_MACS:
            return True
        plain = spec.groups == 1 and spec.dilation == (1, 1) and weight.shape[2] * weight.shape[3] > 1
        limit = UNFOLD_MAX_POSITIONS if spec.stride == (1, 1) else UNFOLD_MAX_STRIDED_POSITIONS
        if onednn:
            limit = min(limit, ONEDNN_UNFOLD_MAX_POSITIONS if backward else ONEDNN_UNFOLD_INFERENCE_MAX_POSITIONS)
        return plain and input.shape[0] * out_height * out_width <= limit
    if name == "winograd":
        few_channels = max(weight.shape[0], weight.shape[1]) <= SHIFTED_OVER_WINOGRAD_MAX_CHANNELS
        threaded = torch.get_num_threads() >= SHIFTED_OVER_WINOGRAD_THREADS
        compiles = input.device.type == "cpu" and compiled.available()  # kernels/winograd_compiled.py
        shifted = any(_worth_running(name, input, weight, spec, backward) for name in ("winograd_rows", "shifted_gemm"))
        if few_channels and (onednn or (threaded and not compiles)) and shifted:
            return False  # shifted GEMMs run faster (ONEDNN_SHIFTED_*) or scale better across threads
        out_height, out_width = spec.output_size(input.shape[2], input.shape[3], weight.shape[2], weight.shape[3])
        tiles = input.shape[0] * -(-out_height // 2) * -(-out_width // 2)
        least = ONEDNN_WINOGRAD_MIN_GEMM_MACS if onednn else WINOGRAD_MIN_THREADED_GEMM_MACS if threaded else WINOGRAD_MIN_GEMM_MACS
        if tiles * weight.shape[1] * weight.shape[0] < least:
            return False  # per-position GEMMs too small to run (or split across threads) efficiently
        channels, size = min(weight.shape[0], weight.shape[1]), min(out_height, out_width)
        if channels >= WINOGRAD_WIDE_CHANNELS:
            return size >= WINOGRAD_WIDE_MIN_OUTPUT
        return channels >= WINOGRAD_MIN_CHANNELS and size >= WINOGRAD_MIN_OUTPUT
    if name == "winograd_rows":
        # shifted_gemm's problems with a kernel 3 wide (ONEDNN_SHIFTED_* below), and the ones past its pass-size cut whose
        # tile rows (half the wide rows) fit: 2/3 of its multiply-adds, each GEMM's running sum half as big. Measured
        # (round 23: bench_kernels, 11 interleaved reps, ours / nn.Conv2d fwd / fwd+bwd, 64 channels at 56x56): batch 4
        # 1.39/1.32 and 1.42/1.33 vs shifted_gemm 1.55/1.48 and 1.51/1.43; batch 2 1.45/1.49 vs 1.56/1.60; batch 8 1.49/1.35
        # vs winograd 1.64/1.36 (shifted_gemm 1.80/1.70). Same process: 64x112 at batch 1 1.46-1.56/1.36 vs 1.51-1.52/1.44;
        # 32x56 at batch 4 a tie (2.07/1.95 vs 2.03/2.04), at batch 16 2.44/1.98 vs winograd 2.79/1.99. With torch's
        # GEMMs it was not measured, and shifted_gemm keeps those.
        return onednn and winograd_rows.eligible(weight, spec) and _shifted_worth_running(input, weight, spec, tile_rows=True)
    if name != "shifted_gemm":
        return True
    if not onednn:
        return shifted_gemm.waste(input, weight, spec) <= MAX_SHIFTED_WASTE
    return _shifted_worth_running(input, weight, spec)


def _shifted_worth_running(input: torch.Tensor, weight: torch.Tensor, spec: ConvSpec, tile_rows: bool = False) -> bool:
    """shifted_gemm's rules with oneDNN's GEMMs (ONEDNN_SHIFTED_*); tile_rows: winograd_rows's passes, over half the rows."""
    wide_rows = shifted_gemm.wide_row_count(input, spec)
    pass_rows = wide_rows // 2 if tile_rows else wide_rows
    return (
        spec.groups == 1
        and torch.get_num_threads() >= SHIFTED_OVER_WINOGRAD_THREADS
        and not strictly_channels_last(input)
        and max(weight.shape[0], weight.shape[1]) <= ONEDNN_SHIFTED_MAX_CHANNELS
        and wide_rows >= ONEDNN_SHIFTED_MIN_ROWS
        and wide_rows * weight.shape[0] * weight.shape[1] >= ONEDNN_SHIFTED_MIN_GEMM_MACS
        and pass_rows * (weight.shape[1] + 2 * weight.shape[0]) * input.element_size() <= ONEDNN_SHIFTED_MAX_PASS_BYTES
        and shifted_gemm.waste(input, weight, spec) <= ONEDNN_SHIFTED_MAX_WASTE
    )


def choose(input: torch.Tensor, weight: torch.Tensor, spec: ConvSpec, backward: bool = True) -> ConvAlgorithm:
    """The first algorithm in `_PREFERENCE` that is worth running and accepts the problem; failing that, the
    first that accepts it at all (the speed heuristics must not turn a problem some algorithm can run into
    an error). WorkTooLarge when none accepts and some refused it as too large, UnsupportedProblem otherwise.

    backward: whether a backward pass will follow (training), so that the heuristics weigh forward+backward; False
    (inference: no grad, /forward) weighs the forward alone."""
    available = registered()
    order = [available[name] for name in _PREFERENCE.get(input.device.type, ("im2col",)) if name in available]
    worth = [algorithm for algorithm in order if _worth_running(algorithm.name, input, weight, spec, backward)]
    refusals: dict[str, UnsupportedProblem] = {}
    for algorithm in worth + [algorithm for algorithm in order if algorithm not in worth]:
        try:
            algorithm.accept(input, weight, spec)
            return algorithm
        except UnsupportedProblem as why:
            refusals[algorithm.name] = why
    reasons = "; ".join(str(why) for why in refusals.values()) or "none registered"
    too_large = any(isinstance(why, WorkTooLarge) for why in refusals.values())
    raise (WorkTooLarge if too_large else UnsupportedProblem)(f"no algorithm runs this problem: {reasons}")


def resolve(name: str, input: torch.Tensor, weight: torch.Tensor, spec: ConvSpec, backward: bool = True) -> ConvAlgorithm:
    """The algorithm called `name` ("auto" chooses), checked against the problem."""
    if name == "auto":
        return choose(input, weight, spec, backward)
    algorithm = get(name)
    algorithm.accept(input, weight, spec)
    return algorithm
