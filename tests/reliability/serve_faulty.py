"""`python -m tests.reliability.serve_faulty`: `python -m app` with the test-only faulty algorithms registered."""

from __future__ import annotations

import sys

import tests.reliability.faulty  # noqa: F401  (registers fault_sleep, fault_raise, fault_oom before the app imports kernels' names)
from app.__main__ import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
