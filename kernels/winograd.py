"""Winograd F(2x2, 3x3): 3x3 stride-1 conv as 16 batched GEMMs over 4x4 input tiles, 2.25x fewer flops.

The output is cut into 2x2 tiles, each read from a 4x4 tile of the zero-padded NHWC input (tiles
overlap by 2). With B^T, G, A^T the F(2, 3) matrices (Lavin & Gray, 2015):

    V = B^T d B   (16 values per input tile and channel)          input transform
    U = G g G^T   (16 values per (C_out, C_in) kernel)            weight transform
    M[xi] = V[xi] @ U[xi]        for each of the 16 positions xi  one bmm, K = C_in
    Y = A^T M A   (2x2 outputs per tile)                          output transform

The transforms are additions of strided NHWC views (C innermost, so they vectorise), or, for NCHW
inputs of 24x24 and up, of channel-major views (`_nchw_winograd`, no layout copies); the GEMM does
4 multiply-adds per output per input channel instead of im2col's 9. F(2, 3) only multiplies by
0.5 and 1, so float32 results stay within the float32 row of kernels/tolerances.py, and float64
within 1e-10 (F(4, 3)'s larger transform constants were not needed for the win).

Backward is the same algorithm's adjoint: grad_input of a stride-1 3x3 conv is the 3x3 conv of
grad_output, padded by (2 - padding) per side, with the flipped, transposed kernel; grad_weight is
dU[xi] = V[xi]^T @ dM[xi] with dM = A dY A^T, then dW = G^T dU G. Tile buffers (16 values per 4
inputs) are 4x the input or output, so work is chunked over (images, tile rows) under the im2col
workspace limit.

groups == 1, 3x3, stride 1, dilation 1 only. The backward uses out= buffers, so when autograd
records it (double backward) it delegates to shifted_gemm's differentiable backward.

On the CPU (float32/64, NCHW or channels-last) each pass first asks `winograd_compiled` for transforms compiled
for the problem's shapes (one pass per transform instead of ~30); until they are compiled, or where compiling
is off or failed, the eager transforms below run.
"""

from __future__ import annotations

import math

import torch

from kernels import gemm, winograd_compiled
from kernels.base import ConvAlgorithm, Support, UnsupportedProblem, get, register
from kernels.im2col import _row_blocks
from kernels.limits import get_limits
from kernels.params import ConvSpec
from kernels.precision import HALF, narrowed, widened
from kernels.workspace import scratch

# Tile buffers are processed in blocks of at most this size (and the workspace limit), reused across
# blocks. Measured (1 thread, N=4): 1-4 MiB blocks lose to 16 MiB (smaller bmm's run slower); 16 MiB
# matched or beat one block of the whole batch (64x56: fwd 22.6 vs 25.4 ms) and faults in less memory.
BLOCK_BYTES = 16 << 20

# NCHW inputs at least this big (height and width) run the forward channel-major (`_nchw_winograd`).
# Same-process A/B, 2 threads, forward: 64x56 2-4% faster, 128x28 tie to 7% faster, but 256x14 5-15%
# slower (fewer tiles per channel: the stride-2 output writes and short rows cost more than the copies).
NCHW_MIN_SIZE = 24

# G (4x3): weight transform.
_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))


def _tile_grid(like: torch.Tensor, shape: tuple[int, int, int, int], slot: str, rows: slice, cols: slice) -> torch.Tensor:
    """Scratch tensor of `shape` (a tile buffer: it never leaves the algorithm call), zero outside [:, rows, cols].

    Only the border is zeroed, in up to four strided fills: the caller overwrites the interior, and
    a fill of the whole buffer cost ~0.25 ms a call at 64x56 (2 threads).
    """
    grid = scratch(slot, shape[0] * shape[1] * shape[2] * shape[3], like).view(shape)
    grid[:, : rows.start].zero_()
    grid[:, rows.stop :].zero_()
    grid[:, rows, : cols.start].zero_()
    grid[:, rows, cols.stop :].zero_()
    return grid


