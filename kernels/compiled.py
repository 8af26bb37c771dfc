"""Functions compiled by Inductor (torch.compile's C++ backend on CPU) for exact problems, compiled off the caller's path.

Why: a conv built from torch ops makes one memory pass per op. Where the arithmetic is light (a depthwise
conv: one multiply-add per tap and pixel) those passes are the cost (docs/performance.md, rounds 10-11);
Inductor turns the same tap sum into one vectorised loop nest that reads each operand once.

Compiling costs seconds (here: ~6 s to load Inductor the first time, then 0.3-10 s per graph, less when
Inductor's on-disk cache has it), so it must never happen inside a request:

- A caller calls `run(function, *args)`: it runs the code compiled for those arguments' shapes, strides
  and dtypes (ints by value) and the caller's thread count, or returns None: the caller takes its eager
  path, and the key is queued for one background thread, which compiles it with example inputs of the
  same kind.
- The function is traced to aten ops (make_fx) and handed to Inductor directly (`torch._inductor.compile`),
  not through Dynamo: the key is the guard, so a call costs no guard evaluation (Dynamo's run-only wrapper
  cost ~40-50 us a call, a fifth of a batch-1 depthwise forward). The function must therefore be fixed
  by its key: no branches on tensor values, no state read from outside its arguments.
- At most `MAX_COMPILED` keys per process are compiled (each costs seconds of CPU once); later keys stay
  eager. The first failure (no C++ compiler, say) turns compiling off for the process, with one warning:
  the eager paths are always there.

Modes (`set_mode`; the service's CONV_COMPILE): "background" (the default), "sync" (compile on the
calling thread: benchmarks and tests that must know which code ran), "off" (eager only, even for keys
already compiled).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable
from contextlib import contextmanager

import torch

log = logging.getLogger(__name__)

MODES = ("background", "sync", "off")
MAX_COMPILED = 64
DTYPES = (torch.float32, torch.float64)


class _State:
    def __init__(self) -> None:
        self.mode = "background"
        self.lock = threading.Condition()
        # Held while Inductor compiles: it is not thread-safe (two threads compiling at once failed with "CURRENT_PATCHER
        # is None", which turned compiling off for the process), and "sync" mode compiles on the callers' threads.
        self.compiling = threading.Lock()
        self.ready: dict[tuple, Callable] = {}
        self.pending: set[tuple] = set()
        self.failed: str | None = None  # why compiling is off for this process
        self.calls = 0  # of compiled code (not locked: a count for tests and /info)
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.worker: threading.Thread | None = None


_state = _State()


def _after_fork_in_child() -> None:
    """A forked child (a DataLoader worker, say) has no compile thread, and a lock the parent's compile
    thread held at the fork would never be released: it starts with fresh ones, keeping what is compiled."""
    _state.lock = threading.Condition()
    _state.compiling = threading.Lock()
    _state.queue = queue.SimpleQueue()
    _state.worker = None
    _state.pending = set()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def set_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"compile mode must be one of {list(MODES)}, got {mode!r}")
    _state.mode = mode


def get_mode() -> str:
    return _state.mode


@contextmanager
def mode(name: str):
    """Run a block under another mode (tests, benchmarks)."""
    previous = get_mode()
    set_mode(name)
    try:
        yield
    finally:
        set_mode(previous)


def run(function: Callable, *args) -> object | None:
    """function(*args) computed by the code compiled for these arguments, or None where there is none (yet).

    Arguments are tensors (CPU), ints and None. Without compiled code the key is queued (or, in "sync"
    mode, compiled here), and the caller takes its eager path. Call it with grad mode off.
    """
    compiled = _lookup(function, args)
    if compiled is None:
        return None
    _state.calls += 1
    return compiled(*args)


def ready(function: Callable, *args) -> bool:
    """Whether `run(function, *args)` would run compiled code; if not, its key is queued as by `run`.

    Tensors may be on the meta device (only shapes, strides and dtypes count): a caller with several
    stages asks for all of them before computing anything, so one call queues every stage's compile.
    """
    return _lookup(function, args) is not None


def _lookup(function: Callable, args: tuple) -> Callable | None:
    if _state.mode == "off":
        return None
    key = (function, tuple(_signature(arg) for arg in args), torch.get_num_threads())
    compiled = _state.ready.get(key)
    if compiled is not None or _state.failed is not None:
        return compiled
    with _state.lock:
        if key in _state.pending or len(_state.ready) + len(_state.pending) >= MAX_COMPILED:
            return None
        _state.pending.add(key)
    if _state.mode == "sync":
        _compile(key)
        return _state.ready.get(key)
    _state.queue.put(key)
    _start_worker()
    return None


def _signature(arg) -> tuple | int | None:
    if isinstance(arg, torch.Tensor):
        if arg.device.type not in ("cpu", "meta"):
            raise ValueError(f"compiled.run takes CPU tensors, got one on {arg.device}")
        return (tuple(arg.shape), arg.stride(), arg.dtype)
    if arg is None or isinstance(arg, int):
        return arg
    raise TypeError(f"compiled.run takes tensors, ints and None, got {type(arg).__name__}")


def _example(signature: tuple) -> torch.Tensor:
    """A tensor like the one `signature` describes (values are irrelevant: the code has no data-dependent branches)."""
    shape, stride, dtype = signature
    return torch.empty_strided(shape, stride, dtype=dtype).zero_()


def takes(tensor: torch.Tensor, channels_last: bool = False) -> bool:
    """Whether a compiled path may take this tensor: CPU, float32/64, contiguous (or channels-last, for a caller that
    copies it to NCHW itself), grad mode off (the compiled code records no autograd graph), and not while
    torch.compile traces the caller (it compiles the eager path itself)."""
    return (
        tensor.device.type == "cpu"
        and tensor.dtype in DTYPES
        and (tensor.is_contiguous() or (channels_last and tensor.dim() == 4 and tensor.is_contiguous(memory_format=torch.channels_last)))
        and not torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
    )


def available() -> bool:
    """Whether compiled code can be had in this process (mode not "off", no failure); `auto` reads it."""
    return _state.mode != "off" and _state.failed is None


def wait(timeout: float | None = None) -> bool:
    """Block until nothing is queued or compiling; False if `timeout` seconds passed first."""
    with _state.lock:
        return _state.lock.wait_for(lambda: not _state.pending, timeout)


def stats() -> dict:
    """{"mode", "compiled", "pending", "calls" (of compiled code), "failed"} for /info, tests and benchmarks."""
    with _state.lock:
        return {
            "mode": _state.mode,
            "compiled": len(_state.ready),
            "pending": len(_state.pending),
            "calls": _state.calls,
            "failed": _state.failed,
        }


def reset() -> None:
    """Forget every compiled function and a past failure (tests). Not while a compile is queued."""
    wait()
    with _state.lock:
        _state.ready.clear()
        _state.failed = None
        _state.calls = 0


def _start_worker() -> None:
    with _state.lock:
        if _state.worker is None or not _state.worker.is_alive():
            _state.worker = threading.Thread(target=_work, name="conv-compile", daemon=True)
            _state.worker.start()


def _work() -> None:
    while True:
        _compile(_state.queue.get())


def _compile(key: tuple) -> None:
    try:
        with _state.compiling:
            compiled = None if _state.failed else _build(*key)
    except Exception as error:  # any failure: the eager paths stay, compiling stops for this process
        reason = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
        log.warning("torch.compile failed (%s); CPU kernels stay on their eager paths in this process", reason)
        compiled = None
        with _state.lock:
            _state.failed = reason
    with _state.lock:
        if compiled is not None:
            _state.ready[key] = compiled
        _state.pending.discard(key)
        _state.lock.notify_all()


def _build(function: Callable, signatures: tuple, threads: int) -> Callable:
    """Trace `function` for arguments like `signatures` and compile it; the result takes the same arguments."""
    slots = [index for index, signature in enumerate(signatures) if isinstance(signature, tuple)]
    examples = [_example(signatures[index]) for index in slots]

    def on_tensors(*tensors):
        args = list(signatures)  # ints and None as they were; tensors in their slots
        for index, tensor in zip(slots, tensors):
            args[index] = tensor
        return function(*args)

    # Inductor writes the thread count into the generated code, and a new thread's OpenMP default is not
    # the caller's: compile with the caller's (OpenMP's and MKL's counts are per thread: this one's only).
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    with torch.no_grad():
        compiled = _inductor_compile(on_tensors, examples)

    def call(*args):
        return compiled(*(args[index] for index in slots))

    return call


def _inductor_compile(function: Callable, examples: list[torch.Tensor]) -> Callable:
    """function's aten graph for `examples`, compiled by Inductor. Imported here: loading Inductor takes
    seconds, and most processes never compile."""
    import torch._inductor
    from torch.fx.experimental.proxy_tensor import make_fx

    return torch._inductor.compile(make_fx(function)(*examples), examples)
