"""Winograd F(2x2, 3x3) on the CPU with its tile transforms compiled (kernels/compiled.py).

The eager transforms (kernels/winograd.py) are ~30 elementwise passes through scratch buffers, about
as much time as the 16 GEMMs they feed (64x56 at batch 4: 6.8 vs 7.4 ms). Compiled, each transform is
one pass. For an NCHW input, channel-major throughout:

    forward      input -> column phases (eager copy) -> V = B^T d B (compiled) -> M = U V (16 GEMMs)
                 -> Y = A^T M A + bias (compiled, written NCHW)
    grad_input   the same, on grad_output padded by 2 - padding, with the kernel flipped and transposed
    grad_weight  V as in forward (the forward's own, kept by autograd: `forward_keeping`), dM = A dY A^T
                 (compiled, from the grad's column phases), dU^T = dM V^T (16 GEMMs), dW = G^T dU G (compiled)

For a channels-last input, forward and grad_input run channels-last (an NHWC tile grid, tiles
(16, P, C), products (P, K), output NHWC), with no transposing copy either way; so do NCHW images under
32x32 (`NCHW_MIN_SIZE`), through a transposing copy each way. grad_weight takes the forward's (16, P, C) tiles, or reads the
input through its column phases as above.

The GEMMs go through kernels/gemm.py (oneDNN's or torch's, whichever is faster on this CPU), so the
transforms after them take the 16 products as separate tensors: stacking them would copy them all.

The column phases ([c, n, r, q, t] = padded[n, c, r, 2t + q], `winograd._column_phases`) stay an eager
copy: read straight from the padded input, the transform's stride-2 loads ran 3.4x slower (64x56:
5.6 ms, against 0.9 for the copy and 1.7 for the transform from it).

Until the transforms are compiled for the problem's shapes, `forward` and `grad_input` return None and
the caller runs the eager path.
"""

from __future__ import annotations

import torch

from kernels import compiled, gemm
from kernels.layout import strictly_channels_last
from kernels.limits import get_limits, keepable
from kernels.params import ConvSpec

# NCHW images smaller than this run channels-last too, through a transposing copy each way: with few tiles per image
# the products dominate, and oneDNN runs them faster with the tiles as their row-major left operand. Same process,
# alternated, ours / nn.Conv2d at batch 4, forward (forward+backward), channel-major against channels-last (round 21):
# 256x14 1.30-1.44 (1.19-1.34) against 1.12-1.24 (1.07-1.19); 28x28 with 96, 128, 192, 256 channels 1.41, 1.22, 1.02,
# 0.90 (1.35, 1.15, 0.94, 0.82) against 1.24, 1.12, 1.00, 0.87 (1.31, 1.16, 0.94, 0.82); but 56x56 with 96 and 128
# channels 1.28, 1.09 (1.13, 0.97) against 1.22, 1.11 (1.14, 0.99), and at batch 2 1.10 (1.00) against 1.16 (1.09).
# (The eager path's cut, winograd.NCHW_MIN_SIZE, is its own: its channel-major path has no compiled transforms.)
NCHW_MIN_SIZE = 32


def eligible(tensor: torch.Tensor, channels_last: bool = False) -> bool:
    """`compiled.takes` the input (or grad_output), NCHW or (where the caller says) channels-last: 3x3 stride 1 is
    `winograd`'s own check."""
    return compiled.takes(tensor, channels_last)


def _fits(batch: int, tiles_h: int, tiles_w: int, channels: int, like: torch.Tensor) -> bool:
    """Whether the unchunked tile buffers (16 values per tile and channel) stay within the workspace limit."""
    return 16 * batch * tiles_h * tiles_w * channels * like.element_size() <= get_limits().im2col_workspace_bytes


