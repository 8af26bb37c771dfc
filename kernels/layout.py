"""Memory-layout predicates the algorithms share."""

from __future__ import annotations

import torch


def strictly_channels_last(tensor: torch.Tensor) -> bool:
    """Channels-last and not also NCHW-contiguous (size-1 dimensions make some tensors both): such a tensor is
    read in NHWC order by the algorithms that have a channels-last path."""
    return tensor.is_contiguous(memory_format=torch.channels_last) and not tensor.is_contiguous()
