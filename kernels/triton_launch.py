"""Launching our Triton kernels with less Python per call.

Triton's launch path (the autotuner's `run`, then the JIT's argument binder) re-derives on every call
what a layer's repeated calls share: the tuned config, the specialisation and the compiled kernel.
On the H200 (bench/gpu_profile.py, 2026-11-27) our forward+backward spent ~1 ms of host time per
call against 0.1-0.2 ms of kernels, so the GPU sat idle; Triton's path was ~100 us of each launch.

`launch(kernel, grid, tensors, *scalars, **constexprs)` does what
`kernel[grid](*tensors, *scalars, **constexprs)` does. The first call with a given key goes through
Triton (tuning and compiling as usual); later calls launch the CompiledKernel Triton chose, directly.
The key holds everything a compile or a tuning choice depends on: each tensor's dtype, 16-byte
alignment and device (a compiled kernel is loaded per device), every scalar's exact value and the constexprs (scalars that vary per call would only cost
a pass through Triton's path each; ours are shapes, strides and phase offsets, fixed per layer).

Triton's launch hooks (triton.knobs.runtime.launch_enter_hook / launch_exit_hook, used by its
profilers) see only the first launch of each key. Under TRITON_INTERPRET=1 there is nothing compiled to keep, and before Triton 3.3 a CompiledKernel
takes another argument list: there every call goes through Triton.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

from kernels.memo import BoundedMemo
from kernels.triton_tuning import interpreting

# From Triton 3.3 a CompiledKernel is launched with every bound argument, constexprs included (what
# JITFunction.run passes it); older releases take another list.
_SUPPORTED = tuple(int(part) for part in triton.__version__.split(".")[:2]) >= (3, 3)
# Read once: the kernels were decorated (compiled or interpreted) when they were imported.
_INTERPRETED = interpreting()
# key -> (compiled kernel, meta-parameters for the grid, trailing argument values in parameter order)
_COMPILED = BoundedMemo(4096)


def cdiv(a: int, b: int) -> int:
    """Ceiling division on the host (triton.cdiv is a constexpr function: ~10 us a call from Python)."""
    return -(-a // b)


def launch(kernel, grid: Callable[[dict], tuple] | tuple, tensors: tuple[torch.Tensor, ...], *scalars, **constexprs) -> None:
    """`kernel[grid](*tensors, *scalars, **constexprs)`, for a kernel whose tensor parameters come first.

    `kernel` is a @triton.jit function, or one wrapped by @triton.autotune.
    """
    if _INTERPRETED or not _SUPPORTED:
        kernel[grid](*tensors, *scalars, **constexprs)
        return
    key = (id(kernel), tuple((t.dtype, t.data_ptr() % 16 == 0, t.get_device()) for t in tensors), scalars, tuple(constexprs.items()))
    found = _COMPILED.get(key)
    if found is None:
        _first_launch(kernel, grid, tensors, scalars, constexprs, key)
        return
    compiled, meta, trailing = found
    dims = (*(grid(meta) if callable(grid) else grid), 1, 1)
    active = driver.active
    stream = active.get_current_stream(active.get_current_device())
    # What CompiledKernel's own runner does, less its reads of Triton's launch-hook knobs (environment
    # look-ups, ~5 us a launch): these launches call no launch hooks.
    compiled.run(
        dims[0], dims[1], dims[2], stream, compiled.function, compiled.packed_metadata, None, None, None, *tensors, *scalars, *trailing
    )


def _first_launch(kernel, grid, tensors, scalars, constexprs, key) -> None:
    """Triton's own launch (tuning and compiling as needed), then remember the kernel it ran."""
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
    _COMPILED.remember(key, (compiled, meta, trailing))
