"""Depthwise conv (one input channel per group, channel multiplier m) as tap-wise multiply-adds.

A depthwise conv has no reduction over channels, so it is not a GEMM: every output channel is
sum_taps weight[c, tap] * window_tap(input[c]). Each tap is one fused elementwise pass (addcmul_)
over strided views, with the per-channel weight broadcast as (C, 1, 1), in whatever memory format
the input has (NCHW or channels_last), so the result already has the format nn.Conv2d returns.

No padded copy is made: each tap only touches the output positions whose input pixel lies inside
the image (`_tap_region`); the zero padding contributes nothing. That saves an input-sized
allocation, fill and copy in forward and again in backward, which matter here because the
arithmetic is so light. Output channel c*m + k reads input channel c, so multipliers loop over k
with strided channel slices instead of 5-D broadcasts.

Backward: grad_input scatters each tap back (region += grad * weight), grad_weight is one
per-channel dot product per tap over (N, H_out, W_out). In-place accumulation stays
differentiable for double backward: addcmul_ saves its operands, not the accumulator, and
in-place writes into views of a fresh tensor are recorded.

Flat fast path (`_shifted_sum`, `_flat_grad_weight`): for stride 1, multiplier 1, NCHW-contiguous
input and an output as wide as the input ("same" width, e.g. 3x3 padding 1), every tap is a constant
offset in each flattened (H*W) plane, so each tap is one multiply-add over (N*C, ~H*W) contiguous
runs instead of over (N*C*H, W) short rows, which ran ~3x slower per element. A read that leaves the
row on the left or right wraps into the neighbouring row; it lands on columns that a masked copy of
the source has zeroed (one copy per column shift, `_masked_sources`), and reads above or below the
plane are cut off by the flat range. grad_input is the same sum over grad_output with the taps'
shifts negated.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from kernels.base import ConvAlgorithm, Support, UnsupportedProblem, register
from kernels.params import ConvSpec
from kernels.precision import HALF, narrowed, widened
from kernels.workspace import scratch


def _axis_region(size: int, out_size: int, before: int, stride: int, offset: int) -> tuple[slice, slice] | None:
    """(output slice, input slice) along one axis where output o reads input o*stride + offset - before in [0, size)."""
    shift = offset - before
    first = max(0, -(shift // stride) if shift < 0 else 0)  # smallest o with o*stride + shift >= 0
    last = min(out_size, (size - 1 - shift) // stride + 1) if size - 1 - shift >= 0 else 0  # one past the largest valid o
    if first >= last:
        return None
    start = first * stride + shift
    return slice(first, last), slice(start, start + (last - first - 1) * stride + 1, stride)


def _tap_region(
    spec: ConvSpec, i: int, j: int, in_hw: tuple[int, int], out_hw: tuple[int, int]
) -> tuple[tuple[slice, slice], tuple[slice, slice]] | None:
    """((out rows, out cols), (in rows, in cols)) that kernel tap (i, j) connects inside the unpadded image, or None."""
    top, _, left, _ = spec.padding
    rows = _axis_region(in_hw[0], out_hw[0], top, spec.stride[0], i * spec.dilation[0])
    cols = _axis_region(in_hw[1], out_hw[1], left, spec.stride[1], j * spec.dilation[1])
    if rows is None or cols is None:
        return None
    return (rows[0], cols[0]), (rows[1], cols[1])


def _taps(spec: ConvSpec, kernel: tuple[int, int], in_hw: tuple[int, int], out_hw: tuple[int, int]):
    """(i, j, (out rows, out cols), (in rows, in cols)) for every tap that touches the image."""
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            region = _tap_region(spec, i, j, in_hw, out_hw)
            if region is not None:
                yield i, j, region[0], region[1]


def _covers(region: tuple[slice, slice], out_hw: tuple[int, int]) -> bool:
    return region[0] == slice(0, out_hw[0]) and region[1] == slice(0, out_hw[1])


def _flat_eligible(input: torch.Tensor, weight: torch.Tensor, spec: ConvSpec) -> bool:
    """Whether the flat fast path runs this problem: stride 1, multiplier 1, NCHW input, output width == input width.

    Not under grad mode (double backward): the fast path writes into reused scratch buffers.
    """
    _, _, left, right = spec.padding
    return (
        spec.stride == (1, 1)
        and weight.shape[0] == input.shape[1]
        and left + right == spec.dilation[1] * (weight.shape[3] - 1)
        and input.numel() > 0
        and input.is_contiguous()
        and not torch.is_grad_enabled()
    )


def _flat_taps(spec: ConvSpec, kernel: tuple[int, int], width: int) -> list[tuple[int, int, int]]:
    """(tap index i*kW + j, row shift, column shift) of every tap whose column shift stays inside a row.

    Output (y, x) reads input (y + row shift, x + column shift); a tap shifted a whole row or more
    sideways reads only padding and is left out.
    """
    top, _, left, _ = spec.padding
    taps = []
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            col_shift = j * spec.dilation[1] - left
            if abs(col_shift) < width:
                taps.append((i * kernel[1] + j, i * spec.dilation[0] - top, col_shift))
    return taps


@lru_cache(maxsize=64)
def _column_mask(height: int, width: int, col_shift: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(H*W,) ones, with zeros on the columns a read shifted by col_shift wraps onto: [W+s, W) for s < 0, [0, s) for s > 0."""
    mask = torch.ones(height, width, dtype=dtype, device=device)
    if col_shift < 0:
        mask[:, width + col_shift :] = 0
    else:
        mask[:, :col_shift] = 0
    return mask.view(-1)


