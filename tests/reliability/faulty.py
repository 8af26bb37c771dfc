"""Test-only conv algorithms that fail on purpose, registered in the test server's process only.

`python -m tests.reliability.serve_faulty` imports this module before the app, so the names below join
the kernels registry (and the API's `algorithm` choices) in that process alone; the production server
never imports it. Each run appends "<name> <input width>" to the file named by FAULTY_RECORD, so a
test can tell which requests really ran (the width tags the request; no tensor values are written).
"""

from __future__ import annotations

import os
import time

import torch

from kernels.base import ConvAlgorithm, Support, register
from kernels.params import ConvSpec

SLEEP_S = float(os.environ.get("FAULTY_SLEEP_S", "1.0"))
# Text a careless kernel might put in an error: a path and tensor values, which must not reach clients.
LEAKY_MESSAGE = "kernel failed in /opt/secret/kernels/faulty.py: tensor([7.654321, 7.654321])"


def _record(name: str, input: torch.Tensor) -> None:
    path = os.environ.get("FAULTY_RECORD")
    if path:
        with open(path, "a") as record:
            record.write(f"{name} {input.shape[-1]}\n")


class _Faulty(ConvAlgorithm):
    def support(self) -> Support:
        return Support(devices=("cpu", "cuda"), dtypes=("float32", "float64"), double_backward=False, notes="test only")

    def fail(self) -> None:
        """Sleep, raise, or both; the subclasses say which."""

    def forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, spec: ConvSpec) -> torch.Tensor:
        _record(self.name, input)
        self.fail()
        out_height, out_width = spec.output_size(input.shape[2], input.shape[3], weight.shape[2], weight.shape[3])
        return input.new_zeros(input.shape[0], weight.shape[0], out_height, out_width)

    def backward(self, grad_output, input, weight, spec, need_input, need_weight):
        _record(self.name, input)
        self.fail()
        return (torch.zeros_like(input) if need_input else None, torch.zeros_like(weight) if need_weight else None)


class Sleepy(_Faulty):
    """Holds the device for FAULTY_SLEEP_S seconds, then answers zeros."""

    name = "fault_sleep"

    def fail(self) -> None:
        time.sleep(SLEEP_S)


class Raising(_Faulty):
    """A kernel bug: a RuntimeError whose message holds a path and tensor values."""

    name = "fault_raise"

    def fail(self) -> None:
        raise RuntimeError(LEAKY_MESSAGE)


class OutOfMemory(_Faulty):
    """What the CUDA caching allocator raises when a request does not fit."""

    name = "fault_oom"

    def fail(self) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.10 GiB total capacity)")


for _algorithm in (Sleepy(), Raising(), OutOfMemory()):
    register(_algorithm)
