"""kernels/compiled.py: compiling off the caller's path, run-only calls, the cap, failures, modes.

A one-line function stands in for the kernels (compiling it takes well under a second once Inductor is
loaded); tests/kernels/test_depthwise_compiled.py runs the real ones.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch

from kernels import compiled

BODY_RUNS = []


def scaled_sum(x, y, scale: int):
    BODY_RUNS.append(scale)  # the Python body runs when traced, never when the compiled code runs
    return x * scale + y


@pytest.fixture
def fresh(needs_compiler):
    compiled.reset()
    yield
    compiled.reset()


def _operands(rows: int = 4):
    return torch.arange(rows * 3, dtype=torch.float64).view(rows, 3), torch.ones(rows, 3, dtype=torch.float64)


def test_background_mode_returns_none_until_compiled_then_runs_the_compiled_code(fresh):
    x, y = _operands()
    with compiled.mode("background"):
        first = compiled.run(scaled_sum, x, y, 2)
        assert first is None, "the first call must not wait for a compile"
        assert compiled.wait(timeout=120), "the background compile did not finish"
        result = compiled.run(scaled_sum, x, y, 2)
    stats = compiled.stats()
    assert stats["failed"] is None
    assert stats["compiled"] == 1 and stats["pending"] == 0 and stats["calls"] == 1
    torch.testing.assert_close(result, x * 2 + y)


def test_every_argument_property_is_part_of_the_key(fresh):
    """Another shape, other strides, another int argument or another dtype is another compile."""
    x, y = _operands()
    with compiled.mode("sync"):
        for args in [(x, y, 2), (x, y, 3), (*_operands(5), 2), (x.float(), y.float(), 2), (x.t(), y.t(), 2)]:
            torch.testing.assert_close(compiled.run(scaled_sum, *args), args[0] * args[2] + args[1])
    assert compiled.stats()["compiled"] == compiled.stats()["calls"] == 5


def test_calls_run_the_compiled_code_not_the_python_body(fresh):
    x, y = _operands()
    BODY_RUNS.clear()
    with compiled.mode("sync"):
        for scale in (7, 7, 7):
            torch.testing.assert_close(compiled.run(scaled_sum, x, y, scale), x * 7 + y)
    assert BODY_RUNS == [7], f"the Python body ran {len(BODY_RUNS)} times; once, to be traced, is expected"
    assert compiled.stats()["calls"] == 3


def test_off_mode_compiles_nothing_and_runs_nothing_compiled(fresh):
    x, y = _operands()
    with compiled.mode("off"):
        assert compiled.run(scaled_sum, x, y, 2) is None
    assert compiled.stats()["compiled"] == compiled.stats()["pending"] == 0
    with compiled.mode("sync"):
        assert compiled.run(scaled_sum, x, y, 2) is not None
    with compiled.mode("off"):
        assert compiled.run(scaled_sum, x, y, 2) is None
    assert compiled.stats()["calls"] == 1


def test_at_most_max_compiled_keys(fresh, monkeypatch):
    monkeypatch.setattr(compiled, "MAX_COMPILED", 1)
    x, y = _operands()
    with compiled.mode("sync"):
        assert compiled.run(scaled_sum, x, y, 2) is not None
        assert compiled.run(scaled_sum, x, y, 3) is None
    assert compiled.stats()["compiled"] == 1


def test_a_failed_compile_turns_compiling_off_for_the_process(fresh, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler\ndetails")

    monkeypatch.setattr(compiled, "_inductor_compile", broken)
    x, y = _operands()
    with compiled.mode("sync"):
        assert compiled.run(scaled_sum, x, y, 2) is None
        assert compiled.run(scaled_sum, x, y, 3) is None  # not tried again
    assert compiled.stats()["failed"] == "RuntimeError: no C++ compiler"
    assert [record.message for record in caplog.records if "torch.compile failed" in record.message], "no warning logged"
    assert compiled.stats()["compiled"] == 0


def test_sync_compiles_from_several_threads_at_once_all_succeed(fresh):
    """ "sync" compiles on the callers' threads; Inductor is not thread-safe, so they take turns (two at once failed
    with "CURRENT_PATCHER is None" and turned compiling off for the process)."""
    x, y = _operands()
    start = threading.Barrier(4)
    results, errors = {}, []

    def caller(scale: int) -> None:
        try:
            start.wait(10)
            results[scale] = compiled.run(scaled_sum, x, y, scale)
        except Exception as error:  # surfaced below
            errors.append(error)

    with compiled.mode("sync"):
        threads = [threading.Thread(target=caller, args=(scale,)) for scale in (11, 12, 13, 14)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(180)
    assert not errors, errors
    assert compiled.stats()["failed"] is None
    assert compiled.stats()["compiled"] == 4
    for scale, result in results.items():
        torch.testing.assert_close(result, x * scale + y)


def test_unknown_mode_and_argument_are_refused():
    with pytest.raises(ValueError, match="compile mode must be one of"):
        compiled.set_mode("always")
    with compiled.mode("sync"), pytest.raises(TypeError, match="tensors, ints and None"):
        compiled.run(scaled_sum, torch.ones(1), torch.ones(1), 2.5)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork: POSIX only")
def test_a_forked_child_does_not_inherit_a_held_lock(fresh):
    """A fork while the compile thread holds the lock (mid-compile) must not deadlock the child."""
    x, y = _operands()
    held, release = threading.Event(), threading.Event()

    def compile_thread_stand_in():
        with compiled._state.lock:
            held.set()
            release.wait(60)

    holder = threading.Thread(target=compile_thread_stand_in)
    holder.start()
    held.wait(10)
    child = os.fork()
    if child == 0:  # the child: queue a compile (takes the lock), then leave at once
        with compiled.mode("background"):
            compiled.run(scaled_sum, x, y, 2)
        os._exit(0)
    release.set()
    holder.join()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        done, status = os.waitpid(child, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.05)
    os.kill(child, signal.SIGKILL)
    os.waitpid(child, 0)
    pytest.fail("the forked child deadlocked on the compile lock")
