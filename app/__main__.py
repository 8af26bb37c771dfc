"""`python -m app`: serve app.main:app with uvicorn on CONV_HOST:CONV_PORT, in CONV_PROCESSES processes."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile

import uvicorn

from app.config import METRICS_DIR_VARIABLE, get_settings
from app.http import BoundedHttpToolsProtocol


def main() -> None:
    settings = get_settings()
    if settings.processes > 1 and "OMP_NUM_THREADS" not in os.environ:
        # Read by torch when each worker process imports it: the processes share the cores, not oversubscribe them.
        os.environ["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // settings.processes))
    shared_dir = _shared_metrics_dir() if settings.processes > 1 and not os.environ.get(METRICS_DIR_VARIABLE) else None
    try:
        _serve(settings)
    finally:
        if shared_dir:
            shutil.rmtree(shared_dir, ignore_errors=True)


def _shared_metrics_dir() -> str | None:
    """A fresh directory where the worker processes keep their metrics, so /metrics can sum them (app/metrics.py)."""
    try:
        path = os.environ[METRICS_DIR_VARIABLE] = tempfile.mkdtemp(prefix="conv-metrics-")
    except OSError as error:  # no writable temp dir: the service still runs, each /metrics shows one process
        logging.getLogger("app").warning("CONV_PROCESSES > 1 but no directory for shared metrics (%s): /metrics shows one process", error)
        return None
    return path


def _serve(settings) -> None:
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
