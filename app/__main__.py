"""`python -m app`: serve app.main:app with uvicorn on CONV_HOST:CONV_PORT, in CONV_PROCESSES processes."""

from __future__ import annotations

import os

import uvicorn

from app.config import get_settings
from app.http import BoundedHttpToolsProtocol


def main() -> None:
    settings = get_settings()
    if settings.processes > 1 and "OMP_NUM_THREADS" not in os.environ:
        # Read by torch when each worker process imports it: the processes share the cores, not oversubscribe them.
        os.environ["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // settings.processes))
    uvicorn.run(
        "app.main:app",
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=settings.log_level in ("debug", "trace"),
        workers=settings.processes,
        timeout_keep_alive=settings.keep_alive_s,
        http=BoundedHttpToolsProtocol,  # bounds on the request head's size and time (app/http.py)
    )


if __name__ == "__main__":
    main()
