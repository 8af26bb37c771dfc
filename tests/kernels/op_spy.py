"""A dispatch-mode spy: which aten ops a piece of code runs, and which of them are torch's convs.

A TorchDispatchMode sees every aten op below autograd, including those the autograd engine runs
for backward, so it catches a conv hidden anywhere (F.conv2d, conv_transpose for grad_input,
convolution_backward, mkldnn/cudnn/thnn kernels).
"""

from __future__ import annotations

from torch.utils._python_dispatch import TorchDispatchMode

FORBIDDEN = ("convolution", "conv2d", "conv_transpose", "cudnn", "mkldnn", "thnn_conv", "conv_depthwise")
# Prefixes of the ops that do a conv's multiplies (in-place variants included: addcmul_, mul_).
MULTIPLIES = ("aten.mm", "aten.bmm", "aten.addmm", "aten.baddbmm", "aten.addbmm", "aten.mul", "aten.addcmul", "aten.dot", "aten.einsum")


class OpSpy(TorchDispatchMode):
    """Records the name of every aten op dispatched while active ("aten.mm.default", ...)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def forbidden(ops: list[str]) -> list[str]:
    """The torch convolution ops among `ops`."""
    return sorted({op for op in ops if any(word in op for word in FORBIDDEN)})


def multiplies(ops: list[str]) -> list[str]:
    """The torch multiply ops among `ops`."""
    return sorted({op for op in ops if op.startswith(MULTIPLIES)})
