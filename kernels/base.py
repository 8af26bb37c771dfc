"""The interface every conv algorithm implements, and the registry that names them.

An algorithm sees a batched, zero-padded problem described by a `ConvSpec`; argument handling,
padding modes, unbatched input, memory format and autograd live once in `kernels/function.py`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from kernels.limits import get_limits
from kernels.params import ConvSpec


class UnsupportedProblem(ValueError):
    """An algorithm cannot (or will not) run this problem; the message says why."""


class WorkTooLarge(UnsupportedProblem):
    """The problem exceeds a work limit (e.g. the reference algorithm's MAC limit)."""


# What an algorithm built from plain torch ops runs on: every device torch has, every float dtype.
TORCH_DEVICES = ("cpu", "cuda")
FLOAT_DTYPES = ("float64", "float32", "float16", "bfloat16")


@dataclass(frozen=True)
class Support:
    """What an algorithm can run, as reported by `kernels.algorithms()` and the service's /info."""

    devices: tuple[str, ...] = TORCH_DEVICES
    dtypes: tuple[str, ...] = FLOAT_DTYPES
    double_backward: bool = True
    notes: str = ""
    limits: dict = field(default_factory=dict)


class ConvAlgorithm(ABC):
    """One way of computing conv2d and its gradients.

    Shapes: input (N, C_in, H, W), weight (C_out, C_in/groups, kH, kW), bias (C_out,) or None,
    grad_output (N, C_out, H_out, W_out). Any memory format may come in or go out; the caller fixes
    the output's format. Nothing here may call torch's convolution ops: they are the oracle.
    """

    name: str = ""
    # Passes ("forward", "backward") in which a NaN or an infinity can reach elements that torch keeps finite (a
    # transform mixing a tile, a product with a structural zero); kernels.conv2d runs them with im2col instead then.
    inexact_nonfinite: frozenset[str] = frozenset()

    @abstractmethod
    def support(self) -> Support: ...

    def check(self, input: torch.Tensor, weight: torch.Tensor, spec: ConvSpec) -> None:
        """Raise UnsupportedProblem if this algorithm will not run the problem."""
        support = self.support()
        if input.device.type not in support.devices:
            raise UnsupportedProblem(f"algorithm {self.name!r} does not run on {input.device.type}; it runs on {list(support.devices)}")
        dtype = str(input.dtype).removeprefix("torch.")
        if dtype not in support.dtypes:
            raise UnsupportedProblem(f"algorithm {self.name!r} does not support dtype {dtype}; it supports {list(support.dtypes)}")

    def loop_iterations(self, input: torch.Tensor, weight: torch.Tensor, spec: ConvSpec) -> int:
        """Upper bound on the Python loop iterations of one forward or backward pass (1: it loops over nothing
        that grows with the problem, or only over blocks of a work-sized chunk)."""
        return 1

    def accept(self, input: torch.Tensor, weight: torch.Tensor, spec: ConvSpec) -> None:
        """`check`, then the limit on loop iterations (after it, so that a problem the algorithm cannot run says why first)."""
        self.check(input, weight, spec)
        loops, limit = self.loop_iterations(input, weight, spec), get_limits().loop_iterations
        if loops > limit:
            raise WorkTooLarge(
                f"algorithm {self.name!r} would make {loops:,} Python loop iterations per pass on this problem "
                f"(kernel {tuple(weight.shape[2:])}, groups {spec.groups}); the limit is {limit:,}"
            )

    @abstractmethod
    def forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, spec: ConvSpec) -> torch.Tensor:
        """-> output (N, C_out, H_out, W_out) in input's dtype."""

    @abstractmethod
    def backward(
        self,
        grad_output: torch.Tensor,
        input: torch.Tensor,
        weight: torch.Tensor,
        spec: ConvSpec,
        need_input: bool,
        need_weight: bool,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """-> (grad_input like input or None, grad_weight like weight or None)."""

    def forward_keeping(
        self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, spec: ConvSpec
    ) -> tuple[torch.Tensor, object]:
        """`forward`, plus what this algorithm's backward on the same input and weight can reuse (None: nothing).

        Autograd calls it and hands the kept value to `backward_kept`; what is kept lives until then, so an
        algorithm keeps only what `Limits.kept_for_backward_bytes` allows."""
        return self.forward(input, weight, bias, spec), None

    def backward_kept(
        self,
        kept: object,
        grad_output: torch.Tensor,
        input: torch.Tensor,
        weight: torch.Tensor,
        spec: ConvSpec,
        need_input: bool,
        need_weight: bool,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """`backward`, given what `forward_keeping` kept from the forward of this input and weight; never while autograd
        records (a double backward), where the gradients must stay functions of the input and weight."""
        return self.backward(grad_output, input, weight, spec, need_input, need_weight)


_REGISTRY: dict[str, ConvAlgorithm] = {}


def register(algorithm: ConvAlgorithm) -> ConvAlgorithm:
    if algorithm.name in _REGISTRY or algorithm.name == "auto":
        raise ValueError(f"algorithm name {algorithm.name!r} is taken")
    _REGISTRY[algorithm.name] = algorithm
    return algorithm


def names() -> list[str]:
    return ["auto", *_REGISTRY]


def get(name: str) -> ConvAlgorithm:
    """The algorithm registered as `name` (not "auto"); ValueError listing the valid names otherwise."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown algorithm {name!r}; valid algorithms: {names()}") from None


def registered() -> dict[str, ConvAlgorithm]:
    return dict(_REGISTRY)
