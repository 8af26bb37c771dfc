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
from kernels.limits import macs
from kernels.params import ConvSpec

# Below this, the eager flat path's ~10 ops cost about what a compiled call's guards and padding cost.
MIN_MACS = 1 << 18


def eligible(input: torch.Tensor, weight: torch.Tensor, spec: ConvSpec) -> bool:
    """`compiled.takes` the input (CPU, float32/64, NCHW or channels-last, grad off), stride 1, multiplier 1, padding within
    the kernel's reach. A channels-last input runs channels-last (`_forward_nhwc`, `_backward_nhwc`)."""
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
    top, bottom, left, right = spec.padding
    if _channels_last(input):
        taps = weight.view(weight.shape[0], *weight.shape[2:]).permute(1, 2, 0).contiguous()  # (kH, kW, C)
        padded_like = _padded_like(input, top + bottom, left + right).permute(0, 2, 3, 1).contiguous()
        if not compiled.ready(_forward_nhwc, padded_like, taps, bias, *spec.dilation):
            return None
        output = compiled.run(_forward_nhwc, _padded_nhwc(input, (left, right, top, bottom)), taps, bias, *spec.dilation)
        return output.permute(0, 3, 1, 2)
    taps = weight.view(weight.shape[0], *weight.shape[2:]).contiguous()
    if not compiled.ready(_forward, _padded_like(input, top + bottom, left + right), taps, bias, *spec.dilation):
        return None
    return compiled.run(_forward, _padded(input, (left, right, top, bottom)), taps, bias, *spec.dilation)


def backward(grad_output, input, weight, spec: ConvSpec, need_input: bool, need_weight: bool):
    """(grad_input (N, C, H, W) or None, grad_weight (C, 1, kH, kW) or None), or None (not compiled yet).

    grad_output (N, C, H_out, W_out), in the input's layout (NCHW-contiguous or channels-last).
    """
    top, bottom, left, right = spec.padding
    reach_h, reach_w = spec.dilation[0] * (weight.shape[2] - 1), spec.dilation[1] * (weight.shape[3] - 1)
    grad_pads = (reach_w - left, reach_w - right, reach_h - top, reach_h - bottom)
    if _channels_last(input):
        return _backward_channels_last(grad_output, input, weight, spec, need_input, need_weight, grad_pads)
    taps = weight.view(weight.shape[0], *weight.shape[2:]).contiguous()
    stand_ins = (
        _padded_like(grad_output, grad_pads[2] + grad_pads[3], grad_pads[0] + grad_pads[1]) if need_input else None,
        taps,
        _padded_like(input, top + bottom, left + right) if need_weight else None,
    )
    if not compiled.ready(_backward, *stand_ins, grad_output, *spec.dilation):
        return None
    grads = compiled.run(
        _backward,
        _padded(grad_output, grad_pads) if need_input else None,
        taps,
        _padded(input, (left, right, top, bottom)) if need_weight else None,
        grad_output,
        *spec.dilation,
    )
    if grads is None:  # compiling was turned off in between
        return None
    grad_input, grad_weight = grads
    return grad_input, None if grad_weight is None else grad_weight.view(weight.shape)


def _backward_channels_last(grad_output, input, weight, spec: ConvSpec, need_input: bool, need_weight: bool, grad_pads):
    """`backward` for a channels-last input, channels-last throughout (`_backward_nhwc`); grad_input channels-last."""
    top, bottom, left, right = spec.padding
    taps = weight.view(weight.shape[0], *weight.shape[2:]).permute(1, 2, 0).contiguous()  # (kH, kW, C)
    grad = grad_output.permute(0, 2, 3, 1)  # (N, H_out, W_out, C): a contiguous view for a channels-last grad
    stand_ins = (
        _padded_like(grad_output, grad_pads[2] + grad_pads[3], grad_pads[0] + grad_pads[1]).permute(0, 2, 3, 1).contiguous()
        if need_input
        else None,
        taps,
        _padded_like(input, top + bottom, left + right).permute(0, 2, 3, 1).contiguous() if need_weight else None,
        grad,
    )
    if not compiled.ready(_backward_nhwc, *stand_ins, *spec.dilation):
        return None
    grads = compiled.run(
        _backward_nhwc,
        _padded_nhwc(grad_output, grad_pads) if need_input else None,
        taps,
        _padded_nhwc(input, (left, right, top, bottom)) if need_weight else None,
        grad,
        *spec.dilation,
    )
    if grads is None:  # compiling was turned off in between
        return None
    grad_input, grad_weight = grads
    grad_input = None if grad_input is None else grad_input.permute(0, 3, 1, 2)
    return grad_input, None if grad_weight is None else grad_weight.t().reshape(weight.shape)


def _channels_last(tensor: torch.Tensor) -> bool:
    return not tensor.is_contiguous() and tensor.is_contiguous(memory_format=torch.channels_last)


def _padded_nhwc(tensor: torch.Tensor, pads: tuple[int, int, int, int]) -> torch.Tensor:
    """The zero-padded (N, H + top + bottom, W + left + right, C) copy (pads: left, right, top, bottom) of an (N, C, H, W)
    tensor: from a channels-last one a plain copy."""
    left, right, top, bottom = pads
    batch, channels, height, width = tensor.shape
    padded = tensor.new_zeros(batch, height + top + bottom, width + left + right, channels)
    padded[:, top : top + height, left : left + width] = tensor.permute(0, 2, 3, 1)
    return padded


