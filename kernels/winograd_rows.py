"""Winograd F(2, 3) along each row, shifted GEMMs down the columns: stride-1 convs with 3-wide kernels on the CPU.

shifted_gemm (kernels/shifted_gemm.py) sums one GEMM per kernel tap over row-shifted slices of the padded NHWC
input: 3 GEMMs per kernel row, each over every wide row. Here a kernel row's three horizontal taps are instead
Winograd's F(2, 3) (Lavin & Gray, 2015) along W: each pair of outputs (a "tile", T = W_out / 2 per row) reads four
padded inputs d, and with B^T, G, A^T the F(2, 3) matrices

    V = B^T d        4 values per tile and channel: d0 - d2, d1 + d2, d2 - d1, d1 - d3     input transform (4 passes)
    U = G g          4 (C_in, C_out) matrices per kernel row                                weight transform
    M[i] = sum_dy V[i][tile rows + dy*T] @ U[i, dy]    4 x kH GEMMs over N*H_pad*T rows     shifted down the columns
    Y = A^T M        y0 = M0 + M1 + M2, y1 = M1 - M2 - M3                                  output transform, NCHW

Per kernel row that is 4 GEMMs over half the rows instead of 3 over all of them: 2/3 of shifted_gemm's
multiply-adds, and each GEMM's running sum (read and written in its epilogue) is half as big. Against 2-D Winograd
F(2x2, 3x3) the tile buffers are 2x the input rather than 4x, and the vertical direction needs no transform.
F(2, 3) only multiplies by 0.5 and 1: the float32 error stays within kernels/tolerances.py's row as F(2x2, 3x3)'s
does (docs/performance.md, round 23).

Stride 1, kernel width 3, horizontal dilation 1, groups 1; any kernel height and vertical dilation (the shifts are
whole tile rows). An odd output width gets one more zero column on the right and its last output column cropped.
grad_input is the same conv of the padded grad_output with the flipped, transposed kernel; grad_weight is
shifted_gemm's, on the padded input rows the forward built (kept under autograd, as shifted_gemm keeps its own).
"""

from __future__ import annotations

import math

import torch

from kernels import compiled, gemm
from kernels.base import Support, UnsupportedProblem, register
from kernels.params import ConvSpec
from kernels.precision import HALF, widened
from kernels.shifted_gemm import ShiftedGemm, nhwc_rows, tap_offsets
from kernels.workspace import scratch


def eligible(weight: torch.Tensor, spec: ConvSpec) -> bool:
    """What it needs beyond shifted_gemm's checks (stride 1, bounded padding waste): a kernel 3 wide, horizontal
    dilation 1, groups 1."""
    return weight.shape[3] == 3 and spec.dilation[1] == 1 and spec.groups == 1 and spec.stride == (1, 1)


def transformed_input(grid: torch.Tensor, tiles: int) -> torch.Tensor:
    """grid: the padded NHWC input (N, H_pad, 2*tiles + 2, C) -> V (4, N*H_pad*tiles, C), [i, (n, y, t)] = (B^T d)[i]
    for d = grid[n, y, 2t : 2t + 4]. Compiled by Inductor (one pass over the grid, a new tensor) where it can be;
    eagerly (four passes) into a scratch buffer otherwise, valid until this thread's next call takes the buffer."""
    tiles_in = compiled.run(_input_tiles, grid, tiles) if compiled.takes(grid) else None
    return _input_eager(grid, tiles) if tiles_in is None else tiles_in


def _tile_inputs(grid: torch.Tensor, tiles: int) -> list[torch.Tensor]:
    """d0..d3: the four padded inputs of every tile, each (N, H_pad, tiles, C), [.., t, :] = grid[.., 2t + k, :]."""
    return [grid[:, :, start : start + 2 * tiles : 2] for start in range(4)]


def _input_tiles(grid: torch.Tensor, tiles: int) -> torch.Tensor:
    """`transformed_input` as one expression, for Inductor."""
    d0, d1, d2, d3 = _tile_inputs(grid, tiles)
    return torch.stack([d0 - d2, d1 + d2, d2 - d1, d1 - d3]).view(4, -1, grid.shape[3])


def _padded_input_tiles(source: torch.Tensor, top: int, bottom: int, left: int, right: int, tiles: int) -> torch.Tensor:
    """V straight from the NCHW source (N, C, H, W): its zero padding, the NHWC transpose and B^T d in one pass, for
    Inductor, where no caller needs the padded rows themselves (`conv_rows`)."""
    grid = torch.nn.functional.pad(source, (left, right, top, bottom)).permute(0, 2, 3, 1)
    return _input_tiles(grid, tiles)


def _input_eager(grid: torch.Tensor, tiles: int) -> torch.Tensor:
    batch, padded_height, _, channels = grid.shape
    d0, d1, d2, d3 = _tile_inputs(grid, tiles)
    shape = (4, batch, padded_height, tiles, channels)  # a scratch buffer: fresh pages cost faults (kernels/workspace.py)
    tiles_out = scratch("winograd_rows_tiles", math.prod(shape), grid).view(shape)
    torch.sub(d0, d2, out=tiles_out[0])
    torch.add(d1, d2, out=tiles_out[1])
    torch.sub(d2, d1, out=tiles_out[2])
    torch.sub(d1, d3, out=tiles_out[3])
    return tiles_out.view(4, -1, channels)


