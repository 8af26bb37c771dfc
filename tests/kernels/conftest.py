"""Fixtures for the kernel tests."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import kernels
from kernels import compiled
from tests.kernels.cases import has_cxx


@pytest.fixture(scope="package", autouse=True)
def single_thread():
    """Run the kernel tests on one intra-op thread, then restore the count.

    Every problem here is tiny; with several OpenMP threads on a 2-core runner shared with other
    jobs, threads spin-wait on each other and every op gets ~10x slower (measured: 34 s vs 3.5 s
    of CPU time for the parity grid).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="package", autouse=True)
def eager_unless_asked():
    """No background compiles here (kernels/compiled.py): a test's result must not depend on whether a
    compile in another thread finished first. The compiled path's own tests ask for "sync" mode."""
    with compiled.mode("off"):
        yield


@pytest.fixture
def needs_compiler():
    """Inductor needs a C++ compiler (CI machines have gcc); without one these tests skip, saying why."""
    if not has_cxx():
        pytest.skip("no C++ compiler here: Inductor cannot compile (kernels/compiled.py)")


@pytest.fixture
def compile_sync(needs_compiler):
    """Compile on the test's own thread (kernels/compiled.py "sync"), stats from zero."""
    compiled.reset()
    with compiled.mode("sync"):
        yield
    compiled.reset()


@pytest.fixture
def restore_limits():
    """kernels' limits as they were before the test, checked."""
    saved = kernels.get_limits()
    yield
    kernels.set_limits(**dataclasses.asdict(saved))
    assert kernels.get_limits() == saved


@pytest.fixture
def restore_threads():
    """The intra-op thread count as it was before the test (tests that set it for `auto`'s thread rules)."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
