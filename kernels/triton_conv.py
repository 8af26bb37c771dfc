"""The "triton" algorithm: implicit-GEMM forward, stride-phase grad_input, split-K grad_weight.

Kernels live in kernels/triton_fwd.py, triton_grad_input.py, triton_grad_weight.py (implicit GEMMs on
tl.dot) and triton_depthwise.py (one input channel per group: no GEMM left, direct FMA kernels); this
file arranges tensors for them and picks which runs.

Layout: every kernel reads activations channels-last (NHWC), so the channel (reduction) dimension
of each tile load is contiguous and coalesced; an NCHW input pays one conversion copy here rather
than strided gathers inside every K step. Weights are re-laid out once per call (small) as the
GEMM's K-major operand.

Dtypes: float32, float16, bfloat16 with float32 accumulation, results cast at the end. float32
uses IEEE products unless TF32 is allowed (see `_dot_precision`). float64 is not offered: tl.dot
has no float64 path on NVIDIA tensor cores, so "auto" falls back to im2col for it.
"""

from __future__ import annotations

import contextlib

import torch

from kernels.base import ConvAlgorithm, Support, UnsupportedProblem, register
from kernels.function import prefers_channels_last
from kernels.params import ConvSpec
from kernels.triton_depthwise import depthwise_forward, depthwise_grad_input, depthwise_grad_weight
from kernels.triton_fwd import conv_forward
from kernels.triton_grad_input import conv_grad_input
from kernels.triton_grad_weight import conv_grad_weight
from kernels.triton_tuning import interpreting

# Below one 16-wide K tile of channels per group, walk K as a flattened (tap, channel) axis instead
# of tap by tap: the C_in=3 stem would otherwise waste 13/16 of every tl.dot.
_FLAT_BELOW = 16
_INT32_MAX = 2**31 - 1


def _dot_precision(dtype: torch.dtype, device: torch.device) -> str:
    """tl.dot input_precision for this call, read now because the service sets the flags per request.

    TF32 only when both torch flags allow it: cudnn.allow_tf32 is what nn.Conv2d obeys and
    matmul.allow_tf32 is what our im2col (torch.mm) obeys, so with torch's defaults (matmul off)
    float32 stays IEEE and within the float32 tolerance of kernels/tolerances.py. 16-bit inputs
    ignore the setting (products are exact in the fp32 accumulator).
    """
    if dtype != torch.float32:
        return "tf32"
    tf32 = device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    return "tf32" if tf32 else "ieee"


