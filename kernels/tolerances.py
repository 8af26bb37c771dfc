"""Parity tolerances per dtype: the one table used by the service's parity report and by the tests.

float64 is tight because both sides do exact-ish math; the low-precision rows reflect rounding of
the inputs and of long reductions (K = C_in*kH*kW), not algorithmic error.
"""

from __future__ import annotations

import torch

# dtype -> (atol, rtol)
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-4),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (5e-2, 5e-2),
}


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """(atol, rtol) for comparing a result of `dtype` with the oracle."""
    return TOLERANCES[dtype]
