"""Whether a process runs: for the body parser's helpers (app/parsing.py) and the server processes whose
metrics share a directory (app/metrics.py)."""

from __future__ import annotations

import os


def alive(pid: int) -> bool:
    """Whether `pid` runs: not gone, and not a zombie (a child's exit is reaped only when its parent notices)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # someone else's process
            return True
        return True