def transformed_weight(weight: torch.Tensor) -> torch.Tensor:
    """weight (C_out, C_in, kH, 3) -> U (4, kH, C_in, C_out), contiguous: U[i, dy] = (G g)[i] for the kernel row dy,
    (g0, (g0 + g1 + g2) / 2, (g0 - g1 + g2) / 2, g2); elementwise (a (.., 3) @ (3, 4) matmul took twice as long)."""
    taps = weight.permute(3, 2, 1, 0).contiguous()  # (3, kH, C_in, C_out): g0, g1, g2
    kernel_rows = taps.new_empty(4, *taps.shape[1:])
    kernel_rows[0], kernel_rows[3] = taps[0], taps[2]
    ends = taps[0] + taps[2]
    torch.add(ends, taps[1], out=kernel_rows[1])
    torch.sub(ends, taps[1], out=kernel_rows[2])
    kernel_rows[1:3].mul_(0.5)
    return kernel_rows


def _tile_grid(product: torch.Tensor, batch: int, out_height: int, padded_height: int, tiles: int) -> torch.Tensor:
    """A product (R, C_out) over the tile rows (n, y, t) as its (N, H_out, tiles, C_out) valid part (R may stop short of
    N*H_pad*tiles: the rows below the last image's output are never computed)."""
    channels = product.shape[1]
    return product.as_strided((batch, out_height, tiles, channels), (padded_height * tiles * channels, tiles * channels, channels, 1))


def _output_tiles(m0, m1, m2, m3, batch: int, out_height: int, padded_height: int, tiles: int) -> torch.Tensor:
    """Y = A^T M from the four products (R, C_out) -> (N, C_out, H_out, 2*tiles), contiguous. Compiled by Inductor
    (one pass) where it can be; the same ops run eagerly otherwise (`_output_eager`)."""
    grids = [_tile_grid(m, batch, out_height, padded_height, tiles) for m in (m0, m1, m2, m3)]
    even = (grids[0] + grids[1] + grids[2]).permute(0, 3, 1, 2)
    odd = (grids[1] - grids[2] - grids[3]).permute(0, 3, 1, 2)
    return torch.stack([even, odd], dim=-1).reshape(batch, m0.shape[1], out_height, 2 * tiles)


def _output_eager(products: list[torch.Tensor], batch: int, out_height: int, padded_height: int, tiles: int) -> torch.Tensor:
    """`_output_tiles` in place on the products (they are this call's own): two sums, then two transposing copies."""
    m0, m1, m2, m3 = products
    even = m0.add_(m1).add_(m2)
    odd = m1.sub_(m2).sub_(m3)
    output = m0.new_empty(batch, m0.shape[1], out_height, tiles, 2)
    for slot, product in enumerate((even, odd)):
        output[..., slot].copy_(_tile_grid(product, batch, out_height, padded_height, tiles).permute(0, 3, 1, 2))
    return output.view(batch, m0.shape[1], out_height, 2 * tiles)


