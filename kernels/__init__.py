"""Our Conv2d: forward and backward computed by our own algorithms, never torch's conv ops.

Public API: `conv2d` (functional), `Conv2d` (nn.Conv2d drop-in), `algorithms()` (what each supports).

Process-wide limits (`get_limits`, `set_limits`; the service sets them from its CONV_* settings): the
reference algorithm's MACs, the workspace cap on patch buffers and stacked copies, and the Python loop
iterations an algorithm may make per pass (a kernel of more than 16,384 taps, for the ones that loop over
taps). A problem past an algorithm's limit raises WorkTooLarge when that algorithm is named; `auto` moves
on to one that accepts it. A model with bigger kernels can raise the bound: `set_limits(loop_iterations=...)`.
"""

from __future__ import annotations

from kernels import depthwise as _depthwise  # noqa: F401  (registers "depthwise")
from kernels import im2col as _im2col  # noqa: F401  (registers "im2col")
from kernels import ops as _ops  # noqa: F401  (registers torch.ops.convservice, which compiled models call)
from kernels import pointwise as _pointwise  # noqa: F401  (registers "pointwise")
from kernels import reference as _reference  # noqa: F401  (registers "reference")
from kernels import shifted_gemm as _shifted_gemm  # noqa: F401  (registers "shifted_gemm")
from kernels import unfold as _unfold  # noqa: F401  (registers "unfold")
from kernels import winograd as _winograd  # noqa: F401  (registers "winograd")
from kernels import winograd_rows as _winograd_rows  # noqa: F401  (registers "winograd_rows")
from kernels.base import ConvAlgorithm, UnsupportedProblem, WorkTooLarge, get, names
from kernels.function import conv2d
from kernels.limits import get_limits, set_limits
from kernels.module import Conv2d

try:  # Triton is optional: present on GPU hosts and in dev installs (CPU interpreter).
    from kernels import triton_conv as _triton_conv  # noqa: F401  (registers "triton")
except ImportError:
    _triton_conv = None


def algorithms() -> dict[str, dict]:
    """{name: {"devices", "dtypes", "double_backward", "notes", "limits"}} for every registered algorithm."""
    from kernels.base import registered

    return {
        name: {
            "devices": list(support.devices),
            "dtypes": list(support.dtypes),
            "double_backward": support.double_backward,
            "notes": support.notes,
            "limits": dict(support.limits),
        }
        for name, support in ((name, algorithm.support()) for name, algorithm in registered().items())
    }


__all__ = [
    "Conv2d",
    "ConvAlgorithm",
    "UnsupportedProblem",
    "WorkTooLarge",
    "algorithms",
    "conv2d",
    "get",
    "get_limits",
    "names",
    "set_limits",
]
