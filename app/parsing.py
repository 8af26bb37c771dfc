"""Body -> Problem, in a helper process for big bodies so the event loop never waits on the GIL.

orjson and numpy's list conversion hold the GIL for their whole call (about 0.4 s for a 17 MB body
of nested lists): in a thread of the server that stalls every other request, /healthz included.
Bodies of at least `PROCESS_MIN_BYTES` are therefore parsed in a small spawn-started process pool
(CONV_PARSE_PROCESSES; 0 parses in threads). Tensors come back as numpy arrays, which pickle by
value through the pipe (torch tensors would go through /dev/shm, small in containers).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import numpy as np
import orjson
import torch
from starlette.concurrency import run_in_threadpool

from app.config import Settings
from app.errors import MalformedBody, Unavailable
from app.problem import Problem, parse_problem
from app.processes import alive

log = logging.getLogger("app.parsing")

PROCESS_MIN_BYTES = 1 << 20
# Below this a body parses in well under a millisecond: cheaper on the event loop than a thread hop.
INLINE_MAX_BYTES = 64 << 10
# How often a request waiting on a helper process checks that the helpers are alive (`_answer`).
HELPER_CHECK_S = 1.0
_TENSORS = ("input", "weight", "bias", "grad_output")
# Numbers in JSON lists are about one comma per 10-20 bytes; base64 tensors have none. A body sparser
# in commas than this is mostly base64: orjson reads it as one string at memory speed, so parsing it in
# the threadpool beats pickling its tensors back from a helper (measured on 8x64x56x56 base64:
# 44 ms in-process vs 89 ms through the helper).
LIST_COMMAS_PER_BYTE = 1 / 64


def _mostly_numbers(body: bytes) -> bool:
    """Whether a body's cost is number parsing (nested lists / flat data), which holds the GIL long."""
    return body.count(b",") > len(body) * LIST_COMMAS_PER_BYTE


def parse_json(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise MalformedBody(f"the body is not valid JSON: {error}") from None


def parse_body(body: bytes, backward: bool, settings: Settings, devices: list[str], default_device: str) -> Problem:
    return parse_problem(parse_json(body), backward, settings, devices, default_device)


def _to_numpy(tensor: torch.Tensor | None) -> np.ndarray | None:
    if tensor is None:
        return None
    # numpy has no bfloat16: its bits travel as int16 and are viewed back (the Problem keeps its dtype).
    return (tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor).numpy()


def _from_numpy(array: np.ndarray | None, dtype: torch.dtype) -> torch.Tensor | None:
    if array is None:
        return None
    tensor = torch.from_numpy(array)
    return tensor.view(dtype) if dtype == torch.bfloat16 else tensor


def _parse_remote(body: bytes, backward: bool, settings: Settings, devices: list[str], default_device: str) -> dict:
    """Runs in the helper process: the Problem's fields, tensors as numpy arrays."""
    problem = parse_body(body, backward, settings, devices, default_device)
    fields = {field.name: getattr(problem, field.name) for field in dataclasses.fields(problem)}
    return {**fields, **{name: _to_numpy(fields[name]) for name in _TENSORS}}


def _ready() -> bool:
    return True


def _exit_with_parent(parent_pid: int) -> None:
    """Helper-process initializer: exit when the server process is gone (even after a SIGKILL).

    A pool worker holds both ends of its task pipe, so it never sees end-of-file when the server dies.
    """

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


async def _answer(pool: ProcessPoolExecutor, future: asyncio.Future) -> Any:
    """The helper's answer to `future`, or BrokenProcessPool when a helper is gone and the pool cannot say so.

    A helper that dies while writing its answer back (the OOM killer, a kill -9) leaves the pool's manager
    thread reading half a message forever: the pool never turns broken, and the request, and every later big
    one, waited with no end, holding its memory (seen in a concurrency audit). So every HELPER_CHECK_S the
    wait looks at the helpers; one dead for a whole period more, with no answer, abandons the pool.
    """
    while True:
        done, _ = await asyncio.wait({future}, timeout=HELPER_CHECK_S)
        if done:
            return future.result()
        processes = list(getattr(pool, "_processes", None) or {})  # private to the executor; without it, no check
        if all(alive(pid) for pid in processes):
            continue
        done, _ = await asyncio.wait({future}, timeout=HELPER_CHECK_S)  # the pool's own detection comes first
        if done:
            return future.result()
        # Private executor attributes (missing: nothing to unblock), read before shutdown() drops the thread's.
        thread, results = getattr(pool, "_executor_manager_thread", None), getattr(pool, "_result_queue", None)
        pool.shutdown(wait=False, cancel_futures=True)
        future.cancel()  # what the pool reports for it once unblocked is nobody's to read
        if thread is not None and results is not None:
            threading.Thread(target=_unblock, args=(thread, results), name="parser-unblock", daemon=True).start()
        raise BrokenProcessPool("a body parser process died while answering")


def _unblock(thread: threading.Thread, results: Any) -> None:
    """Feed an abandoned pool's result pipe zeros until its manager `thread` has read past the half message: the
    bytes do not unpickle, so the thread marks the pool broken and ends (blocked, it would stop the server
    process from ever exiting: the interpreter joins it)."""
    descriptor = results._writer.fileno()
    os.set_blocking(descriptor, False)
    zeros, deadline = bytes(1 << 16), time.monotonic() + 60
    while thread.is_alive() and time.monotonic() < deadline:
        try:
            os.write(descriptor, zeros)
        except BlockingIOError:
            time.sleep(0.01)
        except OSError:
            return


class BodyParser:
    """Parses bodies: tiny ones inline, up to 1 MiB (or mostly base64) in the threadpool, big number-heavy ones in a process pool."""

    def __init__(self, processes: int) -> None:
        self.processes = processes
        self.ready = processes == 0
        self._pool: ProcessPoolExecutor | None = None

    async def start(self) -> None:
        """Spawn the helper processes and wait until they have imported torch, so no request pays for it."""
        if self.processes == 0:
            return
        self._pool = self._new_pool()
        loop = asyncio.get_running_loop()
        await asyncio.gather(*(loop.run_in_executor(self._pool, _ready) for _ in range(self.processes)))
        self.ready = True

    def _new_pool(self) -> ProcessPoolExecutor:
        context = multiprocessing.get_context("spawn")
        return ProcessPoolExecutor(self.processes, mp_context=context, initializer=_exit_with_parent, initargs=(os.getpid(),))

    async def stop(self) -> None:
        """Stop the helper processes and wait for them to exit (a parse in progress finishes first)."""
        self.ready = False
        if self._pool is not None:
            await asyncio.to_thread(self._pool.shutdown, wait=True, cancel_futures=True)
            self._pool = None

    async def parse(self, body: bytes, backward: bool, settings: Settings, devices: list[str], default_device: str) -> Problem:
        if len(body) <= INLINE_MAX_BYTES:
            return parse_body(body, backward, settings, devices, default_device)
        if self._pool is None or not self.ready or len(body) < PROCESS_MIN_BYTES or not _mostly_numbers(body):
            return await run_in_threadpool(parse_body, body, backward, settings, devices, default_device)
        loop = asyncio.get_running_loop()
        pool = self._pool
        try:
            fields = await _answer(pool, loop.run_in_executor(pool, _parse_remote, body, backward, settings, devices, default_device))
        except BrokenProcessPool:
            log.error("the body parser process died; starting a new one")
            self._pool = self._new_pool()
            raise Unavailable("the body parser restarted while handling this request; retry") from None
        dtype = fields["dtype"]
        return Problem(**{**fields, **{name: _from_numpy(fields[name], dtype) for name in _TENSORS}})
