"""The device worker: one per device, the only thing that runs computations on it.

Lifecycle (as LitServe's): `start()` launches the consumer and runs `setup` (a warm-up) through it;
`ready` turns true when that succeeds. Requests `run(fn, deadline)`: the job waits in a bounded
asyncio queue (full -> 503 + Retry-After) and runs, one at a time, on the worker's single thread, so
the event loop never blocks on device work. A job whose caller has gone (deadline, client disconnect,
cancellation) gives its queue slot back at once and is dropped without running when its turn comes;
`dropped` counts those.

Memory: an out-of-memory error frees the allocator cache and answers 507; the worker keeps serving.
Any other CUDA error leaves the context unusable: the worker marks itself unhealthy and answers 503.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from app.errors import ClientGone, DeadlineExceeded, OutOfDeviceMemory, Unavailable

log = logging.getLogger("app.worker")

DeviceFn = Callable[[torch.device], Any]
# How often a waiting request checks whether its client is still there.
_DISCONNECT_POLL_S = 0.1
# Triton compiles its kernels during the first CUDA warm-up; that can take minutes.
_SETUP_TIMEOUT_S = 900


@dataclass(eq=False)
class Job:
    fn: DeviceFn | None
    deadline: float
    future: asyncio.Future
    enqueued_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None
    abandoned: bool = False
    running: asyncio.Future | None = None  # the computation on the worker's thread, once started


def _is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(error, RuntimeError) and ("out of memory" in str(error) or "can't allocate memory" in str(error))


# torch.AcceleratorError exists from torch 2.8; older releases raise a RuntimeError("CUDA error: ...").
_ACCELERATOR_ERRORS = (torch.AcceleratorError,) if hasattr(torch, "AcceleratorError") else ()


def _is_device_fault(error: BaseException) -> bool:
    return isinstance(error, _ACCELERATOR_ERRORS) or (isinstance(error, RuntimeError) and str(error).startswith("CUDA error"))


class DeviceWorker:
    """Runs `fn(device)` jobs one at a time on its own thread, from a queue of at most `queue_size`."""

    def __init__(self, device: torch.device, queue_size: int, retry_after_s: int = 1) -> None:
        self.device = device
        self.name = str(device)
        self.retry_after_s = retry_after_s
        self.ready = False
        self.healthy = True
        self.dropped = 0
        self.completed = 0
        self.busy = False
        self.queue_size = queue_size
        # Admission counts live jobs only (`_waiting`): a job abandoned while queued frees its slot at
        # once, though its (emptied) entry stays in the unbounded asyncio queue until the consumer skips it.
        self._waiting = 0
        self._queue: asyncio.Queue[Job] = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"conv-{self.name}")
        self._consumer: asyncio.Task | None = None

    @property
    def queue_depth(self) -> int:
        return self._waiting

    def start(self, setup: DeviceFn | None = None) -> asyncio.Task:
        """Start consuming; `setup` (the warm-up) runs as the first job. -> the task that sets `ready`."""
        self._consumer = asyncio.create_task(self._serve(), name=f"worker-{self.name}")
        return asyncio.create_task(self._set_up(setup), name=f"setup-{self.name}")

    async def _set_up(self, setup: DeviceFn | None) -> None:
        try:
            if setup is not None:
                await self.run(setup, deadline=time.monotonic() + _SETUP_TIMEOUT_S)
        except Exception:
            log.exception("warm-up failed on %s; the device is marked unusable", self.name)
            self.healthy = False
            return
        self.ready = True
        log.info("worker %s ready", self.name)

    async def stop(self) -> None:
        self.ready = False
        if self._consumer is not None:
            self._consumer.cancel()
            try:
                await self._consumer
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=False, cancel_futures=True)

    def check_room(self) -> None:
        """503 when the device is unusable or its queue is full (what `submit` would answer)."""
        if not self.healthy:
            raise Unavailable(f"device {self.name} is unusable after a device error; the service needs a restart", self.retry_after_s)
        if self._waiting >= self.queue_size:
            raise Unavailable(f"the {self.name} queue is full ({self.queue_size} waiting); retry later", self.retry_after_s)

    def submit(self, fn: DeviceFn, deadline: float) -> Job:
        """Queue `fn`; 503 when the device is unusable or the queue is full."""
        self.check_room()
        job = Job(fn, deadline, asyncio.get_running_loop().create_future())
        self._queue.put_nowait(job)
        self._waiting += 1
        return job

    async def run(
        self,
        fn: DeviceFn,
        deadline: float,
        is_disconnected: Callable[[], Awaitable[bool]] | None = None,
        outlives: Callable[[asyncio.Future], None] | None = None,
    ) -> Any:
        """Queue `fn`, wait for its result; 504 past `deadline`, ClientGone when `is_disconnected()` says so.

        A running computation cannot be stopped: when the caller leaves while it runs, `outlives` gets the
        future that completes when it ends (app/admission.py keeps the request's memory held until then)."""
        job = self.submit(fn, deadline)
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    where = "queued" if job.started_at is None else "still running"
                    raise DeadlineExceeded(f"the request did not finish within its deadline ({where} on {self.name})")
                wait = min(remaining, _DISCONNECT_POLL_S) if is_disconnected is not None else remaining
                done, _ = await asyncio.wait({job.future}, timeout=wait)
                if done:
                    return job.future.result()
                if is_disconnected is not None and await is_disconnected():
                    raise ClientGone()
        finally:
            if not job.future.done():
                # Still queued: its slot is free now and the consumer drops it. Running: its result is discarded.
                if job.started_at is None and not job.abandoned:
                    self._waiting -= 1
                    job.fn = None  # the request's tensors are not kept alive by a dead entry
                elif job.running is not None and outlives is not None:
                    outlives(job.running)
                job.abandoned = True
                job.future.cancel()

    def run_inline(self, fn: DeviceFn, deadline: float) -> Any:
        """Run `fn` on the calling thread, outside the queue, with the same error translation as a queued job
        (and the same 504 when the deadline has already passed). For problems so small that the hand-off
        to the worker thread would cost more than the work."""
        if time.monotonic() > deadline:
            raise DeadlineExceeded(f"the request's deadline passed before it could run on {self.name}")
        try:
            return self._call(fn)
        finally:
            self.completed += 1

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            job = await self._queue.get()
            if not job.abandoned:
                self._waiting -= 1
            if job.abandoned or job.fn is None or job.future.done() or time.monotonic() > job.deadline:
                self.dropped += 1
                if not job.future.done():
                    job.future.set_exception(DeadlineExceeded(f"the request waited past its deadline in the {self.name} queue"))
                continue
            job.started_at = time.monotonic()
            self.busy = True
            try:
                job.running = loop.run_in_executor(self._executor, self._call, job.fn)
                result = await job.running
            except asyncio.CancelledError:
                raise
            except BaseException as error:  # noqa: BLE001 - handed to the waiting request
                if not job.future.done():
                    job.future.set_exception(error)
            else:
                if not job.future.done():
                    job.future.set_result(result)
            finally:
                self.busy = False
                self.completed += 1

    def _call(self, fn: DeviceFn) -> Any:
        try:
            return fn(self.device)
        except Exception as error:
            if _is_out_of_memory(error):
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                log.warning("out of memory on %s; cache freed, worker continues", self.name)
                raise OutOfDeviceMemory(
                    f"{self.name} ran out of memory for this request; try a smaller batch or a smaller workspace"
                ) from None
            if self.device.type == "cuda" and _is_device_fault(error):
                self.healthy = False
                log.error("device fault on %s; marking it unusable: %s", self.name, error)
                raise Unavailable(f"device {self.name} failed: {error}", self.retry_after_s) from None
            raise
