"""Small problems with the fewest torch calls: F.unfold patches and one batched matmul, all NCHW.

For a conv of a few thousand multiply-adds (the seed's 2x1x3x3 case, a 1x8x16x16 layer) the time
is the number of torch calls and Python steps around them, not the arithmetic: `im2col` and
`depthwise` take 0.3-0.7 ms there against nn.Conv2d's 0.07 ms. Here the forward is three calls:
patches = unfold(input) (N, C_in*kH*kW, L), output = weight (G, C_out/G, K) @ patches (N, G, K, L),
plus bias. Backward: grad_weight = sum_n grad @ patches^T; grad_input = fold(weight^T @ grad), the
adjoint of unfold. The patch matrix is kH*kW times the input, so big problems are refused and left
to the algorithms that chunk it; `auto` only picks this one below SMALL_MACS (kernels/selection.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels import gemm
from kernels.base import ConvAlgorithm, Support, UnsupportedProblem, register
from kernels.limits import keepable
from kernels.params import ConvSpec
from kernels.precision import HALF, narrowed, widened

# The patch matrix for one call may not exceed this (float32: 16 Mi elements).
MAX_PATCH_BYTES = 64 << 20


def _symmetric(spec: ConvSpec) -> bool:
    top, bottom, left, right = spec.padding
    return top == bottom and left == right


def _patches(input: torch.Tensor, spec: ConvSpec, kernel: tuple[int, int]) -> torch.Tensor:
    """input (N, C, H, W) -> (N, C*kH*kW, H_out*W_out), rows ordered (C, kH, kW) like a weight row."""
    top, bottom, left, right = spec.padding
    if not _symmetric(spec):
        input = F.pad(input, (left, right, top, bottom))
        top = left = 0
    return F.unfold(input, kernel, dilation=spec.dilation, padding=(top, left), stride=spec.stride)


class Unfold(ConvAlgorithm):
    name = "unfold"

    def support(self) -> Support:
        return Support(
            notes="small problems: F.unfold patches and one batched matmul (fewest torch calls); refuses patch matrices over 64 MiB",
            limits={"patch_bytes": MAX_PATCH_BYTES},
        )

    def check(self, input: torch.Tensor, weight: torch.Tensor, spec: ConvSpec) -> None:
        super().check(input, weight, spec)
        out_height, out_width = spec.output_size(input.shape[2], input.shape[3], weight.shape[2], weight.shape[3])
        patch_bytes = input.shape[0] * input.shape[1] * weight.shape[2] * weight.shape[3] * out_height * out_width
        patch_bytes *= max(input.element_size(), 4)  # half precision runs in float32
        if patch_bytes > MAX_PATCH_BYTES:
            raise UnsupportedProblem(
                f"algorithm 'unfold' keeps the whole patch matrix ({patch_bytes >> 20} MiB, limit {MAX_PATCH_BYTES >> 20} MiB); use im2col"
            )

    def forward(self, input, weight, bias, spec):
        """input (N, C_in, H, W), weight (C_out, C_in/G, kH, kW) -> (N, C_out, H_out, W_out), NCHW."""
        return self._forward(input, weight, bias, spec)[0]

    def forward_keeping(self, input, weight, bias, spec):
        """The patches, for grad_weight (which would unfold the input again), where they fit the keep limit."""
        output, patches = self._forward(input, weight, bias, spec)
        keep = patches is not None and keepable(patches.numel(), patches)
        return output, (patches if keep else None)

    def _forward(self, input, weight, bias, spec):
        """(output, patches (N, G, K, L), or None for half precision)."""
        if input.dtype in HALF:  # float32 inside, one rounding at the end (kernels/precision.py)
            return self.forward(*widened(input, weight, bias), spec).to(input.dtype), None
        out_channels, _, kernel_h, kernel_w = weight.shape
        out_height, out_width = spec.output_size(input.shape[2], input.shape[3], kernel_h, kernel_w)
        groups, batch, depth = spec.groups, input.shape[0], weight[0].numel()  # depth K = C_in/G*kH*kW
        patches = _patches(input, spec, (kernel_h, kernel_w)).view(batch, groups, depth, out_height * out_width)
        if groups == 1:  # one GEMM per image, through oneDNN where it is faster (kernels/gemm.py)
            output = gemm.bmm(weight.reshape(out_channels, depth).expand(batch, -1, -1), patches[:, 0])
        else:
            output = torch.matmul(weight.reshape(groups, out_channels // groups, depth), patches)  # (N, G, C_out/G, L)
        output = output.view(batch, out_channels, out_height, out_width)
        if bias is not None:
            output = output + bias.view(-1, 1, 1)
        return output, patches

    def backward(self, grad_output, input, weight, spec, need_input, need_weight):
        return self._backward(grad_output, input, weight, spec, need_input, need_weight, None)

    def backward_kept(self, kept, grad_output, input, weight, spec, need_input, need_weight):
        return self._backward(grad_output, input, weight, spec, need_input, need_weight, kept)

    def _backward(self, grad_output, input, weight, spec, need_input, need_weight, patches):
        """patches: the forward's (`_forward`), or None."""
        if input.dtype in HALF:
            grad_input, grad_weight = self.backward(*widened(grad_output, input, weight), spec, need_input, need_weight)
            return narrowed(grad_input, input.dtype), narrowed(grad_weight, weight.dtype)
        out_channels, _, kernel_h, kernel_w = weight.shape
        groups, batch, depth = spec.groups, input.shape[0], weight[0].numel()
        length = grad_output.shape[2] * grad_output.shape[3]
        grad = grad_output.reshape(batch, groups, out_channels // groups, length)  # (N, G, C_out/G, L)
        weights = weight.reshape(groups, out_channels // groups, depth)  # (G, C_out/G, K)
        grad_weight = grad_input = None
        # With oneDNN's GEMMs (kernels/gemm.py; no batched form, no out=): one product per image, summed in place for
        # grad_weight, and the columns as grad^T @ W, whose row-major operand is the small grad, not the weight
        # transposed (at 256x14, batch 1, the weight's transposing copy took 0.86 ms and the batched form's copies
        # and sum another 0.97, of a 3.2 ms forward+backward).
        onednn = groups == 1 and batch > 0 and gemm.routes_to_onednn(input.dtype) and not torch.is_grad_enabled()
        if need_weight:
            if patches is None:
                patches = _patches(input, spec, (kernel_h, kernel_w)).view(batch, groups, depth, length)
            if onednn:
                products = gemm.products(grad[:, 0], patches[:, 0].transpose(1, 2))  # N x (C_out, K)
                grad_weight = products[0]
                for product in products[1:]:
                    grad_weight.add_(product)
                grad_weight = grad_weight.view(weight.shape)
            else:
                grad_weight = torch.matmul(grad, patches.transpose(2, 3)).sum(dim=0).view(weight.shape)
        if need_input:
            if onednn:
                rows = weight.reshape(out_channels, depth)
                columns = torch.stack([gemm.mm(grad[n, 0].t(), rows).t() for n in range(batch)])  # (N, K, L)
            else:
                columns = torch.matmul(weights.transpose(1, 2), grad)
            columns = columns.view(batch, groups * depth, length)  # (N, C_in*kH*kW, L)
            top, bottom, left, right = spec.padding
            height, width = input.shape[2:]
            if _symmetric(spec):
                grad_input = F.fold(columns, (height, width), (kernel_h, kernel_w), spec.dilation, (top, left), spec.stride)
            else:
                padded = (height + top + bottom, width + left + right)
                grad_input = F.fold(columns, padded, (kernel_h, kernel_w), spec.dilation, 0, spec.stride)
                grad_input = grad_input[:, :, top : top + height, left : left + width]
        return grad_input, grad_weight


register(Unfold())
