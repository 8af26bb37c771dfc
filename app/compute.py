"""What a device worker runs for /forward and /backward: ours, then the oracle, then the parity report.

Both functions take a checked `Problem` and the worker's device, and return CPU tensors plus reports;
they run on the worker's thread, never on the event loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

import kernels
from app import parity
from app.codec import as_dtype
from app.errors import DeadlineExceeded, InvalidField, TooLarge
from app.problem import Problem
from kernels.base import UnsupportedProblem, WorkTooLarge
from kernels.memo import BoundedMemo
from kernels.params import normalize
from kernels.selection import resolve
from kernels.tolerances import tolerance

Conv = Callable[..., torch.Tensor]


@dataclass
class Outcome:
    """Returned tensors (CPU) by response field, the algorithm that ran, the parity report, timings in ms."""

    tensors: dict[str, torch.Tensor | None]
    algorithm: str
    parity: dict | None
    timing_ms: dict[str, float] = field(default_factory=dict)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _stand_in(tensor: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """A tensor with `tensor`'s shape and dtype on `device` that holds one element (expanded), for checks."""
    if tensor is None:
        return None
    return torch.empty(1, dtype=tensor.dtype, device=device).expand(tensor.shape)


def _chosen_algorithm(problem: Problem, device: torch.device, backward: bool) -> str:
    """The algorithm "auto" resolves to, so the response can name it (kernels.conv2d does not say); backward: for
    /backward, where "auto" weighs forward+backward (for /forward, the forward alone).

    Cached per shape and options: resolving means validating the call again on stand-in tensors,
    ~45 us that a tiny request would otherwise pay twice (here and inside kernels.conv2d)."""
    options = problem.options
    key = (
        tuple(problem.input.shape),
        tuple(problem.weight.shape),
        problem.bias is not None,
        problem.dtype,
        device,
        *(tuple(value) if isinstance(value, list) else value for value in _conv_args(problem)),
        options.algorithm,
        backward,
    )
    name = _CHOSEN.get(key)
    if name is None:
        name = _CHOSEN.remember(key, _resolve(problem, device, backward))
    return name


_CHOSEN = BoundedMemo(1024)


def _resolve(problem: Problem, device: torch.device, backward: bool) -> str:
    options = problem.options
    input, weight, bias = (_stand_in(t, device) for t in (problem.input, problem.weight, problem.bias))
    batched = input if input.dim() == 4 else input.unsqueeze(0)
    spec = normalize(batched, weight, bias, options.stride, options.padding, options.dilation, options.groups, options.padding_mode)
    try:
        return resolve(options.algorithm, batched, weight, spec, backward).name
    except WorkTooLarge as error:
        raise TooLarge(str(error)) from None
    except UnsupportedProblem as error:
        raise InvalidField("algorithm", f"{error}; see GET /info for what each algorithm supports") from None


def _ours(algorithm: str) -> Conv:
    def conv(input, weight, bias, stride, padding, dilation, groups, padding_mode):
        return kernels.conv2d(input, weight, bias, stride, padding, dilation, groups, padding_mode, algorithm)

    return conv


def _conv_args(problem: Problem) -> tuple:
    options = problem.options
    return (options.stride, options.padding, options.dilation, options.groups, options.padding_mode)