def _masked_sources(source: torch.Tensor, col_shifts: set[int], slot: str) -> dict[int, torch.Tensor]:
    """{column shift: (N, C, H*W) flat source whose wrapped-onto columns are zero} for source (N, C, H, W), contiguous."""
    batch, channels, height, width = source.shape
    flat = source.view(batch, channels, height * width)
    sources = {}
    for col_shift in sorted(col_shifts):
        if col_shift == 0:
            sources[col_shift] = flat
            continue
        masked = scratch(f"{slot}{col_shift}", flat.numel(), flat).view(flat.shape)
        torch.mul(flat, _column_mask(height, width, col_shift, flat.dtype, flat.device), out=masked)
        sources[col_shift] = masked
    return sources


def _span(row_shift: int, col_shift: int, width: int, in_length: int, out_length: int) -> tuple[int, int, int]:
    """(flat offset, first output, one past the last output) that one tap touches in a flattened plane."""
    offset = row_shift * width + col_shift
    return offset, max(0, -offset), min(out_length, in_length - offset)


def _window(flat: torch.Tensor, start: int, length: int) -> torch.Tensor:
    """flat[:, :, start : start + length] for a contiguous (N, C, L) tensor (as_strided: the cheapest view on CPU)."""
    return flat.as_strided((flat.shape[0], flat.shape[1], length), flat.stride(), flat.storage_offset() + start)


def _shifted_sum(
    sources: dict[int, torch.Tensor],
    scales: torch.Tensor,
    taps: list[tuple[int, int, int]],
    bias: torch.Tensor | None,
    out_hw: tuple[int, int],
) -> torch.Tensor:
    """output (N, C, H_out, W) with output[y, x] = bias + sum over taps of scale * source[y + row shift, x + column shift].

    sources from `_masked_sources` (N, C, H_in*W); scales (kH*kW, C, 1) per tap; zero outside the source.
    """
    any_source = next(iter(sources.values()))
    batch, channels, in_length = any_source.shape
    out_height, width = out_hw
    out_length = out_height * width
    output = any_source.new_empty(batch, channels, out_height, width)
    flat = output.view(batch, channels, out_length)
    spans = [(t, col_shift, *_span(row_shift, col_shift, width, in_length, out_length)) for t, row_shift, col_shift in taps]
    spans = [span for span in spans if span[3] < span[4]]
    # The first tap that covers the whole output writes it (with the bias): one pass fewer than a fill.
    first = next((span for span in spans if span[3] == 0 and span[4] == out_length), None)
    if first is None:
        if bias is None:
            flat.zero_()
        else:
            flat.copy_(bias.view(-1, 1).expand(batch, channels, out_length))
    else:
        spans.remove(first)
        spans.insert(0, first)
    scales = scales.unbind(0)
    for span in spans:
        t, col_shift, offset, start, stop = span
        window = _window(sources[col_shift], start + offset, stop - start)
        if span is first:
            if bias is None:
                torch.mul(window, scales[t], out=flat)
            else:
                torch.addcmul(bias.view(-1, 1), window, scales[t], out=flat)
        else:
            _window(flat, start, stop - start).addcmul_(window, scales[t])
    return output


