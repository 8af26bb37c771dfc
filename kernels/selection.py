"""`auto`: pick the fastest algorithm that supports the problem on its device."""

from __future__ import annotations

import torch

from kernels.base import ConvAlgorithm, UnsupportedProblem, get, registered
from kernels.params import ConvSpec

# In order of preference per device type; the first that accepts the problem wins. The CPU order
# puts the specialised algorithms first (each refuses what it cannot run): depthwise and 1x1 convs
# are not well served by a generic patch GEMM. Measurements: bench/bench_kernels.py, docs/performance.md.
_PREFERENCE = {
    "cuda": ("triton", "im2col"),
    "cpu": ("depthwise", "pointwise", "shifted_gemm", "im2col"),
}

# shifted_gemm computes H_pad*W_pad "wide" output rows per image for H_out*W_out real ones, and its
# per-tap GEMMs (K = C) run below the efficiency of im2col's one long-K GEMM; it only wins where
# im2col's 9x patch copy is large relative to the work, i.e. big images with little padding waste.
# Measured (docs/performance.md): 56x56 (waste 58*58/56*56 = 1.07) wins clearly for forward and
# backward; 28x28 (1.15) wins forward but loses forward+backward, so the cut is below it.
MAX_SHIFTED_WASTE = 1.1


def _worth_running(name: str, input: torch.Tensor, weight: torch.Tensor, spec: ConvSpec) -> bool:
    """Speed heuristics on top of `check` (which is about correctness): False skips an algorithm in "auto"."""
    if name != "shifted_gemm":
        return True
    top, bottom, left, right = spec.padding
    padded = (input.shape[2] + top + bottom) * (input.shape[3] + left + right)
    out_height, out_width = spec.output_size(input.shape[2], input.shape[3], weight.shape[2], weight.shape[3])
    return padded <= MAX_SHIFTED_WASTE * max(1, out_height * out_width)


def choose(input: torch.Tensor, weight: torch.Tensor, spec: ConvSpec) -> ConvAlgorithm:
    available = registered()
    reasons = []
    for name in _PREFERENCE.get(input.device.type, ("im2col",)):
        if name not in available or not _worth_running(name, input, weight, spec):
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
