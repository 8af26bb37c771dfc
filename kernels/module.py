"""`kernels.Conv2d`: nn.Conv2d with our conv underneath.

Subclassing nn.Conv2d gives the same constructor checks, initialisation, parameters, state_dict keys
and repr; only the computation is swapped.
"""

from __future__ import annotations

import torch
from torch import nn

from kernels.base import get
from kernels.function import conv2d


class Conv2d(nn.Conv2d):
    """Drop-in for nn.Conv2d. Extra argument: `algorithm` ("auto" or a registered name)."""

    def __init__(self, *args, algorithm: str = "auto", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if algorithm != "auto":
            get(algorithm)
        self.algorithm = algorithm

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return conv2d(input, weight, bias, self.stride, self.padding, self.dilation, self.groups, self.padding_mode, self.algorithm)

    def extra_repr(self) -> str:
        text = super().extra_repr()
        return text if self.algorithm == "auto" else f"{text}, algorithm={self.algorithm}"
