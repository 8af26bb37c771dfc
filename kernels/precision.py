"""Half-precision inputs computed in float32 and rounded once, for the CPU/GEMM algorithms.

Our algorithms sum partial results outside a single GEMM (one GEMM per kernel tap, col2im adds,
tap-wise multiply-adds). In float16/bfloat16 every such sum rounds, which misses the tolerance
table on a few elements in ten thousand at realistic sizes (tests/kernels/test_accuracy.py).
Widening to float32 and rounding the result once gives a single rounding, and on CPU it is also
faster: float16 matmul there has no fast kernel.
"""

from __future__ import annotations

import torch

HALF = (torch.float16, torch.bfloat16)


def widened(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """The tensors in float32 if they are half precision; others (and None) unchanged."""
    return tuple(t.float() if t is not None and t.dtype in HALF else t for t in tensors)


def narrowed(tensor: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if tensor is None else tensor.to(dtype)
