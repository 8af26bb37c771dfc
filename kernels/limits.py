"""Process-wide work limits for the algorithms; the service sets them from its settings at start-up."""

from __future__ import annotations

from dataclasses import dataclass, replace

MiB = 1 << 20


@dataclass(frozen=True)
class Limits:
    # The reference algorithm is ground truth, not a product path: refuse instead of running for minutes.
    reference_max_macs: int = 50_000_000
    # Upper bound on any im2col patch/column buffer; work is chunked over output rows to stay under it.
    im2col_workspace_bytes: int = 256 * MiB


_current = Limits()


def get_limits() -> Limits:
    return _current


def set_limits(**changes: int) -> Limits:
    """Replace some limits (e.g. `set_limits(im2col_workspace_bytes=64 * MiB)`); returns the new set."""
    global _current
    for name, value in changes.items():
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"limit {name} must be a positive int, got {value!r}")
    _current = replace(_current, **changes)
    return _current


def macs(batch: int, out_channels: int, out_height: int, out_width: int, in_per_group: int, kernel_height: int, kernel_width: int) -> int:
    """Multiply-accumulates of one forward pass."""
    return batch * out_channels * out_height * out_width * in_per_group * kernel_height * kernel_width