def _nhwc(tensor: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, H, W, C) view of channels-last memory (copies only if not channels-last already)."""
    return tensor.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)


def _on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device: make it the tensors' device."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _is_depthwise(weight: torch.Tensor, groups: int) -> bool:
    """One input channel per group: handled by the direct kernels of kernels/triton_depthwise.py."""
    return groups > 1 and weight.shape[1] == 1


def _weight_taps(weight: torch.Tensor) -> torch.Tensor:
    """Depthwise weight (C_out, 1, kH, kW) -> (kH*kW, C_out) contiguous: channel loads coalesce."""
    return weight.reshape(weight.shape[0], -1).t().contiguous()


def _grouped(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """weight (C_out, C_in/g, kH, kW) -> view (g, C_out/g, C_in/g, kH, kW)."""
    out_channels, in_per_group, kernel_h, kernel_w = weight.shape
    return weight.reshape(groups, out_channels // groups, in_per_group, kernel_h, kernel_w)


class TritonConv(ConvAlgorithm):
    name = "triton"

    def support(self) -> Support:
        # CPU only through Triton's interpreter (TRITON_INTERPRET=1): how CI runs these kernels.
        devices = ("cuda", "cpu") if interpreting() else ("cuda",)
        return Support(
            devices=devices,
            dtypes=("float32", "float16", "bfloat16"),
            double_backward=False,
            notes=(
                "implicit-GEMM Triton kernels (tl.dot, fp32 accumulation), channels-last; grad_input per stride phase, "
                "grad_weight split-K with a fixed-order reduction; depthwise as direct kernels; "
                "float64 unsupported (tl.dot has no float64 tensor-core path): auto uses im2col for it"
            ),
        )

    def check(self, input: torch.Tensor, weight: torch.Tensor, spec: ConvSpec) -> None:
        super().check(input, weight, spec)
        if input.device.type == "cpu" and input.dtype == torch.bfloat16:
            raise UnsupportedProblem(
                "algorithm 'triton' on cpu (Triton interpreter) does not support bfloat16: numpy has no bfloat16 matmul"
            )
        if weight.shape[1] == 0 or input.shape[1] == 0:
            raise UnsupportedProblem("algorithm 'triton' needs at least one input channel per group")
        out_height, out_width = spec.output_size(input.shape[2], input.shape[3], weight.shape[2], weight.shape[3])
        per_image = max(input[0].numel() if input.shape[0] else 0, weight.shape[0] * out_height * out_width)
        rows = input.shape[0] * out_height * out_width
        if per_image > _INT32_MAX or rows > _INT32_MAX:
            raise UnsupportedProblem(
                f"algorithm 'triton' indexes one image and the pixel count with int32: per-image elements {per_image:,} and "
                f"N*H_out*W_out {rows:,} must be at most {_INT32_MAX:,}"
            )

    def loop_iterations(self, input, weight, spec):
        """grad_input launches one kernel per stride phase that holds input pixels (counted on the padded
        size: a non-zero padding mode hands the algorithm the padded input)."""
        top, bottom, left, right = spec.padding
        return min(spec.stride[0], input.shape[2] + top + bottom) * min(spec.stride[1], input.shape[3] + left + right)

    def forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, spec: ConvSpec) -> torch.Tensor:
        with _on_device(input.device):
            return self._forward(input, weight, bias, spec)

    def backward(self, grad_output, input, weight, spec, need_input, need_weight):
        with _on_device(input.device):
            return self._backward(grad_output, input, weight, spec, need_input, need_weight)

    def _forward(self, input, weight, bias, spec):
        out_channels, in_per_group, kernel_h, kernel_w = weight.shape
        out_height, out_width = spec.output_size(input.shape[2], input.shape[3], kernel_h, kernel_w)
        output = input.new_empty(input.shape[0], out_height, out_width, out_channels)
        if output.numel() and _is_depthwise(weight, spec.groups):
            bias = bias.contiguous() if bias is not None else None
            depthwise_forward(_nhwc(input), _weight_taps(weight), bias, output, spec, (kernel_h, kernel_w))
        elif output.numel():
            # (g, C_out/g, kH*kW*C_in/g): the GEMM's K ordered (kh, kw, c) and contiguous (a channels-last weight).
            weight_matrix = _grouped(weight, spec.groups).permute(0, 1, 3, 4, 2).contiguous()
            weight_matrix = weight_matrix.view(spec.groups, out_channels // spec.groups, -1)
            bias = bias.contiguous() if bias is not None else None
            precision = _dot_precision(input.dtype, input.device)
            conv_forward(_nhwc(input), weight_matrix, bias, output, spec, (kernel_h, kernel_w), in_per_group < _FLAT_BELOW, precision)
        return output.permute(0, 3, 1, 2)

    def _backward(self, grad_output, input, weight, spec, need_input, need_weight):
        out_channels, in_per_group, kernel_h, kernel_w = weight.shape
        groups = spec.groups
        precision = _dot_precision(input.dtype, input.device)
        grad_output_nhwc = _nhwc(grad_output)
        grad_input = grad_weight = None
        if need_input:
            grad_input = input.new_empty(input.shape[0], input.shape[2], input.shape[3], input.shape[1])
            if grad_input.numel() and _is_depthwise(weight, groups):
                depthwise_grad_input(grad_output_nhwc, _weight_taps(weight), grad_input, spec, (kernel_h, kernel_w))
            elif grad_input.numel():
                # (g, C_in/g, kH, kW, C_out/g): K ordered (tap, o) and contiguous.
                weight_t = _grouped(weight, groups).permute(0, 2, 3, 4, 1).contiguous()
                flat = out_channels // groups < _FLAT_BELOW
                conv_grad_input(grad_output_nhwc, weight_t, grad_input, spec, flat, precision)
            grad_input = grad_input.permute(0, 3, 1, 2)
        if need_weight:
            # grad_weight in the weight's own layout, as cuDNN gives it (and autograd would copy it into).
            channels_last = prefers_channels_last(weight)
            if grad_output.numel() and _is_depthwise(weight, groups):
                grad_weight = depthwise_grad_weight(_nhwc(input), grad_output_nhwc, spec, weight.shape, weight.dtype, channels_last)
            elif grad_output.numel():
                flat = in_per_group < _FLAT_BELOW
                grad_weight = conv_grad_weight(
                    _nhwc(input), grad_output_nhwc, spec, weight.shape, weight.dtype, flat, precision, channels_last
                )
            else:
                grad_weight = torch.zeros_like(weight)
        return grad_input, grad_weight


register(TritonConv())
