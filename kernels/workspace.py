"""Reusable scratch buffers for the CPU/GEMM algorithms' temporaries (tile and patch matrices).

A fresh multi-megabyte tensor is fresh pages: on the benchmark host each first touch is a page
fault, and whether glibc hands back recycled or fresh pages depends on the allocation history of
the process. Measured: 1,600-2,300 faults (4-8 ms of system time) per 64x56 forward in some
processes, none in others, for nn.Conv2d and ours alike. oneDNN keeps a scratchpad for the same
reason; this is ours: one buffer per (thread, device, slot), grown on demand. Requests over
MAX_CACHED_BYTES (or the im2col workspace limit) get a fresh tensor, so a thread holds at most
len(slots) * 64 MiB between calls (in practice the biggest tile/patch buffers it has run); `clear()`
frees them.

Only for temporaries that die inside one algorithm call: never for outputs, and not while
autograd records (a recorded op may save the buffer for backward).
"""

from __future__ import annotations

import threading

import torch

from kernels.limits import get_limits

MAX_CACHED_BYTES = 64 << 20

_local = threading.local()


def scratch(slot: str, numel: int, like: torch.Tensor) -> torch.Tensor:
    """A 1-D tensor of `numel` elements of like's dtype/device with undefined contents.

    Two live temporaries of one call need two slots; the same slot may be reused once the previous
    contents are dead.
    """
    nbytes = numel * like.element_size()
    if torch.is_grad_enabled() or nbytes > min(MAX_CACHED_BYTES, get_limits().im2col_workspace_bytes):
        return like.new_empty(numel)
    buffers = getattr(_local, "buffers", None)
    if buffers is None:
        buffers = _local.buffers = {}
    key = (slot, like.device)
    buffer = buffers.get(key)
    if buffer is None or buffer.numel() < nbytes:
        buffer = buffers[key] = torch.empty(nbytes, dtype=torch.uint8, device=like.device)
    return buffer[:nbytes].view(like.dtype)[:numel]


def clear() -> None:
    """Free this thread's buffers."""
    _local.buffers = {}
