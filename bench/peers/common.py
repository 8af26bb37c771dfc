"""What every peer server shares: the one computation they serve, and tensor <-> base64 helpers.

The computation is exactly what our service runs with parity off: `kernels.conv2d` under no_grad with
the algorithm the benchmark names, so the peers differ from us only in how they serve it.
"""

from __future__ import annotations

import base64
import os

import numpy as np
import torch

import kernels

CONV_ARGS = ("stride", "padding", "dilation", "groups", "padding_mode")


def set_threads(workers: int) -> int:
    """Give each of `workers` processes its share of the cores, so workers do not oversubscribe them."""
    threads = max(1, (os.cpu_count() or 1) // max(1, workers))
    torch.set_num_threads(threads)
    return threads


def conv(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, params: dict, algorithm: str) -> torch.Tensor:
    """input (N, C_in, H, W) float32, weight (C_out, C_in/groups, kH, kW), bias (C_out,) or None -> output (N, C_out, H_out, W_out)."""
    with torch.no_grad():
        return kernels.conv2d(input, weight, bias, algorithm=algorithm, **{name: params[name] for name in CONV_ARGS if name in params})


def tensor_from_lists(nested: list) -> torch.Tensor:
    # numpy parses nested lists several times faster than torch.tensor does.
    return torch.from_numpy(np.asarray(nested, dtype=np.float32))


def tensor_from_b64(shape: list[int], b64: str) -> torch.Tensor:
    """Little-endian float32 bytes, base64 encoded, of a C-contiguous tensor of `shape`."""
    return torch.from_numpy(np.frombuffer(base64.b64decode(b64), dtype="<f4").reshape(shape).copy())


def tensor_to_b64(tensor: torch.Tensor) -> str:
    return base64.b64encode(tensor.contiguous().numpy().astype("<f4", copy=False).tobytes()).decode("ascii")
