"""Depthwise conv (one input channel per group, channel multiplier m) as tap-wise multiply-adds.

A depthwise conv has no reduction over channels, so it is not a GEMM: every output channel is
sum_taps weight[c, tap] * window_tap(input[c]). Each tap is one fused elementwise pass (addcmul_)
over strided views, with the per-channel weight broadcast as (C, 1, 1), in whatever memory format
the input has (NCHW or channels_last), so the result already has the format nn.Conv2d returns.

The general path makes no padded copy: each tap only touches the output positions whose input pixel lies inside
the image (`_tap_region`); the zero padding contributes nothing. That saves an input-sized
allocation, fill and copy in forward and again in backward, which matter here because the
arithmetic is so light. Output channel c*m + k reads input channel c, so multipliers loop over k
with strided channel slices instead of 5-D broadcasts.

Backward: grad_input scatters each tap back (region += grad * weight), grad_weight is one
per-channel dot product per tap over (N, H_out, W_out). In-place accumulation stays
differentiable for double backward: addcmul_ saves its operands, not the accumulator, and
in-place writes into views of a fresh tensor are recorded.

Flat fast path (stride 1, multiplier 1, NCHW-contiguous input, output as wide as the input, e.g.
3x3 padding 1): every tap is a constant offset in each flattened (H*W) plane, so each tap is one
multiply-add over (N*C, H*W) contiguous runs instead of over (N*C*H, W) short rows, which ran ~3x
slower per element. A read that leaves a row on the left or right wraps into the neighbouring row;
it lands on columns that a masked copy of the source has zeroed, one copy per column shift. The
copies are stacked in one buffer (`_Stack`) with zeros between the planes, written by one multiply,
so a tap's read may run past its plane into zeros: every tap on a copy reads and writes whole
planes, with no per-tap window on the output. At the service's usual batch of one, per-call costs
(each torch op or view ~3-10 us here) were most of the time, so the call count matters. grad_input is the same sum over grad_output with the taps'
shifts negated, and grad_weight pairs the same reads with the input, per tap; small problems instead
stack a copy per kernel column so that all taps' reads are one strided view, and grad_weight is one
multiply and one sum (`_one_view_backward`).

On the CPU, stride-1 problems of `depthwise_compiled.MIN_MACS` and up first ask it for code compiled for
their exact shapes (one loop nest per pass instead of one pass per tap); until it is compiled, or where
compiling is off or failed, the paths above run.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from kernels import depthwise_compiled
from kernels.base import ConvAlgorithm, Support, UnsupportedProblem, register
from kernels.layout import strictly_channels_last
from kernels.limits import get_limits, keepable
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


# Masks up to this many elements are kept (64 of them at most): a few KB for the usual layers, while
# a wide kernel on a big image, whose masks can reach the workspace limit, builds them per call.
MASK_CACHE_MAX_ELEMENTS = 1 << 16


def _column_masks(height: int, width: int, col_shifts: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(len(col_shifts), 1, 1, H*W): ones, with zeros on the columns a read shifted by s wraps onto.

    Those are [W+s, W) for s < 0 and [0, s) for s > 0: all of them once |s| >= W.
    """
    if len(col_shifts) * height * width <= MASK_CACHE_MAX_ELEMENTS:
        return _cached_masks(height, width, col_shifts, dtype, device)
    return _build_masks(height, width, col_shifts, dtype, device)


