"""The seed notebook's loop algorithm, kept readable as ground truth, extended to groups.

Same definition as the notebook: out[n, o, y, x] = sum_{c, i, j} in_pad[n, c, y*sh + i*dh, x*sw + j*dw]
* weight[o, c, i, j]. The notebook looped over every output element in Python (seconds for a 16x16
image); here the loops are over groups and kernel taps, and each tap's sum over batch, channels and
positions is one einsum. It accumulates in float64 whatever the dtype, then casts back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.base import ConvAlgorithm, Support, WorkTooLarge, register
from kernels.limits import get_limits, macs
from kernels.params import ConvSpec

_EXACT = torch.float64


def _window(padded: torch.Tensor, spec: ConvSpec, i: int, j: int, out_height: int, out_width: int) -> torch.Tensor:
    """The (N, C, H_out, W_out) slice of a padded input that kernel tap (i, j) multiplies."""
    (stride_h, stride_w), (dil_h, dil_w) = spec.stride, spec.dilation
    row, col = i * dil_h, j * dil_w
    return padded[:, :, row : row + stride_h * (out_height - 1) + 1 : stride_h, col : col + stride_w * (out_width - 1) + 1 : stride_w]


class Reference(ConvAlgorithm):
    name = "reference"

    def support(self) -> Support:
        return Support(
            notes="ground truth: loops over groups and kernel taps, float64 accumulation",
            limits={"max_macs": get_limits().reference_max_macs},
        )

    def check(self, input: torch.Tensor, weight: torch.Tensor, spec: ConvSpec) -> None:
        super().check(input, weight, spec)
        out_height, out_width = spec.output_size(input.shape[2], input.shape[3], weight.shape[2], weight.shape[3])
        work = macs(input.shape[0], weight.shape[0], out_height, out_width, *weight.shape[1:])
        limit = get_limits().reference_max_macs
        if work > limit:
            raise WorkTooLarge(f"algorithm 'reference' refuses {work:,} MACs (limit {limit:,}); use 'im2col' or 'auto'")

    def loop_iterations(self, input, weight, spec):
        """One einsum per group and kernel tap."""
        return spec.groups * weight.shape[2] * weight.shape[3]

    def forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, spec: ConvSpec) -> torch.Tensor:
        top, bottom, left, right = spec.padding
        padded = F.pad(input.to(_EXACT), (left, right, top, bottom))
        weight64 = weight.to(_EXACT)
        out_channels, in_per_group, kernel_height, kernel_width = weight.shape
        out_height, out_width = spec.output_size(input.shape[2], input.shape[3], kernel_height, kernel_width)
        out_per_group = out_channels // spec.groups
        output = padded.new_zeros(input.shape[0], out_channels, out_height, out_width)
        for g in range(spec.groups):
            ins, outs = slice(g * in_per_group, (g + 1) * in_per_group), slice(g * out_per_group, (g + 1) * out_per_group)
            for i in range(kernel_height):
                for j in range(kernel_width):
                    window = _window(padded[:, ins], spec, i, j, out_height, out_width)
                    output[:, outs] += torch.einsum("nchw,oc->nohw", window, weight64[outs, :, i, j])
        if bias is not None:
            output += bias.to(_EXACT).view(1, -1, 1, 1)
        return output.to(input.dtype)

    def backward(self, grad_output, input, weight, spec, need_input, need_weight):
        top, bottom, left, right = spec.padding
        padded = F.pad(input.to(_EXACT), (left, right, top, bottom))
        weight64, grad64 = weight.to(_EXACT), grad_output.to(_EXACT)
        out_channels, in_per_group, kernel_height, kernel_width = weight.shape
        out_height, out_width = grad_output.shape[2:]
        out_per_group = out_channels // spec.groups
        grad_padded = torch.zeros_like(padded)
        grad_weight = torch.zeros_like(weight64)
        for g in range(spec.groups):
            ins, outs = slice(g * in_per_group, (g + 1) * in_per_group), slice(g * out_per_group, (g + 1) * out_per_group)
            for i in range(kernel_height):
                for j in range(kernel_width):
                    if need_weight:
                        window = _window(padded[:, ins], spec, i, j, out_height, out_width)
                        grad_weight[outs, :, i, j] = torch.einsum("nohw,nchw->oc", grad64[:, outs], window)
                    if need_input:
                        grad_window = _window(grad_padded[:, ins], spec, i, j, out_height, out_width)
                        grad_window += torch.einsum("nohw,oc->nchw", grad64[:, outs], weight64[outs, :, i, j])
        grad_input = grad_padded[:, :, top : top + input.shape[2], left : left + input.shape[3]].to(input.dtype) if need_input else None
        return grad_input, grad_weight.to(weight.dtype) if need_weight else None


register(Reference())
