"""Stride-1 depthwise conv on the CPU as tap sums compiled into one loop nest per pass (kernels/compiled.py).

With xp the input zero-padded, g grad_output, w (C, kH, kW), d the dilation:
    output[n, c, y, x]   = bias[c] + sum_{i,j} w[c, i, j] * xp[n, c, y + i*dh, x + j*dw]
    grad_input           = the same sum over g zero-padded by (k-1)*d - padding, with w flipped
    grad_weight[c, i, j] = sum_{n,y,x} xp[n, c, y + i*dh, x + j*dw] * g[n, c, y, x]
Eagerly each tap is a pass over memory (kernels/depthwise.py); compiled, each line above reads its
operands once. The padding stays an eager copy: in the graph, Inductor turns it into masked vector
loads on every tap, which ran 4x slower (860 vs 208 us on dw 96x28 at batch 4).

Until a problem's functions are compiled (in the background, for its exact shapes), `forward` and
`backward` return None and the caller runs the eager path; they ask first (`compiled.ready`, with a meta
stand-in for each padded copy), so that a call which will not run compiled code makes no copy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels import compiled
from kernels.layout import strictly_channels_last
from kernels.limits import macs
from kernels.params import ConvSpec

# Below this, the eager flat path's ~10 ops cost about what a compiled call's guards and padding cost.
MIN_MACS = 1 << 18


def eligible(input: torch.Tensor, weight: torch.Tensor, spec: ConvSpec) -> bool:
    """`compiled.takes` the input (CPU, float32/64, NCHW or channels-last, grad off), stride 1, multiplier 1, padding within
    the kernel's reach. A channels-last input runs channels-last (NHWC padded copies and tap sums)."""
    batch, channels, height, width = input.shape
    kernel_h, kernel_w = weight.shape[2:]
    top, bottom, left, right = spec.padding
    reach_h, reach_w = spec.dilation[0] * (kernel_h - 1), spec.dilation[1] * (kernel_w - 1)
    return (
        compiled.takes(input, channels_last=True)
        and spec.stride == (1, 1)
        and weight.shape[0] == channels
        and max(top, bottom) <= reach_h
        and max(left, right) <= reach_w
        and height + top + bottom > reach_h
        and width + left + right > reach_w
        and macs(batch, channels, height + top + bottom - reach_h, width + left + right - reach_w, 1, kernel_h, kernel_w) >= MIN_MACS
    )


def forward(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, spec: ConvSpec) -> torch.Tensor | None:
    """input (N, C, H, W) contiguous or channels-last, weight (C, 1, kH, kW) -> (N, C, H_out, W_out) in the input's
    layout, or None (not compiled yet)."""
    result = forward_keeping(input, weight, bias, spec)
    return None if result is None else result[0]