def _flat_grad_weight(
    grad_sources: dict[int, torch.Tensor], input: torch.Tensor, taps: list[tuple[int, int, int]], kernel_taps: int
) -> torch.Tensor:
    """(C, kH*kW) grad_weight: per tap, the per-channel dot product of grad_output with the shifted input.

    The wrapped reads are cancelled on the grad_output side: a tap shifted by s pairs with
    grad_sources[-s], whose columns that wrap are zero, so these are the same masked copies that
    grad_input reads and the input needs none. input (N, C, H, W) contiguous.
    """
    batch, channels, height, width = input.shape
    source = input.view(batch, channels, height * width)
    out_length = next(iter(grad_sources.values())).shape[2]
    # Per-tap, per-image partial sums; one sum over the images at the end (not two small ops per tap).
    partial = source.new_zeros(kernel_taps, batch, channels)
    buffer = scratch("depthwise_products", batch * channels * out_length, source)
    for t, row_shift, col_shift in taps:
        offset, start, stop = _span(row_shift, col_shift, width, height * width, out_length)
        if start >= stop:
            continue
        # A contiguous product buffer: the sum over its last axis then reads one long run per plane.
        products = buffer[: batch * channels * (stop - start)].view(batch, channels, stop - start)
        torch.mul(_window(grad_sources[-col_shift], start, stop - start), _window(source, start + offset, stop - start), out=products)
        torch.sum(products, dim=2, out=partial[t])
    return partial.sum(dim=1).t().contiguous()


