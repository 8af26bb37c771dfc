"""Pointwise (1x1, unpadded) conv as plain GEMMs in the input's own layout: no patch, no layout copy.

A 1x1 conv is a matrix product over channels at every pixel. For an NCHW-contiguous input each
image is already a (C_in, H*W) matrix, so out[n] = W (C_out, C_in) @ x[n] writes NCHW directly;
for channels_last input the whole batch is one (N*H*W, C_in) matrix and out = x @ W^T is
channels_last. Either way the result already has the memory format nn.Conv2d would return, so the
caller's format conversion is free. Backward is the same two GEMMs transposed. Stride subsamples
the input first (a copy of only the pixels used). Groups are column / row blocks of the same GEMMs.
"""

from __future__ import annotations

import torch

from kernels import gemm
from kernels.base import ConvAlgorithm, Support, UnsupportedProblem, register
from kernels.layout import strictly_channels_last
from kernels.params import ConvSpec
from kernels.precision import HALF, narrowed, widened


def _subsampled(input: torch.Tensor, spec: ConvSpec) -> torch.Tensor:
    """input (N, C, H, W) -> the pixels a 1x1 kernel with this stride reads, (N, C, H_out, W_out)."""
    stride_h, stride_w = spec.stride
    return input if (stride_h, stride_w) == (1, 1) else input[:, :, ::stride_h, ::stride_w]


