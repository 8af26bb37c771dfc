"""Non-zero padding modes (reflect, replicate, circular) as gathers, and their adjoint.

Algorithms only implement zero padding. The autograd Function pads the input with these helpers
first and folds the gradient of the padded input back with `unpad_grad`, so the padding-mode
gradient is ours too (an index_add, the exact adjoint of the gather).
"""

from __future__ import annotations

import torch


def source_indices(size: int, before: int, after: int, mode: str, device: torch.device) -> torch.Tensor:
    """For each position of a padded axis (length before + size + after), the input index it copies."""
    positions = torch.arange(-before, size + after, device=device)
    if mode == "replicate":
        return positions.clamp(0, size - 1)
    if mode == "circular":
        return positions.remainder(size)
    if mode == "reflect":
        period = 2 * (size - 1) if size > 1 else 1
        folded = positions.abs().remainder(period)
        return torch.where(folded >= size, period - folded, folded)
    raise ValueError(f"padding_mode {mode!r} is not a gather padding mode")


def pad(input: torch.Tensor, padding: tuple[int, int, int, int], mode: str) -> torch.Tensor:
    """input (N, C, H, W) -> (N, C, H + top + bottom, W + left + right) padded per `mode`."""
    top, bottom, left, right = padding
    rows = source_indices(input.shape[2], top, bottom, mode, input.device)
    cols = source_indices(input.shape[3], left, right, mode, input.device)
    return input.index_select(2, rows).index_select(3, cols)


def unpad_grad(grad_padded: torch.Tensor, padding: tuple[int, int, int, int], mode: str, in_height: int, in_width: int) -> torch.Tensor:
    """Adjoint of `pad`: sums each padded position's gradient into the input element it copied."""
    top, bottom, left, right = padding
    device = grad_padded.device
    rows = source_indices(in_height, top, bottom, mode, device)
    cols = source_indices(in_width, left, right, mode, device)
    batch, channels = grad_padded.shape[:2]
    by_cols = grad_padded.new_zeros(batch, channels, grad_padded.shape[2], in_width).index_add(3, cols, grad_padded)
    return grad_padded.new_zeros(batch, channels, in_height, in_width).index_add(2, rows, by_cols)
