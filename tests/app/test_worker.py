"""app/worker.py on its own: one job at a time, bounded queue, deadlines, abandoned jobs never run."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from app.errors import DeadlineExceeded, OutOfDeviceMemory, Unavailable
from app.worker import ClientGone, DeviceWorker

pytestmark = pytest.mark.anyio

CPU = torch.device("cpu")


async def started(queue_size: int = 4) -> DeviceWorker:
    worker = DeviceWorker(CPU, queue_size)
    await worker.start()
    return worker


def far() -> float:
    return time.monotonic() + 30


async def test_setup_runs_first_then_ready() -> None:
    seen = []
    worker = DeviceWorker(CPU, 2)
    await worker.start(lambda device: seen.append(device))
    assert worker.ready and seen == [CPU]
    await worker.stop()


async def test_failed_setup_marks_the_worker_unusable() -> None:
    def broken(device):
        raise RuntimeError("no device")

    worker = DeviceWorker(CPU, 2)
    await worker.start(broken)
    assert not worker.ready and not worker.healthy
    with pytest.raises(Unavailable):
        worker.submit(lambda device: None, far())
    await worker.stop()


async def test_jobs_run_one_at_a_time_off_the_event_loop() -> None:
    worker = await started()
    active, overlap, threads = [0], [False], set()

    def job(device):
        active[0] += 1
        overlap[0] |= active[0] > 1
        threads.add(threading.get_ident())
        time.sleep(0.02)
        active[0] -= 1
        return device

    results = await asyncio.gather(*(worker.run(job, far()) for _ in range(4)))
    assert results == [CPU] * 4 and not overlap[0]
    assert threads and threading.get_ident() not in threads
    await worker.stop()


async def test_full_queue_is_503_with_retry_after() -> None:
    worker = DeviceWorker(CPU, 1, retry_after_s=7)
    await worker.start()
    release = threading.Event()
    worker.submit(lambda device: release.wait(5), far())
    await asyncio.sleep(0.05)  # the consumer takes it off the queue
    worker.submit(lambda device: None, far())
    with pytest.raises(Unavailable) as raised:
        worker.submit(lambda device: None, far())
    assert raised.value.headers == {"Retry-After": "7"}
    release.set()
    await worker.stop()


async def test_abandoned_job_is_dropped_without_running() -> None:
    """A request whose client went away (or whose deadline passed) while queued never runs."""
    worker = await started()
    release = threading.Event()
    ran = []
    worker.submit(lambda device: release.wait(5), far())
    gone = asyncio.Event()

    async def is_disconnected() -> bool:
        return gone.is_set()

    waiting = asyncio.create_task(worker.run(lambda device: ran.append(1), far(), is_disconnected))
    await asyncio.sleep(0.05)
    gone.set()
    with pytest.raises(ClientGone):
        await waiting
    release.set()
    await worker.run(lambda device: None, far())
    assert ran == [] and worker.dropped == 1
    await worker.stop()


async def test_deadline_while_queued_is_504_and_dropped() -> None:
    worker = await started()
    release = threading.Event()
    ran = []
    worker.submit(lambda device: release.wait(5), far())
    with pytest.raises(DeadlineExceeded):
        await worker.run(lambda device: ran.append(1), time.monotonic() + 0.1)
    release.set()
    await worker.run(lambda device: None, far())
    assert ran == [] and worker.dropped == 1
    await worker.stop()


async def test_out_of_memory_is_507_and_the_worker_keeps_serving() -> None:
    worker = await started()

    def oom(device):
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(OutOfDeviceMemory):
        await worker.run(oom, far())
    assert await worker.run(lambda device: 42, far()) == 42
    assert worker.healthy
    await worker.stop()


async def test_job_errors_reach_the_caller() -> None:
    worker = await started()

    def bad(device):
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        await worker.run(bad, far())
    await worker.stop()