def conv_rows(
    source: torch.Tensor,
    pads: tuple[int, int, int, int],
    kernel_rows: torch.Tensor,
    bias: torch.Tensor | None,
    row_dilation: int,
    tail: int = 0,
    rows_wanted: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The stride-1 conv of source (N, C_in, H, W), zero-padded by pads (top, bottom, left, right), with U =
    `transformed_weight` (4, kH, C_in, C_out) -> (output (N, C_out, H_out, W_out), W_out = W + left + right - 2,
    contiguous when W_out is even; the padded source as NHWC rows with `tail` zero rows after them, which is
    shifted_gemm's `padded_rows` layout, or None where an odd W_out took one more zero column, the batch is empty or
    the caller wants no rows).

    Without `rows_wanted`, V comes from the source in one compiled pass where there is compiled code for it: padding,
    transpose and transform together took 0.17 ms against 0.29-0.31 for the padded rows and then V (64x56, batch 4)."""
    top, bottom, left, right = pads
    batch, channels, height, width = source.shape
    out_height = height + top + bottom - (kernel_rows.shape[1] - 1) * row_dilation
    out_width = width + left + right - 2
    if batch == 0:
        return source.new_zeros(0, kernel_rows.shape[3], out_height, out_width), None
    tiles = -(-out_width // 2)
    extra = 2 * tiles - out_width  # an odd width's last tile reads one zero column more
    padded_height = height + top + bottom
    shape = (batch, out_height, padded_height, tiles)
    tiles_in = None
    if not rows_wanted and compiled.takes(source):
        tiles_in = compiled.run(_padded_input_tiles, source, top, bottom, left, right + extra, tiles)
    rows = None
    if tiles_in is None:
        rows = nhwc_rows(source, (top, bottom, left, right + extra), 0, tail)
        grid = rows[: batch * padded_height * (2 * tiles + 2)].view(batch, padded_height, 2 * tiles + 2, channels)
        tiles_in = transformed_input(grid, tiles)
    output = _conv_tiles(tiles_in, kernel_rows, bias, shape, row_dilation)
    return (output[..., :out_width], None) if extra else (output, rows if rows_wanted else None)


def _conv_tiles(
    tiles_in: torch.Tensor, kernel_rows: torch.Tensor, bias: torch.Tensor | None, shape: tuple[int, int, int, int], row_dilation: int
) -> torch.Tensor:
    """`conv_rows` on V (4, N*H_pad*tiles, C_in), shape (N >= 1, H_out, H_pad, tiles) -> (N, C_out, H_out, 2*tiles)."""
    batch, _, padded_height, tiles = shape
    kernel_h = kernel_rows.shape[1]
    step = row_dilation * tiles
    count = batch * padded_height * tiles - (kernel_h - 1) * step  # through the last image's last output row
    products = [
        gemm.sum_of_products(
            [(tiles_in[i, dy * step : dy * step + count], kernel_rows[i, dy]) for dy in range(kernel_h)],
            bias=bias if i == 1 else None,  # M1 reaches both outputs of a tile with coefficient 1
        )
        for i in range(4)
    ]
    output = compiled.run(_output_tiles, *products, *shape) if compiled.takes(products[0]) else None
    return _output_eager(products, *shape) if output is None else output


class WinogradRows(ShiftedGemm):
    name = "winograd_rows"
    inexact_nonfinite = frozenset({"forward", "backward"})  # the input transform mixes a tile (inf - inf = NaN)

    def support(self) -> Support:
        return Support(
            notes="stride 1, kernel width 3, groups 1: Winograd F(2, 3) along each row and shifted GEMMs down the "
            "columns (2/3 of shifted_gemm's flops), forward and grad_input; grad_weight as shifted_gemm",
        )

    def check(self, input: torch.Tensor, weight: torch.Tensor, spec: ConvSpec) -> None:
        super().check(input, weight, spec)
        if not eligible(weight, spec):
            raise UnsupportedProblem(
                f"algorithm 'winograd_rows' needs a kernel 3 wide, horizontal dilation 1 and groups 1; got kernel "
                f"{tuple(weight.shape[2:])}, dilation {spec.dilation}, groups {spec.groups}; use 'shifted_gemm'"
            )

    def loop_iterations(self, input, weight, spec):
        """Four GEMMs per kernel row."""
        return 4 * weight.shape[2]

    def forward(self, input, weight, bias, spec):
        """No backward will read the padded rows: V may come straight from the input (`conv_rows`)."""
        return self._forward(input, weight, bias, spec, rows_wanted=False)[0]

    def _forward(self, input, weight, bias, spec, rows_wanted=True):
        """(output (N, C_out, H_out, W_out), the padded input rows in shifted_gemm's layout for its grad_weight, or None:
        not `rows_wanted`, half precision, an odd output width, which pads one column more, or an empty batch)."""
        if input.dtype in HALF:  # float32 inside, one rounding at the end (kernels/precision.py)
            return self.forward(*widened(input, weight, bias), spec).to(input.dtype), None
        padded_width = input.shape[3] + spec.padding[2] + spec.padding[3]
        tail = tap_offsets(spec, (weight.shape[2], 3), padded_width)[-1]  # as shifted_gemm's backward reads them
        return conv_rows(input, spec.padding, transformed_weight(weight), bias, spec.dilation[0], tail, rows_wanted)

    def _backward(self, grad_output, input, weight, spec, need_input, need_weight, rows):
        """grad_weight as shifted_gemm's; grad_input, where its padding allows, as the forward's conv of the padded grad with
        the flipped, transposed kernel (while autograd records it, for a double backward: shifted_gemm's, differentiable)."""
        pads = _grad_padding(weight, spec)
        own = need_input and input.dtype not in HALF and not torch.is_grad_enabled() and min(pads) >= 0
        if not own:
            return super()._backward(grad_output, input, weight, spec, need_input, need_weight, rows)
        grad_weight = super()._backward(grad_output, input, weight, spec, False, True, rows)[1] if need_weight else None
        flipped = weight.flip(2, 3).transpose(0, 1)  # (C_in, C_out, kH, 3)
        grad_input = conv_rows(grad_output, pads, transformed_weight(flipped), None, spec.dilation[0], rows_wanted=False)[0]
        return grad_input, grad_weight


def _grad_padding(weight: torch.Tensor, spec: ConvSpec) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) padding of grad_output whose conv with the flipped kernel is grad_input (negative where
    the forward's padding passed the kernel's reach: grad_input is then a crop, left to shifted_gemm)."""
    reach = (weight.shape[2] - 1) * spec.dilation[0]
    top, bottom, left, right = spec.padding
    return reach - top, reach - bottom, 2 - left, 2 - right


register(WinogradRows())
