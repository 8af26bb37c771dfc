"""Our conv as two torch.library custom ops, which is what `kernels.conv2d` calls under torch.compile and torch.export.

Dynamo cannot trace `Conv2dFunction` (its per-call planning reads the thread count, the memo caches,
the custom jvp), so outside compilation nothing changes, and while compiling `kernels.conv2d` validates
its arguments in Python as ever and then calls `torch.ops.convservice.conv2d`. To the compiler the op
is opaque: a fake implementation gives the output's shape and strides for tracing, Inductor calls the
real one as an extern kernel at run time, and its autograd formula calls the second op,
`convservice.conv2d_backward`, for the gradients. A model then compiles whole (fullgraph=True) and
exports as one graph. Both ops run the same algorithms as the eager path (`_forward`, `gradients`).

Not covered by the ops: double backward and torch.func transforms of a compiled model (eager has both).
"""

# No `from __future__ import annotations`, and typing's spellings: torch.library builds each op's schema
# from its annotations, and older torch releases (2.4) read neither string annotations nor `list[int]`.
from typing import List, Optional  # noqa: UP035

import torch

from kernels.function import _forward, _output_format, _output_shape, gradients
from kernels.params import ConvSpec
from kernels.selection import resolve

Ints = List[int]  # noqa: UP006 (see the imports)
MaybeTensor = Optional[torch.Tensor]  # noqa: UP045


def _spec(stride: list[int], padding: list[int], dilation: list[int], groups: int) -> ConvSpec:
    return ConvSpec((stride[0], stride[1]), (padding[0], padding[1], padding[2], padding[3]), (dilation[0], dilation[1]), groups)


@torch.library.custom_op("convservice::conv2d", mutates_args=())
def conv2d(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: MaybeTensor,
    stride: Ints,
    padding: Ints,
    dilation: Ints,
    groups: int,
    padding_mode: str,
    algorithm: str,
) -> torch.Tensor:
    """input (N, C_in, H, W) -> (N, C_out, H_out, W_out) in nn.Conv2d's memory format; padding (top, bottom, left, right)."""
    spec = _spec(stride, padding, dilation, groups)
    chosen = resolve(algorithm, input, weight, spec)
    return _forward(input, weight, bias, spec, padding_mode, chosen, _output_format(input, weight, padding_mode))


@conv2d.register_fake
def _(input, weight, bias, stride, padding, dilation, groups, padding_mode, algorithm):
    shape = _output_shape(input, weight, _spec(stride, padding, dilation, groups))
    return torch.empty(shape, dtype=input.dtype, device=input.device, memory_format=_output_format(input, weight, padding_mode))


@torch.library.custom_op("convservice::conv2d_backward", mutates_args=())
def conv2d_backward(
    grad_output: torch.Tensor,
    input: torch.Tensor,
    weight: torch.Tensor,
    stride: Ints,
    padding: Ints,
    dilation: Ints,
    groups: int,
    padding_mode: str,
    algorithm: str,
    need_input: bool,
    need_weight: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_input, grad_weight); one not asked for is an empty tensor (a custom op returns tensors only)."""
    spec = _spec(stride, padding, dilation, groups)
    chosen = resolve(algorithm, input, weight, spec)
    memory_format = _output_format(input, weight, padding_mode)
    grad_input, grad_weight = gradients(grad_output, input, weight, spec, padding_mode, chosen, memory_format, need_input, need_weight)
    return (
        grad_input if grad_input is not None else input.new_empty(0),
        grad_weight.contiguous() if grad_weight is not None else weight.new_empty(0),
    )


@conv2d_backward.register_fake
def _(grad_output, input, weight, stride, padding, dilation, groups, padding_mode, algorithm, need_input, need_weight):
    grad_input = torch.empty_like(input, memory_format=_output_format(input, weight, padding_mode)) if need_input else input.new_empty(0)
    return grad_input, weight.new_empty(weight.shape if need_weight else 0)


def _setup_context(ctx, inputs, output) -> None:
    input, weight, bias, *arguments = inputs
    ctx.save_for_backward(input, weight)
    ctx.arguments = arguments


def _backward(ctx, grad_output):
    input, weight = ctx.saved_tensors
    need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
    grad_input, grad_weight = conv2d_backward(grad_output, input, weight, *ctx.arguments, need_input, need_weight)
    grad_bias = grad_output.sum(dim=(0, 2, 3)) if need_bias else None
    return (grad_input if need_input else None, grad_weight if need_weight else None, grad_bias) + (None,) * len(ctx.arguments)


conv2d.register_autograd(_backward, setup_context=_setup_context)