def _sum_over_images(grad: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """sum_n grad[n] @ images[n]^T: (N, C_out, L), (N, C_in, L) -> (C_out, C_in), in one addbmm.

    addbmm sums the per-image products without an (N, C_out, C_in) intermediate; measured against an
    addmm_ per image (2 threads): a tie at batch 1-8, 1.25x faster at 32 images, 1.9x at 256. Where the
    GEMMs go through oneDNN (kernels/gemm.py), which has no batched form, it is one GEMM per image and a sum.
    """
    if grad.shape[0] and gemm.onednn_takes(grad[0], images[0].t()):
        return torch.stack([gemm.mm(grad[n], images[n].t()) for n in range(grad.shape[0])]).sum(dim=0)
    return torch.addbmm(grad.new_zeros(grad.shape[1], images.shape[1]), grad, images.transpose(1, 2))


def _blocks(groups: int, size: int) -> list[slice]:
    width = size // groups
    return [slice(g * width, (g + 1) * width) for g in range(groups)]


class Pointwise(ConvAlgorithm):
    name = "pointwise"

    def support(self) -> Support:
        return Support(
            notes="1x1 kernels without padding only: GEMMs in the input's layout (NCHW per image, or NHWC rows)",
        )

    def check(self, input: torch.Tensor, weight: torch.Tensor, spec: ConvSpec) -> None:
        super().check(input, weight, spec)
        if weight.shape[2:] != (1, 1) or any(spec.padding):
            raise UnsupportedProblem(
                f"algorithm 'pointwise' needs a 1x1 kernel and no padding, got kernel {tuple(weight.shape[2:])}, padding {spec.padding}"
            )

    def loop_iterations(self, input, weight, spec):
        """A GEMM (or one batched over the images) per group."""
        return spec.groups

    def forward(self, input, weight, bias, spec):
        if input.dtype in HALF:  # float32 inside, one rounding at the end (kernels/precision.py)
            return self.forward(*widened(input, weight, bias), spec).to(input.dtype)
        pixels = _subsampled(input, spec)
        batch, _, out_height, out_width = pixels.shape
        matrix = weight.reshape(weight.shape[0], weight.shape[1])  # (C_out, C_in/g)
        ins, outs = _blocks(spec.groups, input.shape[1]), _blocks(spec.groups, weight.shape[0])
        if strictly_channels_last(pixels):
            rows = pixels.permute(0, 2, 3, 1).reshape(-1, input.shape[1])  # (N*H_out*W_out, C_in)
            blocks = [self._mm(rows[:, i], matrix[o].t(), None if bias is None else bias[o]) for i, o in zip(ins, outs)]
            output = blocks[0] if spec.groups == 1 else torch.cat(blocks, dim=1)
            return output.view(batch, out_height, out_width, weight.shape[0]).permute(0, 3, 1, 2)
        images = pixels.reshape(batch, input.shape[1], out_height * out_width)  # (N, C_in, L): a view when contiguous
        column = None if bias is None else bias.view(-1, 1)
        # bmm against the expanded (stride-0) weight: torch.matmul would copy the batch into one matrix.
        blocks = [gemm.bmm(matrix[o].expand(batch, -1, -1), images[:, i]) for i, o in zip(ins, outs)]
        output = blocks[0] if spec.groups == 1 else torch.cat(blocks, dim=1)
        if column is not None:
            output = output + column if torch.is_grad_enabled() else output.add_(column)
        return output.view(batch, weight.shape[0], out_height, out_width)

    @staticmethod
    def _mm(rows: torch.Tensor, matrix: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return gemm.mm(rows, matrix, bias=bias)

    def backward(self, grad_output, input, weight, spec, need_input, need_weight):
        if input.dtype in HALF:
            grad_input, grad_weight = self.backward(*widened(grad_output, input, weight), spec, need_input, need_weight)
            return narrowed(grad_input, input.dtype), narrowed(grad_weight, weight.dtype)
        pixels = _subsampled(input, spec)
        batch, in_channels, out_height, out_width = pixels.shape
        out_channels = weight.shape[0]
        matrix = weight.reshape(out_channels, weight.shape[1])
        ins, outs = _blocks(spec.groups, in_channels), _blocks(spec.groups, out_channels)
        if strictly_channels_last(grad_output) or strictly_channels_last(pixels):
            grad = grad_output.permute(0, 2, 3, 1).reshape(-1, out_channels)  # (N*L, C_out)
            rows = pixels.permute(0, 2, 3, 1).reshape(-1, in_channels)
            grad_weight = [gemm.mm(grad[:, o].t(), rows[:, i]) for i, o in zip(ins, outs)] if need_weight else None
            grad_pixels = None
            if need_input:
                blocks = [gemm.mm(grad[:, o], matrix[o]) for o in outs]
                grad_rows = blocks[0] if spec.groups == 1 else torch.cat(blocks, dim=1)
                grad_pixels = grad_rows.view(batch, out_height, out_width, in_channels).permute(0, 3, 1, 2)
        else:
            grad = grad_output.reshape(batch, out_channels, out_height * out_width)  # (N, C_out, L)
            images = pixels.reshape(batch, in_channels, out_height * out_width)
            grad_weight = [_sum_over_images(grad[:, o], images[:, i]) for i, o in zip(ins, outs)] if need_weight else None
            grad_pixels = None
            if need_input:
                blocks = [gemm.bmm(matrix[o].t().contiguous().expand(batch, -1, -1), grad[:, o]) for o in outs]
                grad_pixels = (blocks[0] if spec.groups == 1 else torch.cat(blocks, dim=1)).view(batch, in_channels, out_height, out_width)
        if grad_weight is not None:
            grad_weight = torch.cat(grad_weight, dim=0).view(weight.shape)
        return self._unsubsample(grad_pixels, input, spec), grad_weight

    @staticmethod
    def _unsubsample(grad_pixels: torch.Tensor | None, input: torch.Tensor, spec: ConvSpec) -> torch.Tensor | None:
        """Scatter the subsampled pixels' gradient back to (N, C, H, W); pixels the stride skips get zero."""
        if grad_pixels is None or spec.stride == (1, 1):
            return grad_pixels
        stride_h, stride_w = spec.stride
        # Slice assignment into fresh zeros is recorded by autograd (CopySlices), so double backward works.
        grad_input = grad_pixels.new_zeros(input.shape)
        grad_input[:, :, ::stride_h, ::stride_w] = grad_pixels
        return grad_input


register(Pointwise())
