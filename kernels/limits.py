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
    # Python loop iterations (each one to a few torch calls, ~5-60 us) an algorithm may make in one forward
    # or backward pass (`ConvAlgorithm.loop_iterations`). MAC limits bound the arithmetic, not this: a
    # depthwise 1x2^20 kernel is 1M MACs on a 1x2^20 image and 2^20 iterations, 26 s per forward. 16384
    # takes a 128x128 depthwise kernel (~1.3 s forward+backward); the large ones in use are 31x31 and 51x51.
    loop_iterations: int = 16384
    # What an algorithm's forward may keep alive for its backward to reuse (`ConvAlgorithm.forward_keeping`):
    # Winograd's input tiles, 4x the input, which its grad_weight would otherwise rebuild (0.6-1.1 ms of
    # 2.4-3.9 at batch 4). Past this the backward recomputes them. A model holds one per conv layer until its
    # backward, so this bounds that extra memory per layer.
    kept_for_backward_bytes: int = 64 * MiB


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


def keepable(elements: int, like) -> bool:
    """Whether a buffer of `elements` like `like`'s (a tensor: its element size) fits `kept_for_backward_bytes`, what a
    forward may keep for its backward (`ConvAlgorithm.forward_keeping`)."""
    return elements * like.element_size() <= _current.kept_for_backward_bytes


def macs(batch: int, out_channels: int, out_height: int, out_width: int, in_per_group: int, kernel_height: int, kernel_width: int) -> int:
    """Multiply-accumulates of one forward pass."""
    return batch * out_channels * out_height * out_width * in_per_group * kernel_height * kernel_width
