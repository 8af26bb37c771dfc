"""app/memory.py: the glibc malloc settings the server applies at start-up (CONV_MALLOC_REUSE)."""

from __future__ import annotations

import platform
import time

import pytest

from app import memory


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_mallopt_accepts_the_settings() -> None:
    assert memory.keep_freed_memory() is True


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_a_freed_megabyte_buffer_is_reused_without_page_faults() -> None:
    """The point of the settings: the second 6 MB buffer comes back already mapped (no minor faults)."""
    import resource

    memory.keep_freed_memory()
    size = 6 << 20
    first = bytearray(size)
    del first
    faults = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    start = time.perf_counter()
    second = bytearray(size)  # zero-filled: touches every page
    elapsed = time.perf_counter() - start
    new_faults = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - faults
    assert len(second) == size
    assert new_faults < (size >> 12) // 4, f"{new_faults} page faults for a reused {size >> 20} MiB buffer ({elapsed * 1e3:.1f} ms)"