class Depthwise(ConvAlgorithm):
    name = "depthwise"

    def support(self) -> Support:
        return Support(
            notes="depthwise only (C_in/groups == 1, any multiplier): one fused multiply-add per kernel tap, no padded copy",
        )

    def check(self, input: torch.Tensor, weight: torch.Tensor, spec: ConvSpec) -> None:
        super().check(input, weight, spec)
        if weight.shape[1] != 1 or spec.groups != input.shape[1]:
            raise UnsupportedProblem(
                f"algorithm 'depthwise' needs groups == C_in (one input channel per group), got groups={spec.groups}, C_in={input.shape[1]}"
            )

    def forward(self, input, weight, bias, spec):
        """input (N, C, H, W), weight (C*m, 1, kH, kW) -> (N, C*m, H_out, W_out) in input's memory format."""
        if input.dtype in HALF:  # float32 inside, one rounding at the end (kernels/precision.py)
            return self.forward(*widened(input, weight, bias), spec).to(input.dtype)
        if _flat_eligible(input, weight, spec):
            kernel = tuple(weight.shape[2:])
            taps = _flat_taps(spec, kernel, input.shape[3])
            sources = _masked_sources(input, {col_shift for _, _, col_shift in taps}, "depthwise_input")
            scales = weight.reshape(weight.shape[0], -1).t().unsqueeze(-1)  # (kH*kW, C, 1)
            out_hw = spec.output_size(input.shape[2], input.shape[3], *kernel)
            return _shifted_sum(sources, scales, taps, bias, out_hw)
        channels, multiplier = input.shape[1], weight.shape[0] // input.shape[1]
        kernel = tuple(weight.shape[2:])
        in_hw = tuple(input.shape[2:])
        out_hw = spec.output_size(*in_hw, *kernel)
        memory_format = torch.channels_last if _channels_last(input) else torch.contiguous_format
        taps = list(_taps(spec, kernel, in_hw, out_hw))
        # A tap that reads a valid pixel for every output (the centre one, usually) writes first:
        # one pass fewer than zero-filling and accumulating.
        first = next((tap for tap in taps if _covers(tap[2], out_hw)), None)
        channel_blocks = []
        for k in range(multiplier):
            scale = weight[k::multiplier, 0]  # (C, kH, kW): output channels c*m + k
            output = torch.empty((input.shape[0], channels, *out_hw), dtype=input.dtype, device=input.device, memory_format=memory_format)
            if first is None:
                output.zero_()
            else:
                i, j, _, (rows, cols) = first
                torch.mul(input[:, :, rows, cols], scale[:, i, j].view(-1, 1, 1), out=output)
            for tap in taps:
                if tap is not first:
                    i, j, (out_rows, out_cols), (rows, cols) = tap
                    output[:, :, out_rows, out_cols].addcmul_(input[:, :, rows, cols], scale[:, i, j].view(-1, 1, 1))
            if bias is not None:
                output += bias[k::multiplier].view(-1, 1, 1)
            channel_blocks.append(output)
        if multiplier == 1:
            return channel_blocks[0]
        return torch.stack(channel_blocks, dim=2).flatten(1, 2)  # (N, C, m, H_out, W_out): channel c*m + k

    def backward(self, grad_output, input, weight, spec, need_input, need_weight):
        if input.dtype in HALF:
            grad_input, grad_weight = self.backward(*widened(grad_output, input, weight), spec, need_input, need_weight)
            return narrowed(grad_input, input.dtype), narrowed(grad_weight, weight.dtype)
        if _flat_eligible(input, weight, spec):
            return self._flat_backward(grad_output.contiguous(), input, weight, spec, need_input, need_weight)
        channels, multiplier = input.shape[1], weight.shape[0] // input.shape[1]
        kernel = tuple(weight.shape[2:])
        in_hw, out_hw = tuple(input.shape[2:]), tuple(grad_output.shape[2:])
        taps = list(_taps(spec, kernel, in_hw, out_hw))
        grad_input = torch.zeros_like(input) if need_input else None
        grad_weight = weight.new_zeros(channels, multiplier, *kernel) if need_weight else None
        # One reused buffer for grad * input: a fresh output-sized temporary per tap costs page
        # faults. Not under grad mode, where autograd may keep each product.
        buffer = None if torch.is_grad_enabled() or grad_weight is None else torch.empty_like(grad_output[:, :channels])
        for k in range(multiplier):
            grad = grad_output[:, k::multiplier]  # (N, C, H_out, W_out) for output channels c*m + k
            scale = weight[k::multiplier, 0]
            for i, j, (out_rows, out_cols), (rows, cols) in taps:
                grad_region = grad[:, :, out_rows, out_cols]
                if grad_weight is not None:
                    # Reduce the contiguous (H, W) axes first, then the batch: a (0, 2, 3) reduction
                    # that keeps the middle axis vectorises poorly.
                    products = grad_region * input[:, :, rows, cols] if buffer is None else buffer[:, :, out_rows, out_cols]
                    if buffer is not None:
                        torch.mul(grad_region, input[:, :, rows, cols], out=products)
                    grad_weight[:, k, i, j] = products.sum(dim=(2, 3)).sum(dim=0)
                if grad_input is not None:
                    grad_input[:, :, rows, cols].addcmul_(grad_region, scale[:, i, j].view(-1, 1, 1))
        if grad_weight is not None:
            grad_weight = grad_weight.view(weight.shape)  # (C, m, kH, kW) -> (C*m, 1, kH, kW): index c*m + k
        return grad_input, grad_weight

    @staticmethod
    def _flat_backward(grad_output, input, weight, spec, need_input, need_weight):
        """grad_input as the shifted sum over grad_output with every shift negated; grad_weight per-tap dot products.

        Both read the same masked copies of grad_output (`_flat_grad_weight` says why that is enough).
        """
        kernel = tuple(weight.shape[2:])
        flipped = [(t, -row_shift, -col_shift) for t, row_shift, col_shift in _flat_taps(spec, kernel, input.shape[3])]
        sources = _masked_sources(grad_output, {col_shift for _, _, col_shift in flipped}, "depthwise_grad")
        grad_weight = grad_input = None
        if need_weight:
            taps = [(t, -row_shift, -col_shift) for t, row_shift, col_shift in flipped]
            grad_weight = _flat_grad_weight(sources, input, taps, kernel[0] * kernel[1]).view(weight.shape)
        if need_input:
            scales = weight.reshape(weight.shape[0], -1).t().unsqueeze(-1)
            grad_input = _shifted_sum(sources, scales, flipped, None, tuple(input.shape[2:]))
        return grad_input, grad_weight


def _channels_last(tensor: torch.Tensor) -> bool:
    return tensor.is_contiguous(memory_format=torch.channels_last) and not tensor.is_contiguous()


register(Depthwise())