def forward(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, pads: tuple[int, int, int, int]) -> torch.Tensor | None:
    """input (N, C, H, W) contiguous or channels-last, weight (K, C, 3, 3), pads (top, bottom, left, right) >= 0
    -> (N, K, H_out, W_out) in the input's layout, or None.

    None also where the tile buffers (16 values per 4 inputs or outputs, unchunked) would pass the workspace limit.
    NCHW runs channel-major: column phases, V (16, C, P), products U[xi] (K, C) @ V[xi]. Channels-last runs channels-last:
    an NHWC tile grid (a padded copy, no transpose), V (16, P, C), products V[xi] (P, C) @ U[xi] (C, K), output written
    NHWC; from an NCHW input that layout's two transposing copies cost what its faster products save from 32x32
    (`NCHW_MIN_SIZE`; round 19 measured them at 56x56), so smaller NCHW images run channels-last too.
    """
    result = _forward(input, weight, bias, pads)
    return None if result is None else result[0]


def forward_keeping(
    input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, pads: tuple[int, int, int, int]
) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """`forward`, plus its input tiles V as a (16, P, C) view for `grad_weight` where they fit
    `Limits.kept_for_backward_bytes` (else None), or None."""
    result = _forward(input, weight, bias, pads)
    if result is None:
        return None
    output, tiles, _ = result
    return output, (tiles if keepable(tiles.numel(), tiles) else None)


