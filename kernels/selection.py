"""`auto`: pick the fastest algorithm that supports the problem on its device."""

from __future__ import annotations

import torch

from kernels.base import ConvAlgorithm, UnsupportedProblem, get, registered
from kernels.params import ConvSpec

# In order of preference per device type; the first that accepts the problem wins.
_PREFERENCE = {
    "cuda": ("triton", "im2col"),
    "cpu": ("im2col",),
}


def choose(input: torch.Tensor, weight: torch.Tensor, spec: ConvSpec) -> ConvAlgorithm:
    available = registered()
    reasons = []
    for name in _PREFERENCE.get(input.device.type, ("im2col",)):
        if name not in available:
            continue
        try:
            available[name].check(input, weight, spec)
            return available[name]
        except UnsupportedProblem as why:
            reasons.append(str(why))
    raise UnsupportedProblem(f"no algorithm supports this problem: {'; '.join(reasons) or 'none registered'}")


def resolve(name: str, input: torch.Tensor, weight: torch.Tensor, spec: ConvSpec) -> ConvAlgorithm:
    """The algorithm called `name` ("auto" chooses), checked against the problem."""
    if name == "auto":
        return choose(input, weight, spec)
    algorithm = get(name)
    algorithm.check(input, weight, spec)
    return algorithm