def _padded(tensor: torch.Tensor, pads: tuple[int, int, int, int]) -> torch.Tensor:
    """F.pad's zero-padded copy (pads: left, right, top, bottom), NCHW-contiguous whatever the tensor's layout.

    Channels-last tensors get one transposing copy into a zeroed NCHW buffer (`forward` and `backward` take
    channels-last inputs channels-last instead: `_forward_nhwc`).
    """
    left, right, top, bottom = pads
    if tensor.is_contiguous():
        return F.pad(tensor, pads)
    batch, channels, height, width = tensor.shape
    padded = tensor.new_zeros(batch, channels, height + top + bottom, width + left + right)
    padded[:, :, top : top + height, left : left + width] = tensor
    return padded


def _padded_like(tensor: torch.Tensor, rows: int, columns: int) -> torch.Tensor:
    """A meta tensor shaped (and, contiguous, strided) as F.pad's copy of `tensor` with `rows` and `columns` more."""
    batch, channels, height, width = tensor.shape
    return torch.empty(batch, channels, height + rows, width + columns, dtype=tensor.dtype, device="meta")


def _tap_sum(source: torch.Tensor, taps: torch.Tensor, dil_h: int, dil_w: int) -> torch.Tensor:
    """source (N, C, Hs, Ws), taps (C, kH, kW) -> (N, C, Hs - dil_h*(kH-1), Ws - dil_w*(kW-1)): sum of w * shifted source."""
    kernel_h, kernel_w = taps.shape[1:]
    out_h, out_w = source.shape[2] - dil_h * (kernel_h - 1), source.shape[3] - dil_w * (kernel_w - 1)
    total = None
    for i in range(kernel_h):
        for j in range(kernel_w):
            window = source[:, :, i * dil_h : i * dil_h + out_h, j * dil_w : j * dil_w + out_w]
            term = window * taps[:, i, j].view(1, -1, 1, 1)
            total = term if total is None else total + term
    return total


def _forward(padded_input, taps, bias, dil_h: int, dil_w: int):
    output = _tap_sum(padded_input, taps, dil_h, dil_w)
    return output if bias is None else output + bias.view(1, -1, 1, 1)


def _backward(padded_grad, taps, padded_input, grad_output, dil_h: int, dil_w: int):
    grad_input = grad_weight = None
    if padded_grad is not None:
        grad_input = _tap_sum(padded_grad, taps.flip(1, 2), dil_h, dil_w)
    if padded_input is not None:
        kernel_h, kernel_w = taps.shape[1:]
        out_h, out_w = grad_output.shape[2:]
        sums = [
            (padded_input[:, :, i * dil_h : i * dil_h + out_h, j * dil_w : j * dil_w + out_w] * grad_output).sum(dim=(0, 2, 3))
            for i in range(kernel_h)
            for j in range(kernel_w)
        ]
        grad_weight = torch.stack(sums, dim=1)  # (C, kH*kW)
    return grad_input, grad_weight


def _tap_sum_nhwc(source: torch.Tensor, taps: torch.Tensor, dil_h: int, dil_w: int) -> torch.Tensor:
    """`_tap_sum` channels-last: source (N, Hs, Ws, C), taps (kH, kW, C) -> (N, H_out, W_out, C).

    Written over NHWC tensors, so Inductor vectorises along the channels. The NCHW code compiled for channels-last
    strides ran 7x slower (dw 96x28, batch 4: 336 vs 47 us), and an NCHW copy each way cost ~0.16 ms of a 0.24 ms
    forward; this way the forward takes 89 us (nn.Conv2d: 68; round 19).
    """
    kernel_h, kernel_w = taps.shape[:2]
    out_h, out_w = source.shape[1] - dil_h * (kernel_h - 1), source.shape[2] - dil_w * (kernel_w - 1)
    total = None
    for i in range(kernel_h):
        for j in range(kernel_w):
            term = source[:, i * dil_h : i * dil_h + out_h, j * dil_w : j * dil_w + out_w] * taps[i, j]
            total = term if total is None else total + term
    return total


def _forward_nhwc(padded_input, taps, bias, dil_h: int, dil_w: int):
    output = _tap_sum_nhwc(padded_input, taps, dil_h, dil_w)
    return output if bias is None else output + bias


def _backward_nhwc(padded_grad, taps, padded_input, grad, dil_h: int, dil_w: int):
    """`_backward` channels-last: grad (N, H_out, W_out, C); grad_input (N, H, W, C), grad_weight (kH*kW, C)."""
    grad_input = grad_weight = None
    if padded_grad is not None:
        grad_input = _tap_sum_nhwc(padded_grad, taps.flip(0, 1), dil_h, dil_w)
    if padded_input is not None:
        kernel_h, kernel_w = taps.shape[:2]
        out_h, out_w = grad.shape[1:3]
        sums = [
            (padded_input[:, i * dil_h : i * dil_h + out_h, j * dil_w : j * dil_w + out_w] * grad).sum(dim=(0, 1, 2))
            for i in range(kernel_h)
            for j in range(kernel_w)
        ]
        grad_weight = torch.stack(sums)  # (kH*kW, C)
    return grad_input, grad_weight
