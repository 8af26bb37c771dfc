"""Launching our Triton kernels with less Python per call.

Triton's launch path (the autotuner's `run`, then the JIT's argument binder) re-derives on every call
what a layer's repeated calls share: the tuned config, the specialisation and the compiled kernel.
On the H200 (bench/gpu_profile.py, 2026-11-27) our forward+backward spent ~1 ms of host time per
call against 0.1-0.2 ms of kernels, so the GPU sat idle; Triton's path was ~100 us of each launch.

A `Launch` is one kernel launch with everything but its tensors fixed: `Launch(kernel, grid, scalars,
constexprs)(*tensors)` does what `kernel[grid](*tensors, *scalars, **constexprs)` does. The launchers
(kernels/triton_fwd.py and the rest) build their Launches once per layer, in plans cached on what a
compile depends on besides alignment: shapes, strides, dtypes, device, precision. So per call only
each tensor's 16-byte alignment is read (Triton compiles aligned pointers into vector loads). The first
call with a given alignment goes through Triton (tuning and compiling as usual); later calls launch the
CompiledKernel Triton chose, directly, with the grid it had.

Triton's launch hooks (triton.knobs.runtime.launch_enter_hook / launch_exit_hook, used by its
profilers) see only the first launch of each alignment. Under TRITON_INTERPRET=1 there is nothing
compiled to keep, and before Triton 3.3 a CompiledKernel takes another argument list: there every
call goes through Triton.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

from kernels.triton_tuning import interpreting

# From Triton 3.3 a CompiledKernel is launched with every bound argument, constexprs included (what
# JITFunction.run passes it); older releases take another list.
_SUPPORTED = tuple(int(part) for part in triton.__version__.split(".")[:2]) >= (3, 3)
# Read once: the kernels were decorated (compiled or interpreted) when they were imported.
_INTERPRETED = interpreting()


def cdiv(a: int, b: int) -> int:
    """Ceiling division on the host (triton.cdiv is a constexpr function: ~10 us a call from Python)."""
    return -(-a // b)


class Launch:
    """`kernel[grid](*tensors, *scalars, **constexprs)` with all but the tensors fixed.

    `kernel` is a @triton.jit function, or one wrapped by @triton.autotune, whose tensor parameters
    come first. Whoever makes a Launch keeps it for one set of tensor dtypes on one device and one
    value of everything `grid` reads (a layer's plan is keyed on them): of what Triton specialises
    on, only the tensors' 16-byte alignment is read per call.
    """

    __slots__ = ("kernel", "grid", "scalars", "constexprs", "_ready")

    def __init__(self, kernel, grid: Callable[[dict], tuple] | tuple, scalars: tuple, constexprs: dict) -> None:
        self.kernel, self.grid, self.scalars, self.constexprs = kernel, grid, scalars, constexprs
        self._ready: dict[int, tuple] = {}  # alignment bits -> (compiled kernel, grid dims, trailing arguments)

    def __call__(self, *tensors: torch.Tensor) -> None:
        if _INTERPRETED or not _SUPPORTED:
            self.kernel[self.grid](*tensors, *self.scalars, **self.constexprs)
            return
        aligned = 0
        for tensor in tensors:
            aligned = aligned + aligned + (tensor.data_ptr() % 16 == 0)
        ready = self._ready.get(aligned)
        if ready is None:
            self._ready[aligned] = _first_launch(self.kernel, self.grid, tensors, self.scalars, self.constexprs)
            return
        compiled, (grid_x, grid_y, grid_z), trailing = ready
        active = driver.active
        stream = active.get_current_stream(active.get_current_device())
        # What CompiledKernel's own runner does, less its reads of Triton's launch-hook knobs (environment
        # look-ups, ~5 us a launch): these launches call no launch hooks.
        compiled.run(
            grid_x,
            grid_y,
            grid_z,
            stream,
            compiled.function,
            compiled.packed_metadata,
            None,
            None,
            None,
            *tensors,
            *self.scalars,
            *trailing,
        )


def _first_launch(kernel, grid, tensors, scalars, constexprs) -> tuple:
    """Triton's own launch (tuning and compiling as needed); returns (the kernel it ran, grid dims, trailing arguments)."""
    args = (*tensors, *scalars)
    kernel[grid](*args, **constexprs)
    jit_fn = kernel if isinstance(kernel, JITFunction) else kernel.fn  # an Autotuner wraps the JITFunction
    config = getattr(kernel, "best_config", None)
    meta = {**constexprs, **(config.kwargs if config is not None else {})}
    options = {**constexprs, **(config.all_kwargs() if config is not None else {})}
    compiled = jit_fn.warmup(*args, grid=grid, **options)  # found in Triton's cache: no compile
    names = jit_fn.arg_names[len(args) :]
    defaults = [param.default for param in jit_fn.params[len(args) :]]
    trailing = tuple(meta[name] if name in meta else default for name, default in zip(names, defaults))
    dims = (*(grid(meta) if callable(grid) else grid), 1, 1)[:3]
    return compiled, dims, trailing