def _forward(input, weight, bias, pads) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
    """(output, V as a (16, P, C) view, the NCHW input's column phases or None for channels-last) or None: `forward`.

    The phases are a scratch buffer (kernels/workspace.py): valid until the next Winograd call takes it."""
    from kernels.winograd import _column_phases, _tile_input, _transformed_weight

    nhwc = strictly_channels_last(input) or min(input.shape[2:]) < NCHW_MIN_SIZE
    batch, channels = input.shape[:2]
    out_channels = weight.shape[0]
    out_height, out_width = input.shape[2] + pads[0] + pads[1] - 2, input.shape[3] + pads[2] + pads[3] - 2
    tiles_h, tiles_w = -(-out_height // 2), -(-out_width // 2)
    positions = batch * tiles_h * tiles_w
    if not _fits(batch, tiles_h, tiles_w, max(channels, out_channels), input):
        return None
    if nhwc:
        input_stage, output_stage = _input_tiles_nhwc, _output_tiles_nhwc
        source_shape, product_shape = (batch, 2 * tiles_h + 2, 2 * tiles_w + 2, channels), (positions, out_channels)
    else:
        input_stage, output_stage = _input_tiles, _output_tiles
        source_shape, product_shape = (channels, batch, 2 * tiles_h + 2, 2, tiles_w + 1), (out_channels, positions)
    # Both transforms' keys first (meta stand-ins), so that the first call queues both compiles.
    products_like = [torch.empty(product_shape, dtype=input.dtype, device="meta")] * 16
    bias_like = None if bias is None else torch.empty_like(bias, device="meta")
    stages_ready = [
        compiled.ready(input_stage, torch.empty(source_shape, dtype=input.dtype, device="meta")),
        compiled.ready(output_stage, bias_like, batch, tiles_h, tiles_w, *products_like),
    ]
    if not all(stages_ready):
        return None
    transformed = _transformed_weight(weight)  # U (16, C, K)
    if nhwc:
        phases = None
        tiles = compiled.run(input_stage, _tile_input(input, pads)[0])  # (16, P, C)
        products = gemm.products(tiles, transformed)  # 16 x (P, K): V[xi] (P, C) @ U[xi] (C, K)
    else:
        phases = _column_phases(input, pads)[0]
        tiles = compiled.run(input_stage, phases).transpose(1, 2)  # (16, P, C) view of (16, C, P)
        products = gemm.products(transformed.transpose(1, 2), tiles.transpose(1, 2))  # 16 x (K, P): U[xi] (K, C) @ V[xi]
    output = compiled.run(output_stage, bias, batch, tiles_h, tiles_w, *products)
    output = output[:, :out_height, :out_width].permute(0, 3, 1, 2) if nhwc else output[:, :, :out_height, :out_width]
    return output, tiles, phases


def grad_input(grad_output: torch.Tensor, weight: torch.Tensor, spec: ConvSpec) -> torch.Tensor | None:
    """The 3x3 conv of grad_output (N, K, H_out, W_out) contiguous, padded by 2 - padding, kernel flipped and transposed
    -> (N, C, H, W), or None."""
    result = grad_input_and_phases(grad_output, weight, spec)
    return None if result is None else result[0]


def grad_input_and_phases(
    grad_output: torch.Tensor, weight: torch.Tensor, spec: ConvSpec
) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(`grad_input`, grad_output's column phases for `grad_weight`'s `grad_phases`, or None) or None.

    At padding 1 all round (3x3 "same"), grad_input's phases of the grad padded by 1 hold every value grad_weight's
    transform reads, one row and one column further on; elsewhere, or for a channels-last grad, None."""
    top, bottom, left, right = spec.padding
    pads = (2 - top, 2 - bottom, 2 - left, 2 - right)
    if min(pads) < 0:
        return None
    result = _forward(grad_output, weight.flip(2, 3).transpose(0, 1), None, pads)
    if result is None:
        return None
    output, _, phases = result
    return output, (phases if pads == (1, 1, 1, 1) else None)


def grad_weight(
    grad_output: torch.Tensor,
    input: torch.Tensor,
    weight: torch.Tensor,
    pads: tuple[int, int, int, int],
    tiles: torch.Tensor | None = None,
    grad_phases: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """dW = G^T (sum over tiles V dM^T) G: grad_output (N, K, H_out, W_out), input (N, C, H, W) -> (K, C, 3, 3), or None.

    tiles: the forward's V of this input as a (16, P, C) view (`forward_keeping`), else rebuilt here from the input's
    column phases (at 64x56, batch 4, that rebuild was 1.1 of this pass's 3.9 ms). grad_phases: grad_input's column
    phases of this grad (`grad_input_and_phases`), read before anything here takes their scratch buffer, else the
    grad's own are copied.
    """
    from kernels.winograd import _column_phases

    batch, channels = input.shape[:2]
    out_channels = weight.shape[0]
    tiles_h, tiles_w = -(-grad_output.shape[2] // 2), -(-grad_output.shape[3] // 2)
    if not _fits(batch, tiles_h, tiles_w, max(channels, out_channels), input):
        return None
    phases = (batch, 2 * tiles_h + 2, 2, tiles_w + 1)
    products_like = [torch.empty(out_channels, channels, dtype=input.dtype, device="meta")] * 16
    stages_ready = [
        tiles is not None or compiled.ready(_input_tiles, torch.empty(channels, *phases, dtype=input.dtype, device="meta")),
        compiled.ready(_grad_tiles, torch.empty(out_channels, *phases, dtype=input.dtype, device="meta"), int(grad_phases is not None)),
        compiled.ready(_weight_grad, *products_like),
    ]
    if not all(stages_ready):
        return None
    if grad_phases is not None:
        grad_tiles = compiled.run(_grad_tiles, grad_phases, 1)  # dM (16, K, P)
    else:  # padding (0, 2, 0, 2) keeps H_out x W_out as the "output" size: the grad rounded up to whole tiles
        grad_tiles = compiled.run(_grad_tiles, _column_phases(grad_output, (0, 2, 0, 2))[0], 0)
    if tiles is None:  # the input's phases take the scratch buffer the grad's were in: dM is computed
        tiles = compiled.run(_input_tiles, _column_phases(input, pads)[0]).transpose(1, 2)  # V (16, P, C) view
    # dU[xi]^T = dM[xi] (K, P) @ V[xi] (P, C), each its own tensor (a stacked result copies all 16), then
    # dW = G^T dU G in one compiled pass. As a stacked bmm and a (9, 16) @ (16, C*K) GEMM (kernels/winograd.py)
    # the copies and that odd-shaped GEMM took 1.4 of 3.5 ms at 256x14, batch 4 (2 threads).
    return compiled.run(_weight_grad, *gemm.products(grad_tiles, tiles))


def _weight_grad(*products: torch.Tensor) -> torch.Tensor:
    """dU[xi]^T (K, C), 16 of them -> dW = G^T dU G (K, C, 3, 3), contiguous: the weight transform's adjoint.

    G^T = [[1, 0.5, 0.5, 0], [0, 0.5, -0.5, 0], [0, 0.5, 0.5, 1]], applied to the rows, then the columns, of each 4x4 dU.
    The (K, C) products make each weight's 9 taps one contiguous write; from (C, K) ones Inductor kept the transposed
    layout, and autograd's copy of that grad into the weight's layout cost 0.8 ms at 256 channels.
    """
    tiles = [products[4 * row : 4 * row + 4] for row in range(4)]
    rows = []  # tap row i of every tile column: 3 x 4 x (K, C)
    rows.append([first + 0.5 * (second + third) for first, second, third in zip(tiles[0], tiles[1], tiles[2])])
    rows.append([0.5 * (second - third) for second, third in zip(tiles[1], tiles[2])])
    rows.append([0.5 * (second + third) + fourth for second, third, fourth in zip(tiles[1], tiles[2], tiles[3])])
    taps = []
    for row in rows:
        taps += [row[0] + 0.5 * (row[1] + row[2]), 0.5 * (row[1] - row[2]), 0.5 * (row[1] + row[2]) + row[3]]
    out_channels, channels = products[0].shape
    return torch.stack(taps, dim=-1).view(out_channels, channels, 3, 3)


def _bt(d: list[torch.Tensor]) -> list[torch.Tensor]:
    """B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]] applied to 4 rows (or columns) of tiles."""
    return [d[0] - d[2], d[1] + d[2], d[2] - d[1], d[1] - d[3]]


def _at_tiles(tiles: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """A^T M A of 4x4 tiles given as tiles[row][column]: A^T = [[1, 1, 1, 0], [0, 1, -1, -1]] applied to the rows, then
    the columns -> the 4 outputs, [2u + v] = output (2ty + u, 2tx + v)."""

    def at(m: list[torch.Tensor]) -> list[torch.Tensor]:
        return [m[0] + m[1] + m[2], m[1] - m[2] - m[3]]

    per_column = [at([tiles[row][column] for row in range(4)]) for column in range(4)]  # [output row u] per tile column
    return [value for u in range(2) for value in at([per_column[column][u] for column in range(4)])]


def _input_tiles(split: torch.Tensor) -> torch.Tensor:
    """split (C, N, 2*T_h + 2, 2, T_w + 1), [c, n, r, q, t] = padded[n, c, r, 2t + q] -> V = B^T d B (16, C, N*T_h*T_w),
    B^T applied to the rows, then the columns, of each 4x4 tile."""
    channels, batch, height, _, width = split.shape
    tiles_h, tiles_w = (height - 2) // 2, width - 1
    rows = [split[:, :, k : k + 2 * tiles_h : 2] for k in range(4)]  # row k of every tile: (C, N, T_h, 2, T_w + 1)
    tiles = []
    for mixed in _bt(rows):  # column 2t + k: phase k % 2, t + k // 2
        tiles += _bt([mixed[:, :, :, k % 2, k // 2 : k // 2 + tiles_w] for k in range(4)])
    return torch.stack(tiles).reshape(16, channels, batch * tiles_h * tiles_w)


def _output_tiles(bias: torch.Tensor | None, batch: int, tiles_h: int, tiles_w: int, *products: torch.Tensor) -> torch.Tensor:
    """products M[xi] (K, N*T_h*T_w), 16 of them -> Y = A^T M A (N, K, 2*T_h, 2*T_w), plus bias (K,)."""
    channels = products[0].shape[0]
    tiles = [[products[4 * row + column].view(channels, batch, tiles_h, tiles_w) for column in range(4)] for row in range(4)]
    # _at_tiles' outputs, each (K, N, T_h, T_w): (u, v, K, N, T_h, T_w) -> (N, K, T_h, u, T_w, v)
    output = torch.stack(_at_tiles(tiles)).view(2, 2, channels, batch, tiles_h, tiles_w).permute(3, 2, 4, 0, 5, 1)
    output = output.reshape(batch, channels, 2 * tiles_h, 2 * tiles_w)
    # Without a final elementwise op Inductor writes the stacked values to a buffer and permutes them in a
    # second pass; with one it writes the output in one (64x56: 1.7 vs 3.0 ms). "+ 0.0" is that op.
    return output + (0.0 if bias is None else bias.view(1, -1, 1, 1))


def _input_tiles_nhwc(grid: torch.Tensor) -> torch.Tensor:
    """grid (N, 2*T_h + 2, 2*T_w + 2, C), zero-padded -> V = B^T d B (16, N*T_h*T_w, C), as `_input_tiles` channels-last:
    the stride-2 row and column picks move whole C-vectors."""
    batch, height, width, channels = grid.shape
    tiles_h, tiles_w = (height - 2) // 2, (width - 2) // 2
    rows = [grid[:, k : k + 2 * tiles_h : 2] for k in range(4)]  # row k of every tile: (N, T_h, W, C)
    tiles = []
    for mixed in _bt(rows):  # column k of every tile: (N, T_h, T_w, C)
        tiles += _bt([mixed[:, :, k : k + 2 * tiles_w : 2] for k in range(4)])
    return torch.stack(tiles).reshape(16, batch * tiles_h * tiles_w, channels)


def _output_tiles_nhwc(bias: torch.Tensor | None, batch: int, tiles_h: int, tiles_w: int, *products: torch.Tensor) -> torch.Tensor:
    """products M[xi] (N*T_h*T_w, K), 16 of them -> Y = A^T M A (N, 2*T_h, 2*T_w, K) plus bias (K,), as `_output_tiles`
    channels-last."""
    channels = products[0].shape[1]
    tiles = [[products[4 * row + column].view(batch, tiles_h, tiles_w, channels) for column in range(4)] for row in range(4)]
    # _at_tiles' outputs, each (N, T_h, T_w, K): (u, v, N, T_h, T_w, K) -> (N, T_h, u, T_w, v, K)
    output = torch.stack(_at_tiles(tiles)).view(2, 2, batch, tiles_h, tiles_w, channels).permute(2, 3, 0, 4, 1, 5)
    output = output.reshape(batch, 2 * tiles_h, 2 * tiles_w, channels)
    return output + (0.0 if bias is None else bias)  # "+ 0.0": one pass, as in `_output_tiles`


def _grad_tiles(split: torch.Tensor, offset: int) -> torch.Tensor:
    """split (K, N, 2*T_h + 2, 2, T_w + 1), [k, n, r, q, t] = grad[n, k, r - offset, 2t + q - offset] (zero outside the
    grad): the grad's column phases (offset 0) or grad_input's, of the grad padded by 1 (offset 1)
    -> dM = A dY A^T (16, K, N*T_h*T_w), the output transform's adjoint.

    A = [[1, 0], [1, 1], [1, -1], [0, -1]]: of each tile's two rows (and then columns) first, first +
    second, first - second, -second. Read from column phases like `_input_tiles`: from the grad itself,
    the stride-2 loads took 6.7 ms at 64x56.
    """
    channels, batch, height, _, width = split.shape
    tiles_h, tiles_w = (height - 2) // 2, width - 1
    first, second = (split[:, :, offset + i : offset + i + 2 * tiles_h : 2] for i in range(2))  # (K, N, T_h, 2, T_w + 1)
    tiles = []
    for mixed in (first, first + second, first - second, -second):
        # grad column 2t + j is split column 2t + j + offset: phase (j + offset) % 2, at t + (j + offset) // 2
        left, right = (mixed[:, :, :, (j + offset) % 2, (j + offset) // 2 : (j + offset) // 2 + tiles_w] for j in range(2))
        tiles += [left, left + right, left - right, -right]
    return torch.stack(tiles).reshape(16, channels, batch * tiles_h * tiles_w)