def _tile_input(nchw: torch.Tensor, pads: tuple[int, int, int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
    """nchw (N, C, H, W) padded by (top, bottom, left, right) (negative crops) -> (tile buffer, output size).

    One copy: the NCHW -> NHWC transpose and the zero padding, rounded up to whole 4x4 tiles.
    """
    top, bottom, left, right = pads
    batch, channels, height, width = nchw.shape
    out_hw = (height + top + bottom - 2, width + left + right - 2)
    tiles_h, tiles_w = -(-out_hw[0] // 2), -(-out_hw[1] // 2)
    source = nchw.permute(0, 2, 3, 1)[:, max(0, -top) : height - max(0, -bottom), max(0, -left) : width - max(0, -right)]
    rows = slice(max(0, top), max(0, top) + source.shape[1])
    cols = slice(max(0, left), max(0, left) + source.shape[2])
    grid = _tile_grid(nchw, (batch, 2 * tiles_h + 2, 2 * tiles_w + 2, channels), "winograd_grid", rows, cols)
    grid[:, rows, cols] = source
    return grid, out_hw


def _input_transform(grid: torch.Tensor, images: slice, rows: slice, out: torch.Tensor) -> torch.Tensor:
    """V = B^T d B for the tiles of `rows` in `images` of grid (N, H_t, W_t, C) -> out (16, N_b*R*T_w, C)."""
    block = grid[images, 2 * rows.start : 2 * rows.stop + 2]
    batch, _, grid_width, channels = block.shape
    tiles_w = (grid_width - 2) // 2
    count = rows.stop - rows.start
    picks = [block[:, k : k + 2 * count : 2] for k in range(4)]  # row k of every tile: (N_b, R, W_t, C)
    row_mixed = scratch("winograd_rows", 4 * batch * count * grid_width * channels, grid).view(4, batch, count, grid_width, channels)
    torch.sub(picks[0], picks[2], out=row_mixed[0])
    torch.add(picks[1], picks[2], out=row_mixed[1])
    torch.sub(picks[2], picks[1], out=row_mixed[2])
    torch.sub(picks[1], picks[3], out=row_mixed[3])
    tiles = out.view(4, 4, batch, count, tiles_w, channels)
    for a, mixed in enumerate(row_mixed):
        cols = [mixed[:, :, k : k + 2 * tiles_w : 2] for k in range(4)]
        torch.sub(cols[0], cols[2], out=tiles[a, 0])
        torch.add(cols[1], cols[2], out=tiles[a, 1])
        torch.sub(cols[2], cols[1], out=tiles[a, 2])
        torch.sub(cols[1], cols[3], out=tiles[a, 3])
    return out


def _output_transform(products: torch.Tensor, output: torch.Tensor, images: slice, rows: slice) -> None:
    """Y = A^T M A: products (16, N_b*R*T_w, K) -> the 2x2 tiles of output (N, 2*T_h, 2*T_w, K) in `rows`."""
    block = output[images, 2 * rows.start : 2 * rows.stop]
    batch, _, out_width, channels = block.shape
    count, tiles_w = rows.stop - rows.start, out_width // 2
    tiles = products.view(4, 4, batch, count, tiles_w, channels)
    mixed = scratch("winograd_rows", 10 * batch * count * tiles_w * channels, products).view(10, batch, count, tiles_w, channels)
    top, bottom, pair = mixed[0:4], mixed[4:8], mixed[8:10]
    torch.add(tiles[0], tiles[1], out=top).add_(tiles[2])  # (4, N_b, R, T_w, K): tile row 0, per column b
    torch.sub(tiles[1], tiles[2], out=bottom).sub_(tiles[3])
    for u, rows_u in enumerate((top, bottom)):
        torch.add(rows_u[0], rows_u[1], out=pair[0])
        torch.add(pair[0], rows_u[2], out=block[:, u::2, 0::2])
        torch.sub(rows_u[1], rows_u[2], out=pair[1])
        torch.sub(pair[1], rows_u[3], out=block[:, u::2, 1::2])


def _output_adjoint(grid: torch.Tensor, images: slice, rows: slice, out: torch.Tensor) -> torch.Tensor:
    """dM = A dY A^T: grad of output (N, 2*T_h, 2*T_w, K) in `rows` -> out (16, N_b*R*T_w, K)."""
    block = grid[images, 2 * rows.start : 2 * rows.stop]
    batch, _, out_width, channels = block.shape
    count, tiles_w = rows.stop - rows.start, out_width // 2
    first, second = block[:, 0::2], block[:, 1::2]
    # Rows of A dY: first, first + second, first - second, -second (reused scratch, not fresh temporaries).
    combos = scratch("winograd_rows", 3 * first.numel(), out).view(3, *first.shape)
    torch.add(first, second, out=combos[0])
    torch.sub(first, second, out=combos[1])
    torch.neg(second, out=combos[2])
    row_mixed = (first, combos[0], combos[1], combos[2])
    tiles = out.view(4, 4, batch, count, tiles_w, channels)
    for a, mixed in enumerate(row_mixed):
        left, right = mixed[:, :, 0::2], mixed[:, :, 1::2]
        tiles[a, 0].copy_(left)
        torch.add(left, right, out=tiles[a, 1])
        torch.sub(left, right, out=tiles[a, 2])
        torch.neg(right, out=tiles[a, 3])
    return out


def _kron_g(like: torch.Tensor) -> torch.Tensor:
    """(16, 9) matrix kron(G, G): [4x + y, 3i + j] = G[x, i] * G[y, j], so U = G g G^T is one product per kernel."""
    g = like.new_tensor(_G)
    return torch.kron(g, g)


def _transformed_weight(weight: torch.Tensor) -> torch.Tensor:
    """U = G g G^T: weight (C_out, C_in, 3, 3) -> (16, C_in, C_out), a transposed view bmm reads as is.

    One (16, 9) @ (9, C_out*C_in) GEMM: 10-15x faster than the equivalent einsum (0.04 vs 0.43 ms at
    64 channels, 0.39 vs 5.8 ms at 256, 2 threads), which ran 9-term contractions through copies. Through
    kernels/gemm.py: at 256 channels oneDNN's product takes 0.14 ms where torch's took 0.22 (2 threads,
    AVX-512); written as a compiled 9-term sum per value (stride-9 reads) it took 1.0 ms.
    """
    out_channels, in_channels = weight.shape[:2]
    flat = weight.reshape(out_channels * in_channels, 9)
    return gemm.mm(_kron_g(weight), flat.t()).view(16, out_channels, in_channels).transpose(1, 2)


def _block_plan(batch: int, tiles_h: int, tiles_w: int, channels: int, like: torch.Tensor) -> tuple[list[tuple[slice, slice]], int]:
    """(images, tile rows) blocks whose 16-position tile buffer stays under BLOCK_BYTES and the workspace
    limit, and the most tile positions one block holds (what the reused buffers are sized for)."""
    row_bytes = 16 * tiles_w * channels * like.element_size()
    blocks = list(_row_blocks(batch, tiles_h, row_bytes, min(BLOCK_BYTES, get_limits().im2col_workspace_bytes)))
    most = max(((images.stop - images.start) * (rows.stop - rows.start) * tiles_w for images, rows in blocks), default=0)
    return blocks, most


def _scratch(like: torch.Tensor, capacity: int, slot: str):
    """A reusable flat buffer of `capacity` elements and f(positions, channels) -> its (16, positions, channels) view.

    Reused across blocks so each call faults in its tile buffers once, not once per block.
    """
    flat = scratch(slot, capacity, like)
    return lambda positions, channels: flat[: 16 * positions * channels].view(16, positions, channels)


def _winograd_conv(grid: torch.Tensor, out_hw: tuple[int, int], transformed: torch.Tensor) -> torch.Tensor:
    """Valid 3x3 conv of tile buffer grid (N, 2*T_h + 2, 2*T_w + 2, C) -> (N, H_out, W_out, K) view (NHWC)."""
    batch, grid_height, grid_width, channels = grid.shape
    tiles_h, tiles_w = (grid_height - 2) // 2, (grid_width - 2) // 2
    out_channels = transformed.shape[2]
    output = grid.new_empty(batch, 2 * tiles_h, 2 * tiles_w, out_channels)
    blocks, most = _block_plan(batch, tiles_h, tiles_w, max(channels, out_channels), grid)
    tile_buffer = _scratch(grid, 16 * most * channels, "winograd_tiles")
    product_buffer = _scratch(grid, 16 * most * out_channels, "winograd_products")
    for images, rows in blocks:
        positions = (images.stop - images.start) * (rows.stop - rows.start) * tiles_w
        tiles = _input_transform(grid, images, rows, tile_buffer(positions, channels))
        products = gemm.bmm(tiles, transformed, out=product_buffer(positions, out_channels))
        _output_transform(products, output, images, rows)
    return output[:, : out_hw[0], : out_hw[1]]


def _column_phases(nchw: torch.Tensor, pads: tuple[int, int, int, int]) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """NCHW input padded by pads (>= 0) -> (C, N, 2*T_h + 2, 2, T_w + 1) scratch, [c, n, r, q, t] = padded[n, c, r, 2t + q].

    Splitting the padded columns by parity (one strided copy, no NCHW -> NHWC transpose) makes every
    column pick of the input transform a contiguous run; returns the split, the output size and (T_h, T_w).
    """
    top, bottom, left, right = pads
    batch, channels, height, width = nchw.shape
    out_hw = (height + top + bottom - 2, width + left + right - 2)
    tiles_h, tiles_w = -(-out_hw[0] // 2), -(-out_hw[1] // 2)
    shape = (channels, batch, 2 * tiles_h + 2, 2, tiles_w + 1)
    split = scratch("winograd_grid", math.prod(shape), nchw).view(shape)
    split[:, :, :top].zero_()
    split[:, :, top + height :].zero_()
    for q in range(2):
        first = max(0, -((q - left) // 2))  # smallest t with 2t + q - left >= 0
        column = 2 * first + q - left
        count = len(range(column, width, 2))
        dest = split[:, :, top : top + height, q].transpose(0, 1)
        dest[..., :first].zero_()
        dest[..., first + count :].zero_()
        if count:
            dest[..., first : first + count] = nchw[:, :, :, column::2]
    return split, out_hw, (tiles_h, tiles_w)


def _nchw_winograd(input: torch.Tensor, weight: torch.Tensor, pads: tuple[int, int, int, int]) -> torch.Tensor:
    """Forward for an NCHW-contiguous input, channel-major throughout: (N, C, H, W) -> (N, C_out, H_out, W_out) view.

    Same F(2x2, 3x3) as `_winograd_conv`, but tiles are (16, C, N_b*tiles) and the products are
    U[xi] (C_out, C) @ V[xi] (C, N_b*tiles), so neither the NCHW -> NHWC input copy nor the NHWC -> NCHW
    output copy is needed; the output transform writes the final tensor through stride-2 views.
    The NHWC path's two transposing copies cost ~1.1 ms each at 64x56 (2 threads); the GEMM in this
    orientation is ~5% slower and the output's stride-2 writes cost more, so the net is small: same
    process, forward, 64x56 2-4% faster at 2 threads, 128x28 0-9% at 2 threads and 8-9% at 1 thread
    (round 7, docs/performance.md); small images lose (NCHW_MIN_SIZE).
    """
    split, out_hw, (tiles_h, tiles_w) = _column_phases(input, pads)
    batch, channels = input.shape[:2]
    out_channels = weight.shape[0]
    transformed = _transformed_weight(weight).transpose(1, 2)  # (16, C_out, C)
    output = input.new_empty(batch, out_channels, 2 * tiles_h, 2 * tiles_w)
    blocks, most = _block_plan(batch, tiles_h, tiles_w, max(channels, out_channels), input)
    tile_buffer = scratch("winograd_tiles", 16 * most * channels, input)
    product_buffer = scratch("winograd_products", 16 * most * out_channels, input)
    for images, rows in blocks:
        count, block_rows = images.stop - images.start, rows.stop - rows.start
        block = split[:, images, 2 * rows.start : 2 * rows.stop + 2]
        picks = [block[:, :, k : k + 2 * block_rows : 2] for k in range(4)]  # row k of every tile: (C, N_b, R, 2, T_w + 1)
        mixed_shape = (4, channels, count, block_rows, 2, tiles_w + 1)
        row_mixed = scratch("winograd_rows", math.prod(mixed_shape), input).view(mixed_shape)
        torch.sub(picks[0], picks[2], out=row_mixed[0])
        torch.add(picks[1], picks[2], out=row_mixed[1])
        torch.sub(picks[2], picks[1], out=row_mixed[2])
        torch.sub(picks[1], picks[3], out=row_mixed[3])
        positions = block_rows * tiles_w
        tiles = tile_buffer[: 16 * count * channels * positions].view(4, 4, channels, count, block_rows, tiles_w)
        for a, mixed in enumerate(row_mixed):
            cols = (mixed[..., 0, :tiles_w], mixed[..., 1, :tiles_w], mixed[..., 0, 1:], mixed[..., 1, 1:])
            torch.sub(cols[0], cols[2], out=tiles[a, 0])
            torch.add(cols[1], cols[2], out=tiles[a, 1])
            torch.sub(cols[2], cols[1], out=tiles[a, 2])
            torch.sub(cols[1], cols[3], out=tiles[a, 3])
        products = product_buffer[: 16 * count * out_channels * positions].view(16, out_channels, count * positions)
        gemm.bmm(transformed, tiles.view(16, channels, count * positions), out=products)
        by_tile = products.view(4, 4, out_channels, count, block_rows, tiles_w)
        mixed = scratch("winograd_rows", 10 * count * out_channels * positions, input)
        mixed = mixed.view(10, out_channels, count, block_rows, tiles_w)
        top, bottom, pair = mixed[0:4], mixed[4:8], mixed[8:10]
        torch.add(by_tile[0], by_tile[1], out=top).add_(by_tile[2])
        torch.sub(by_tile[1], by_tile[2], out=bottom).sub_(by_tile[3])
        out_block = output[images, :, 2 * rows.start : 2 * rows.stop].view(count, out_channels, block_rows, 2, tiles_w, 2)
        out_block = out_block.transpose(0, 1)
        for u, rows_u in enumerate((top, bottom)):
            torch.add(rows_u[0], rows_u[1], out=pair[0])
            torch.add(pair[0], rows_u[2], out=out_block[:, :, :, u, :, 0])
            torch.sub(rows_u[1], rows_u[2], out=pair[1])
            torch.sub(pair[1], rows_u[3], out=out_block[:, :, :, u, :, 1])
    return output[:, :, : out_hw[0], : out_hw[1]]


class Winograd(ConvAlgorithm):
    name = "winograd"
    inexact_nonfinite = frozenset({"forward", "backward"})  # each transform mixes a whole tile (inf - inf = NaN)

    def support(self) -> Support:
        return Support(
            notes="3x3 stride 1, groups 1: Winograd F(2x2, 3x3), 16 batched GEMMs over 4x4 tiles (2.25x fewer flops); "
            "on CPU, once compiled for the problem's shapes, one pass per tile transform (kernels/compiled.py)",
        )

    def check(self, input: torch.Tensor, weight: torch.Tensor, spec: ConvSpec) -> None:
        super().check(input, weight, spec)
        if tuple(weight.shape[2:]) != (3, 3):
            raise UnsupportedProblem(f"algorithm 'winograd' needs a 3x3 kernel, got {tuple(weight.shape[2:])}")
        if spec.stride != (1, 1) or spec.dilation != (1, 1) or spec.groups != 1:
            raise UnsupportedProblem(
                f"algorithm 'winograd' needs stride (1, 1), dilation (1, 1), groups 1; "
                f"got stride {spec.stride}, dilation {spec.dilation}, groups {spec.groups}"
            )

    def forward(self, input, weight, bias, spec):
        if input.dtype in HALF:  # float32 inside, one rounding at the end (kernels/precision.py)
            return self.forward(*widened(input, weight, bias), spec).to(input.dtype)
        if winograd_compiled.eligible(input, channels_last=True):  # once compiled for these shapes: one pass per transform
            output = winograd_compiled.forward(input, weight, bias, spec.padding)
            if output is not None:
                return output
        if input.is_contiguous() and min(input.shape[2:]) >= NCHW_MIN_SIZE:  # no layout copies (`_nchw_winograd`)
            output = _nchw_winograd(input, weight, spec.padding)
            return output if bias is None else output + bias.view(-1, 1, 1)
        grid, out_hw = _tile_input(input, spec.padding)
        output = _winograd_conv(grid, out_hw, _transformed_weight(weight))
        if bias is not None:
            output = output + bias
        return output.permute(0, 3, 1, 2)

    def forward_keeping(self, input, weight, bias, spec):
        """The compiled forward keeps its input tiles for grad_weight (`winograd_compiled.forward_keeping`)."""
        if input.dtype not in HALF and winograd_compiled.eligible(input, channels_last=True):
            result = winograd_compiled.forward_keeping(input, weight, bias, spec.padding)
            if result is not None:
                return result
        return self.forward(input, weight, bias, spec), None

    def backward(self, grad_output, input, weight, spec, need_input, need_weight):
        return self._backward(grad_output, input, weight, spec, need_input, need_weight, None)

    def backward_kept(self, kept, grad_output, input, weight, spec, need_input, need_weight):
        return self._backward(grad_output, input, weight, spec, need_input, need_weight, kept)

    def _backward(self, grad_output, input, weight, spec, need_input, need_weight, tiles):
        """tiles: the compiled forward's V of this input, (16, P, C), or None."""
        if torch.is_grad_enabled():  # double backward: out= buffers are not differentiable
            return get("shifted_gemm").backward(grad_output, input, weight, spec, need_input, need_weight)
        if input.dtype in HALF:
            grad_input, grad_weight = self.backward(*widened(grad_output, input, weight), spec, need_input, need_weight)
            return narrowed(grad_input, input.dtype), narrowed(grad_weight, weight.dtype)
        grad_input = grad_weight = grad_phases = None
        if need_input:
            # once: the compiled grad_input reads NCHW, or channels-last as it comes (a channels-last caller's grad)
            grad = grad_output if grad_output.is_contiguous(memory_format=torch.channels_last) else grad_output.contiguous()
            if winograd_compiled.eligible(grad, channels_last=True):
                grad_input, grad_phases = winograd_compiled.grad_input_and_phases(grad, weight, spec) or (None, None)
        if need_input and grad_input is None:
            top, bottom, left, right = spec.padding
            grid, out_hw = _tile_input(grad_output, (2 - top, 2 - bottom, 2 - left, 2 - right))
            flipped = _transformed_weight(weight.flip(2, 3).transpose(0, 1))
            grad_input = _winograd_conv(grid, out_hw, flipped).permute(0, 3, 1, 2)
        # channels-last inputs too: their column phases are a gathering copy, still ahead of the eager path
        # (channels-last, batch 4: 64x56 a tie, 128x28 3.5 vs 3.8 ms, 256x14 3.0 vs 4.4)
        if need_weight and winograd_compiled.eligible(input, channels_last=True):
            grad_weight = winograd_compiled.grad_weight(grad_output, input, weight, spec.padding, tiles, grad_phases)
        if need_weight and grad_weight is None:
            grad_weight = self._grad_weight(grad_output, input, weight, spec)
        return grad_input, grad_weight

    @staticmethod
    def _grad_weight(grad_output, input, weight, spec):
        """dW = G^T (sum over tiles V^T dM) G, with the forward's tiling of the input."""
        grid, out_hw = _tile_input(input, spec.padding)
        batch, grid_height, grid_width, channels = grid.shape
        tiles_h, tiles_w = (grid_height - 2) // 2, (grid_width - 2) // 2
        out_channels = weight.shape[0]
        shape = (batch, 2 * tiles_h, 2 * tiles_w, out_channels)
        grad_grid = _tile_grid(grid, shape, "winograd_grad_grid", slice(0, out_hw[0]), slice(0, out_hw[1]))
        grad_grid[:, : out_hw[0], : out_hw[1]] = grad_output.permute(0, 2, 3, 1)
        grad_transformed = grid.new_zeros(16, channels, out_channels)
        blocks, most = _block_plan(batch, tiles_h, tiles_w, max(channels, out_channels), grid)
        tile_buffer = _scratch(grid, 16 * most * channels, "winograd_tiles")
        grad_buffer = _scratch(grid, 16 * most * out_channels, "winograd_products")
        for images, rows in blocks:
            positions = (images.stop - images.start) * (rows.stop - rows.start) * tiles_w
            tiles = _input_transform(grid, images, rows, tile_buffer(positions, channels))
            grad_products = _output_adjoint(grad_grid, images, rows, grad_buffer(positions, out_channels))
            grad_transformed.baddbmm_(tiles.transpose(1, 2), grad_products)
        # dW = G^T dU G per kernel: one (9, 16) @ (16, C_in*C_out) GEMM (see _transformed_weight).
        flat = _kron_g(weight).t() @ grad_transformed.view(16, channels * out_channels)
        return flat.view(3, 3, channels, out_channels).permute(3, 2, 0, 1).contiguous()


register(Winograd())