def _forward_pass(conv: Conv, problem: Problem, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    input, weight, bias = (as_dtype(t, dtype, device) for t in (problem.input, problem.weight, problem.bias))
    with torch.inference_mode():
        return conv(input, weight, bias, *_conv_args(problem))


def _backward_pass(conv: Conv, problem: Problem, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor | None]:
    """Gradients of the request's loss (or of <output, grad_output>) w.r.t. input, weight and bias."""
    leaves = [
        None if t is None else as_dtype(t, dtype, device).detach().requires_grad_() for t in (problem.input, problem.weight, problem.bias)
    ]
    with torch.enable_grad():
        output = conv(*leaves, *_conv_args(problem))
        if problem.grad_output is not None:
            output.backward(as_dtype(problem.grad_output, dtype, device))
        elif problem.options.loss == "mean_square":
            output.square().mean().backward()
        else:
            output.sum().backward()
    input, weight, bias = leaves
    return {
        "grad_input": input.grad,
        "grad_weight": weight.grad,
        "grad_bias": bias.grad if bias is not None else None,
        "output": output.detach(),
    }


def _timed(device: torch.device, run: Callable[[], object]) -> tuple[object, float]:
    _sync(device)
    start = time.perf_counter()
    result = run()
    _sync(device)
    return result, (time.perf_counter() - start) * 1e3


def _report(problem: Problem, ours: dict[str, torch.Tensor | None], reference: dict[str, torch.Tensor | None], exact: dict | None) -> dict:
    options = problem.options
    default_atol, default_rtol = tolerance(problem.dtype)
    atol = default_atol if options.atol is None else options.atol
    rtol = default_rtol if options.rtol is None else options.rtol
    tensors = {name: parity.compare(value, reference[name], atol, rtol) for name, value in ours.items() if value is not None}
    report = {
        "ok": all(entry["close"] for entry in tensors.values()),
        "reference": parity.REFERENCE,
        "atol": atol,
        "rtol": rtol,
        "tensors": tensors,
        "exact": None,
    }
    if exact is not None:
        report["exact"] = {
            "reference": parity.EXACT_REFERENCE,
            "tensors": {
                name: {
                    "ours": parity.exact_errors(value, exact[name], atol),
                    "torch": parity.exact_errors(reference[name], exact[name], atol),
                }
                for name, value in ours.items()
                if value is not None
            },
        }
    return report


# Below this much work a conv takes well under a millisecond: torch's second intra-op thread only
# spins against the event loop for the 2 cores (measured: ~8 ms of CPU per seed-sized request).
SINGLE_THREAD_MACS = 2_000_000


@contextmanager
def _intra_op_threads(problem: Problem, device: torch.device) -> Iterator[None]:
    """One torch thread for small CPU problems, the process default otherwise; restored afterwards.

    The count is the calling thread's (OpenMP's nthreads ICV is per thread), so an inline run on the
    event loop does not change the device worker's running conv."""
    default = torch.get_num_threads()
    wanted = 1 if device.type == "cpu" and problem.macs < SINGLE_THREAD_MACS else default
    if wanted == default:
        yield
        return
    torch.set_num_threads(wanted)
    try:
        yield
    finally:
        torch.set_num_threads(default)


def _check_deadline(deadline: float | None, stage: str) -> None:
    """Between stages: a conv cannot be interrupted, but a request past its deadline starts no further one
    (its caller has answered 504 already; the oracle can take far longer than ours on odd shapes)."""
    if deadline is not None and time.monotonic() > deadline:
        raise DeadlineExceeded(f"the request's deadline passed before {stage}")


def _run(
    problem: Problem,
    device: torch.device,
    pass_: Callable[[Conv, Problem, torch.device, torch.dtype], object],
    select: Callable,
    deadline: float | None,
    backward: bool,
) -> Outcome:
    """Ours, then (parity) the reference on the same device and dtype, then (exact) float64 on the CPU.
    `deadline` (time.monotonic) is checked before each of the last two."""
    options = problem.options
    cpu = torch.device("cpu")
    with parity.tf32(options.allow_tf32, device), _intra_op_threads(problem, device):
        algorithm = _chosen_algorithm(problem, device, backward)
        ours_raw, compute_ms = _timed(device, lambda: pass_(_ours(algorithm), problem, device, problem.dtype))
        ours = select(ours_raw)
        report, reference_ms = None, 0.0
        if options.parity:
            _check_deadline(deadline, "the parity reference")
            reference_raw, reference_ms = _timed(device, lambda: pass_(parity.reference_conv, problem, device, problem.dtype))
            exact = None
            if options.exact:
                _check_deadline(deadline, "the float64 reference")
                exact = select(pass_(parity.reference_conv, problem, cpu, torch.float64))
            report = _report(problem, ours, select(reference_raw), exact)
    tensors = {name: None if value is None else value.cpu() for name, value in ours.items()}
    return Outcome(tensors, algorithm, report, {"compute": compute_ms, "reference": reference_ms})


def run_forward(problem: Problem, device: torch.device, deadline: float | None = None) -> Outcome:
    return _run(problem, device, _forward_pass, lambda output: {"output": output}, deadline, backward=False)


def run_backward(problem: Problem, device: torch.device, deadline: float | None = None) -> Outcome:
    keep = ("grad_input", "grad_weight", "grad_bias", *(("output",) if problem.options.return_output else ()))
    return _run(problem, device, _backward_pass, lambda grads: {name: grads[name] for name in keep}, deadline, backward=True)


def warm_up(device: torch.device) -> None:
    """A small forward + backward with "auto" and the reference, so the first request pays no start-up cost
    (on the CPU that includes choosing the GEMM backend, which the first conv does: a few milliseconds of
    timing, kernels/gemm.py)."""
    generator = torch.Generator().manual_seed(0)
    input = torch.randn(2, 4, 8, 8, generator=generator).to(device).requires_grad_()
    weight = torch.randn(4, 4, 3, 3, generator=generator).to(device).requires_grad_()
    kernels.conv2d(input, weight, None, 1, 1).square().mean().backward()
    parity.reference_conv(input, weight, None, 1, 1, 1, 1, "zeros").sum().backward()
    _sync(device)