def forward_keeping(input, weight, bias, spec: ConvSpec) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(`forward`'s output, the zero-padded input it read, which `backward` takes as `padded_input`) or None."""
    top, bottom, left, right = spec.padding
    nhwc = strictly_channels_last(input)
    taps = _taps(weight, nhwc)
    padded_like = _padded_like(input, top + bottom, left + right, nhwc)
    if not compiled.ready(_forward, padded_like, taps, bias, *spec.dilation, int(nhwc)):
        return None
    padded = _padded(input, (left, right, top, bottom), nhwc)
    output = compiled.run(_forward, padded, taps, bias, *spec.dilation, int(nhwc))
    return (output.permute(0, 3, 1, 2) if nhwc else output), padded


def backward(grad_output, input, weight, spec: ConvSpec, need_input: bool, need_weight: bool, padded_input=None):
    """(grad_input (N, C, H, W) or None, grad_weight (C, 1, kH, kW) or None), or None (not compiled yet).

    grad_output (N, C, H_out, W_out), in the input's layout (NCHW-contiguous or channels-last); grad_input in it too.
    padded_input: the forward's zero-padded copy of this input (`forward_keeping`), else padded again here.
    """
    top, bottom, left, right = spec.padding
    reach_h, reach_w = spec.dilation[0] * (weight.shape[2] - 1), spec.dilation[1] * (weight.shape[3] - 1)
    grad_pads = (reach_w - left, reach_w - right, reach_h - top, reach_h - bottom)
    nhwc = strictly_channels_last(input)
    taps = _taps(weight, nhwc)
    grad = grad_output.permute(0, 2, 3, 1) if nhwc else grad_output  # a contiguous view either way
    stand_ins = (
        _padded_like(grad_output, grad_pads[2] + grad_pads[3], grad_pads[0] + grad_pads[1], nhwc) if need_input else None,
        taps,
        _padded_like(input, top + bottom, left + right, nhwc) if need_weight else None,
    )
    if not compiled.ready(_backward, *stand_ins, grad, *spec.dilation, int(nhwc)):
        return None
    grads = compiled.run(
        _backward,
        _padded(grad_output, grad_pads, nhwc) if need_input else None,
        taps,
        (_padded(input, (left, right, top, bottom), nhwc) if padded_input is None else padded_input) if need_weight else None,
        grad,
        *spec.dilation,
        int(nhwc),
    )
    if grads is None:  # compiling was turned off in between
        return None
    grad_input, grad_weight = grads
    if nhwc and grad_input is not None:
        grad_input = grad_input.permute(0, 3, 1, 2)
    if nhwc and grad_weight is not None:
        grad_weight = grad_weight.t()
    return grad_input, None if grad_weight is None else grad_weight.reshape(weight.shape)


def _taps(weight: torch.Tensor, nhwc: bool) -> torch.Tensor:
    """weight (C, 1, kH, kW) -> (C, kH, kW), or (kH, kW, C) for a channels-last input (each tap's C values contiguous)."""
    taps = weight.view(weight.shape[0], *weight.shape[2:])
    return taps.permute(1, 2, 0).contiguous() if nhwc else taps.contiguous()


def _tap(taps: torch.Tensor, i: int, j: int, channels_last: int) -> torch.Tensor:
    """Tap (i, j) of `_taps`, shaped to broadcast over a window: (C,) for NHWC, (C, 1, 1) for NCHW."""
    return taps[i, j] if channels_last else taps[:, i, j].view(-1, 1, 1)


def _padded(tensor: torch.Tensor, pads: tuple[int, int, int, int], nhwc: bool) -> torch.Tensor:
    """The zero-padded copy (pads: left, right, top, bottom) of an (N, C, H, W) tensor: F.pad's (NCHW) or, for a
    channels-last one, (N, H + top + bottom, W + left + right, C) (a plain copy, no transpose)."""
    if not nhwc:
        return F.pad(tensor, pads)
    left, right, top, bottom = pads
    batch, channels, height, width = tensor.shape
    padded = tensor.new_zeros(batch, height + top + bottom, width + left + right, channels)
    padded[:, top : top + height, left : left + width] = tensor.permute(0, 2, 3, 1)
    return padded


def _padded_like(tensor: torch.Tensor, rows: int, columns: int, nhwc: bool) -> torch.Tensor:
    """A meta tensor shaped and strided as `_padded`'s copy of `tensor` with `rows` and `columns` more."""
    batch, channels, height, width = tensor.shape
    shape = (batch, height + rows, width + columns, channels) if nhwc else (batch, channels, height + rows, width + columns)
    return torch.empty(shape, dtype=tensor.dtype, device="meta")


def _window(source: torch.Tensor, i: int, j: int, rows: int, columns: int, channels_last: int) -> torch.Tensor:
    """The (rows, columns) window of source (N, C, H, W), or (N, H, W, C) for channels_last, at offset (i, j)."""
    height_dim = 1 if channels_last else 2
    return source.narrow(height_dim, i, rows).narrow(height_dim + 1, j, columns)


def _tap_sum(source: torch.Tensor, taps: torch.Tensor, dil_h: int, dil_w: int, channels_last: int) -> torch.Tensor:
    """source (N, C, Hs, Ws) (or (N, Hs, Ws, C)), `_taps` -> the sum of w * shifted source, (N, C, H_out,
    W_out) (or (N, H_out, W_out, C)), H_out = Hs - dil_h*(kH-1), W_out = Ws - dil_w*(kW-1).

    Channels-last is summed over NHWC tensors, so Inductor vectorises along the channels. The NCHW code compiled for
    channels-last strides ran 7x slower (dw 96x28, batch 4: 336 vs 47 us), and an NCHW copy each way cost ~0.16 ms of a
    0.24 ms forward; this way the forward takes 89 us (nn.Conv2d: 68; round 19).
    """
    kernel_h, kernel_w = taps.shape[:2] if channels_last else taps.shape[1:]
    height_dim = 1 if channels_last else 2
    out_h = source.shape[height_dim] - dil_h * (kernel_h - 1)
    out_w = source.shape[height_dim + 1] - dil_w * (kernel_w - 1)
    total = None
    for i in range(kernel_h):
        for j in range(kernel_w):
            term = _window(source, i * dil_h, j * dil_w, out_h, out_w, channels_last) * _tap(taps, i, j, channels_last)
            total = term if total is None else total + term
    return total


def _forward(padded_input, taps, bias, dil_h: int, dil_w: int, channels_last: int):
    output = _tap_sum(padded_input, taps, dil_h, dil_w, channels_last)
    return output if bias is None else output + (bias if channels_last else bias.view(-1, 1, 1))


def _backward(padded_grad, taps, padded_input, grad_output, dil_h: int, dil_w: int, channels_last: int):
    """grad_input in the layout of padded_grad; grad_weight (C, kH*kW), or (kH*kW, C) channels-last."""
    grad_input = grad_weight = None
    if padded_grad is not None:
        grad_input = _tap_sum(padded_grad, taps.flip(0, 1) if channels_last else taps.flip(1, 2), dil_h, dil_w, channels_last)
    if padded_input is not None:
        kernel_h, kernel_w = taps.shape[:2] if channels_last else taps.shape[1:]
        height_dim = 1 if channels_last else 2
        out_h, out_w = grad_output.shape[height_dim : height_dim + 2]
        spatial = (0, height_dim, height_dim + 1)
        sums = [
            (_window(padded_input, i * dil_h, j * dil_w, out_h, out_w, channels_last) * grad_output).sum(dim=spatial)
            for i in range(kernel_h)
            for j in range(kernel_w)
        ]
        grad_weight = torch.stack(sums, dim=0 if channels_last else 1)
    return grad_input, grad_weight
