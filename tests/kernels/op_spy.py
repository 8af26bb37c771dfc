"""A dispatch-mode spy: which aten ops a piece of code runs, and which of them are torch's convs.

A TorchDispatchMode sees every aten op below autograd, including those the autograd engine runs
for backward, so it catches a conv hidden anywhere (F.conv2d, conv_transpose for grad_input,
convolution_backward, mkldnn/cudnn/thnn kernels).
"""

from __future__ import annotations

import sys

from torch.utils._python_dispatch import TorchDispatchMode

# oneDNN's conv ops are caught by name ("mkldnn_convolution", "mkldnn._convolution_pointwise",
# "mkldnn_reorder_conv2d_weight"); its matmul (mkldnn._linear_pointwise) is a GEMM, which kernels/gemm.py uses.
FORBIDDEN = ("convolution", "conv2d", "conv_transpose", "cudnn", "thnn_conv", "conv_depthwise")
# Prefixes of the ops that do a conv's multiplies (in-place variants included: addcmul_, mul_).
MULTIPLIES = (
    "mkldnn._linear_pointwise",
    "aten.mm",
    "aten.bmm",
    "aten.addmm",
    "aten.baddbmm",
    "aten.addbmm",
    "aten.mul",
    "aten.addcmul",
    "aten.dot",
    "aten.einsum",
)


# The launchers kernels/triton_conv.py calls: a Triton kernel runs below the dispatcher, so the spy
# records these calls itself ("triton.conv_forward", ...). On CUDA, "auto" runs them.
TRITON_LAUNCHERS = (
    "conv_forward",
    "conv_grad_input",
    "conv_grad_weight",
    "depthwise_forward",
    "depthwise_grad_input",
    "depthwise_grad_weight",
)


class OpSpy(TorchDispatchMode):
    """Records the name of every aten op dispatched while active ("aten.mm.default", ...), and each
    Triton launcher the triton algorithm calls ("triton.conv_forward", ...)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []
        self._saved: dict[str, object] = {}

    def __enter__(self):
        triton_conv = sys.modules.get("kernels.triton_conv")  # loaded where Triton is installed
        for name in TRITON_LAUNCHERS if triton_conv else ():
            launcher = self._saved[name] = getattr(triton_conv, name)
            setattr(triton_conv, name, self._recording(name, launcher))
        return super().__enter__()

    def __exit__(self, *exc):
        for name, launcher in self._saved.items():
            setattr(sys.modules["kernels.triton_conv"], name, launcher)
        return super().__exit__(*exc)

    def _recording(self, name, launcher):
        def launch(*args, **kwargs):
            self.ops.append(f"triton.{name}")
            return launcher(*args, **kwargs)

        return launch

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def forbidden(ops: list[str]) -> list[str]:
    """The torch convolution ops among `ops`."""
    return sorted({op for op in ops if any(word in op for word in FORBIDDEN)})


def multiplies(ops: list[str]) -> list[str]:
    """The torch multiply ops among `ops`."""
    return sorted({op for op in ops if op.startswith(MULTIPLIES)})


def launches(ops: list[str]) -> list[str]:
    """Our Triton launchers among `ops` (each one's kernel does a conv's multiplies)."""
    return sorted({op for op in ops if op.startswith("triton.")})