def _build_masks(height: int, width: int, col_shifts: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    masks = torch.ones(len(col_shifts), height, width, dtype=dtype, device=device)
    for mask, col_shift in zip(masks, col_shifts):
        if col_shift < 0:
            mask[:, max(0, width + col_shift) :] = 0
        elif col_shift > 0:
            mask[:, :col_shift] = 0
    return masks.view(len(col_shifts), 1, 1, height * width)


_cached_masks = lru_cache(maxsize=64)(_build_masks)


def _pad_for(offsets: list[int], source_length: int, out_length: int) -> int:
    """Zeros needed around each flattened source plane so that out_length reads from each offset stay in the plane or its zeros."""
    return max([0, *(max(-offset, offset + out_length - source_length) for offset in offsets)])


def _side_layout(taps: list[tuple[int, int, int]], source_length: int, out_length: int) -> tuple[tuple[int, ...], int]:
    """(column shifts that need a masked copy, zeros after each plane) for taps (t, offset, column shift)."""
    side = tuple(sorted({col_shift for _, _, col_shift in taps if col_shift}))
    return side, _pad_for([offset for _, offset, col_shift in taps if col_shift], source_length, out_length) if side else 0


def _stack_numel(blocks: int, planes: int, length: int, pad: int) -> int:
    """Elements of a `_Stack`: `blocks` copies of `planes` planes of `length` values, `pad` zeros first and after each plane."""
    return blocks * planes * (length + pad) + pad


def _stack_bytes(blocks: int, planes: int, length: int, pad: int, element_size: int) -> int:
    return _stack_numel(blocks, planes, length, pad) * element_size


def _fits_workspace(nbytes: int) -> bool:
    """Whether a stack of nbytes stays under the workspace limit (CONV_WORKSPACE_BYTES in the service).

    The zeros after each plane grow with the vertical padding, and the copies with the kernel's width:
    a request with a very tall padding or a very wide kernel takes the general path, which copies nothing.
    """
    return nbytes <= get_limits().im2col_workspace_bytes


class _Stack:
    """Masked copies of a (N, C, L) source, one block per column shift, each plane followed by `pad` zeros.

    Layout: pad zeros, then the planes of block 0 (each plane L values then pad zeros), block 1, ...
    So a read at offset o in [-pad, pad] of any plane sees that plane or zeros, never its neighbour.
    Built with one zeroing op (all gaps, as a strided view) and one multiply (all blocks) by 0/1 masks, or, where
    the source holds a NaN or an infinity (x * 0 = NaN would reach outputs that never read x), one select, ~5x
    slower on the CPU. Telling them apart costs a sum (~1/2 of the multiply); CUDA selects, not to wait for it.
    """

    def __init__(self, source: torch.Tensor, height: int, width: int, col_shifts: tuple[int, ...], pad: int, slot: str):
        batch, channels, length = source.shape
        self.shape, self.pad, self.pitch = (batch, channels), pad, length + pad
        self.block = batch * channels * self.pitch
        planes = len(col_shifts) * batch * channels
        self.buffer = scratch(slot, _stack_numel(len(col_shifts), batch * channels, length, pad), source)
        start = self.buffer.storage_offset()
        if pad:
            self.buffer.as_strided((planes + 1, pad), (self.pitch, 1), start).zero_()
        inside = self.buffer.as_strided(
            (len(col_shifts), batch, channels, length), (self.block, channels * self.pitch, self.pitch, 1), start + pad
        )
        masks = _column_masks(height, width, col_shifts, source.dtype, source.device)
        if source.device.type == "cpu" and math.isfinite(source.sum().item()):
            torch.mul(source.unsqueeze(0), masks, out=inside)
        else:
            torch.where(masks != 0, source.unsqueeze(0), source.new_zeros(()), out=inside)

    def view(self, block: int, offset: int, length: int) -> torch.Tensor:
        """(N, C, length): block's planes read from flat offset `offset` (zeros past the plane)."""
        batch, channels = self.shape
        start = self.buffer.storage_offset() + self.pad + offset + block * self.block
        return self.buffer.as_strided((batch, channels, length), (channels * self.pitch, self.pitch, 1), start)


def _window(flat: torch.Tensor, start: int, length: int) -> torch.Tensor:
    """flat[:, :, start : start + length] for a contiguous (N, C, L) tensor (as_strided: the cheapest view on CPU)."""
    return flat.as_strided((flat.shape[0], flat.shape[1], length), flat.stride(), flat.storage_offset() + start)


def _accumulate(flat: torch.Tensor, terms: list[tuple[int, torch.Tensor, torch.Tensor, tuple[int, int] | None]]) -> None:
    """flat (N, C, L) = sum of scale * source over terms (tap, source view, scale (C, 1), output span or None for all).

    The first whole-output term writes flat (one pass fewer than zero-filling it first).
    """
    first = next((term for term in terms if term[3] is None), None)
    if first is None:
        flat.zero_()
    else:
        torch.mul(first[1], first[2], out=flat)
    for term in terms:
        if term is not first:
            _, source, scale, span = term
            target = flat if span is None else _window(flat, span[0], span[1] - span[0])
            target.addcmul_(source, scale)


def _shifted_terms(
    source: torch.Tensor, height: int, width: int, taps: list[tuple[int, int, int]], out_length: int, scales, slot: str, layout
) -> list[tuple[int, torch.Tensor, torch.Tensor, tuple[int, int] | None]]:
    """(tap, source view, scale, output span) terms for out[p] = sum over taps of scale * source[p + offset].

    source (N, C, L) contiguous, `height` x `width` planes; taps (t, offset, column shift), |shift| <
    width. Taps that shift sideways read the stacked masked copies (whole output planes, span None);
    the centre column's taps read the source itself, restricted to the outputs whose reads stay inside.
    """
    length = source.shape[2]
    side, pad = layout  # from _side_layout
    if side:
        stack = _Stack(source, height, width, side, pad, slot)
    terms = []
    for t, offset, col_shift in taps:
        if col_shift:
            terms.append((t, stack.view(side.index(col_shift), offset, out_length), scales[t], None))
            continue
        start, stop = max(0, -offset), min(out_length, length - offset)
        if start < stop:
            span = None if (start, stop) == (0, out_length) else (start, stop)
            terms.append((t, _window(source, start + offset, stop - start), scales[t], span))
    return terms


def _flat_forward(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, spec: ConvSpec) -> torch.Tensor | None:
    """input (N, C, H, W) contiguous -> (N, C, H_out, W); None when the stack would not fit the workspace."""
    batch, channels, height, width = input.shape
    kernel = tuple(weight.shape[2:])
    out_height = spec.output_size(height, width, *kernel)[0]
    in_length, out_length = height * width, out_height * width
    taps = [(t, row_shift * width + col_shift, col_shift) for t, row_shift, col_shift in _flat_taps(spec, kernel, width)]
    layout = side, pad = _side_layout(taps, in_length, out_length)
    if not _fits_workspace(_stack_bytes(len(side), batch * channels, in_length, pad, input.element_size())):
        return None
    scales = weight.reshape(channels, -1, 1).unbind(1)  # (C, 1) per tap
    output = input.new_empty(batch, channels, out_height, width)
    flat = output.view(batch, channels, out_length)
    terms = _shifted_terms(input.view(batch, channels, in_length), height, width, taps, out_length, scales, "depthwise_input", layout)
    _accumulate(flat, terms)
    if bias is not None:
        # After the taps: torch.addcmul(bias, window, scale, out=...) with three broadcast operands
        # ran ~4x slower than a plain multiply (158 vs 36 us on dw 96x28 at batch 4).
        flat += bias.view(-1, 1)
    return output


# Backward problems whose kH*kW products of grad and input (and whose stack) fit in this many bytes take the
# one-view path (`_one_view_backward`: ~6 ops in all, where the op count is the cost); bigger ones
# the per-tap path, whose passes stay in cache and which needs no copy of the centre column. Measured
# (1 thread, CPU time): one view 0.63-0.67x the per-tap grad_weight on 96x28 at batch 1 (2.7 MB of
# products), 1.03-1.19x on 96x28 at batch 4, 144x56 and 32x112 (11-16 MB) even in 4 MiB chunks.
ONE_VIEW_MAX_BYTES = 4 << 20


def _flat_backward(grad_output, input, weight, spec, need_input, need_weight):
    """(grad_input, grad_weight) for the flat path, or None when its stack would not fit the workspace.

    grad_output (N, C, H_out, W) contiguous. Tap (i, j) moved input q to output q - o (o its flat
    offset), so grad_input[q] sums weight[i, j] * grad[q - o] and grad_weight[i, j] sums input[q] *
    grad[q - o]: the same reads of grad_output (masked for the shift -s where a read would wrap) serve both.
    """
    batch, channels, height, width = input.shape
    kernel_h, kernel_w = weight.shape[2:]
    (dil_h, dil_w), (top, _, left, _) = spec.dilation, spec.padding
    planes, out_length, in_length, element_size = batch * channels, grad_output.shape[2] * width, height * width, input.element_size()
    if kernel_h * kernel_w * planes * in_length * element_size <= ONE_VIEW_MAX_BYTES:
        offsets = [(i * dil_h - top) * width + j * dil_w - left for i in range(kernel_h) for j in range(kernel_w)]
        pad = _pad_for([-offset for offset in offsets], out_length, in_length)
        if _stack_bytes(kernel_w, planes, out_length, pad, element_size) <= ONE_VIEW_MAX_BYTES:
            return _one_view_backward(grad_output, input, weight, spec, need_input, need_weight, pad)
    taps = _flat_taps(spec, (kernel_h, kernel_w), width)
    flipped = [(t, -(row_shift * width + col_shift), -col_shift) for t, row_shift, col_shift in taps]
    layout = side, side_pad = _side_layout(flipped, out_length, in_length)
    if not _fits_workspace(_stack_bytes(len(side), planes, out_length, side_pad, element_size)):
        return None
    scales = weight.reshape(channels, -1, 1).unbind(1)
    flat_grad = grad_output.view(batch, channels, out_length)
    terms = _shifted_terms(flat_grad, grad_output.shape[2], width, flipped, in_length, scales, "depthwise_grad", layout)
    grad_input = grad_weight = None
    if need_input:
        grad_input = input.new_empty(input.shape)
        _accumulate(grad_input.view(batch, channels, in_length), terms)
    if need_weight:
        flat_input = input.view(batch, channels, in_length)
        # Per tap, per image partial sums into one buffer; one sum over the images at the end.
        partial = input.new_zeros(kernel_h * kernel_w, batch, channels)
        buffer = scratch("depthwise_products", flat_input.numel(), input)
        for t, read, _, span in terms:
            paired = flat_input if span is None else _window(flat_input, span[0], span[1] - span[0])
            products = buffer[: paired.numel()].view(paired.shape)  # contiguous: the sum reads long runs
            torch.mul(read, paired, out=products)
            torch.sum(products, dim=2, out=partial[t])
        grad_weight = partial.sum(dim=1).t().reshape(weight.shape)
    return grad_input, grad_weight


def _one_view_backward(grad_output, input, weight, spec, need_input, need_weight, pad):
    """The flat backward for small problems: one stack of grad_output with a block per kernel column.

    Block j is grad masked for the shift -s_j; tap (i, j)'s reads are block j at offset -o over whole
    input planes, and all taps' reads are one (kH, kW, N*C, L_in) strided view (rows in reverse: strides
    must be positive), so grad_weight is one multiply by the input and one sum.
    """
    batch, channels, height, width = input.shape
    kernel_h, kernel_w = kernel = tuple(weight.shape[2:])
    (dil_h, dil_w), (top, _, left, _) = spec.dilation, spec.padding
    out_length, in_length = grad_output.shape[2] * width, height * width
    shifts = tuple(left - j * dil_w for j in range(kernel_w))
    stack = _Stack(grad_output.view(batch, channels, out_length), grad_output.shape[2], width, shifts, pad, "depthwise_grad")
    base = stack.buffer.storage_offset() + pad + (top - (kernel_h - 1) * dil_h) * width + left  # (i = kH-1, j = 0, q = 0)
    planes = batch * channels
    # reads[kH-1-i, j, plane, q] = block j, plane, at q - o(i, j); a one-column kernel's block can be shorter than
    # the dilation, and as_strided refuses a negative stride even on a size-1 dimension
    column_stride = stack.block - dil_w if kernel_w > 1 else 0
    reads = stack.buffer.as_strided((kernel_h, kernel_w, planes, in_length), (dil_h * width, column_stride, stack.pitch, 1), base)
    grad_input = grad_weight = None
    if need_input:
        scales = weight.reshape(channels, -1, 1).unbind(1)
        terms = []
        for t, _, _ in _flat_taps(spec, kernel, width):
            i, j = divmod(t, kernel_w)
            terms.append((t, reads[kernel_h - 1 - i, j].view(batch, channels, in_length), scales[t], None))
        grad_input = input.new_empty(input.shape)
        _accumulate(grad_input.view(batch, channels, in_length), terms)
    if need_weight:
        products = scratch("depthwise_products", reads.numel(), input).view(reads.shape)
        torch.mul(reads, input.view(1, 1, planes, in_length), out=products)
        per_channel = products.sum(dim=3).view(kernel_h, kernel_w, batch, channels).sum(dim=2)  # (kH, kW, C), rows reversed
        grad_weight = per_channel.flip(0).permute(2, 0, 1).reshape(weight.shape)
    return grad_input, grad_weight


class Depthwise(ConvAlgorithm):
    name = "depthwise"
    # grad_weight multiplies whole input planes by masked reads. The forward stays exact without the check (the
    # masked copies select where a sum finds a NaN or an infinity), which would cost its compiled path ~25%.
    inexact_nonfinite = frozenset({"backward"})

    def support(self) -> Support:
        return Support(
            notes="depthwise only (C_in/groups == 1, any multiplier): one fused multiply-add per kernel tap over whole planes; "
            "on CPU, stride 1, once compiled for the problem's shapes: one loop nest over all taps (kernels/compiled.py)",
        )

    def check(self, input: torch.Tensor, weight: torch.Tensor, spec: ConvSpec) -> None:
        super().check(input, weight, spec)
        if weight.shape[1] != 1 or spec.groups != input.shape[1]:
            raise UnsupportedProblem(
                f"algorithm 'depthwise' needs groups == C_in (one input channel per group), got groups={spec.groups}, C_in={input.shape[1]}"
            )

    def loop_iterations(self, input, weight, spec):
        """One multiply-add per kernel tap and channel multiplier."""
        return weight.shape[0] // max(1, input.shape[1]) * weight.shape[2] * weight.shape[3]

    def forward(self, input, weight, bias, spec):
        """input (N, C, H, W), weight (C*m, 1, kH, kW) -> (N, C*m, H_out, W_out) in input's memory format."""
        if input.dtype in HALF:  # float32 inside, one rounding at the end (kernels/precision.py)
            return self.forward(*widened(input, weight, bias), spec).to(input.dtype)
        if depthwise_compiled.eligible(input, weight, spec):
            output = depthwise_compiled.forward(input, weight, bias, spec)
            if output is not None:
                return output
        if _flat_eligible(input, weight, spec):
            output = _flat_forward(input, weight, bias, spec)
            if output is not None:
                return output
        channels, multiplier = input.shape[1], weight.shape[0] // input.shape[1]
        kernel = tuple(weight.shape[2:])
        in_hw = tuple(input.shape[2:])
        out_hw = spec.output_size(*in_hw, *kernel)
        memory_format = torch.channels_last if strictly_channels_last(input) else torch.contiguous_format
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

    def forward_keeping(self, input, weight, bias, spec):
        """The compiled forward keeps its zero-padded input for grad_weight's tap sums, which would pad it again."""
        if input.dtype not in HALF and depthwise_compiled.eligible(input, weight, spec):
            result = depthwise_compiled.forward_keeping(input, weight, bias, spec)
            if result is not None:
                output, padded = result
                return output, (padded if keepable(padded.numel(), padded) else None)
        return self.forward(input, weight, bias, spec), None

    def backward(self, grad_output, input, weight, spec, need_input, need_weight):
        return self._backward(grad_output, input, weight, spec, need_input, need_weight, None)

    def backward_kept(self, kept, grad_output, input, weight, spec, need_input, need_weight):
        return self._backward(grad_output, input, weight, spec, need_input, need_weight, kept)

    def _backward(self, grad_output, input, weight, spec, need_input, need_weight, padded_input):
        """padded_input: the compiled forward's zero-padded input (`forward_keeping`), or None."""
        if input.dtype in HALF:
            grad_input, grad_weight = self.backward(*widened(grad_output, input, weight), spec, need_input, need_weight)
            return narrowed(grad_input, input.dtype), narrowed(grad_weight, weight.dtype)
        if depthwise_compiled.eligible(input, weight, spec):
            # the grad in the layout the compiled code reads: the input's (NCHW, or channels-last)
            grad = grad_output.contiguous(memory_format=torch.channels_last if strictly_channels_last(input) else torch.contiguous_format)
            grads = depthwise_compiled.backward(grad, input, weight, spec, need_input, need_weight, padded_input)
            if grads is not None:
                return grads
        if _flat_eligible(input, weight, spec):
            grads = _flat_backward(grad_output.contiguous(), input, weight, spec, need_input, need_weight)
            if grads is not None:
                return grads
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


register(Depthwise())
