"""`python -m app`: serve app.main:app with uvicorn on CONV_HOST:CONV_PORT, in CONV_PROCESSES processes."""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile

import uvicorn
from pydantic import ValidationError

from app.config import METRICS_DIR_VARIABLE, describe_errors, describe_settings, get_settings
from app.http import BoundedHttpToolsProtocol

USAGE = """usage: python -m app

Serves conv-as-a-service (app.main:app) with uvicorn. It takes no arguments: every setting is a CONV_*
environment variable, e.g. CONV_PORT=9000 python -m app. A bad value stops it before it starts.
"""


def main(arguments: list[str]) -> int:
    """The exit status: 0 after serving (or --help), 2 for arguments or settings that cannot work."""
    if arguments in (["-h"], ["--help"]):
        print(USAGE + "\nSettings:\n" + describe_settings())
        return 0
    if arguments:
        return _refuse(f"it takes no arguments, got {' '.join(arguments)!r}: set CONV_* variables (--help lists them)")
    try:
        settings = get_settings()
    except ValidationError as error:
        return _refuse(*describe_errors(error))
    if (shared := os.environ.get(METRICS_DIR_VARIABLE)) and not (os.path.isdir(shared) and os.access(shared, os.W_OK)):
        return _refuse(f"{METRICS_DIR_VARIABLE}={shared!r} is not a writable directory (prometheus_client keeps the metrics there)")
    if settings.processes > 1 and "OMP_NUM_THREADS" not in os.environ:
        # Read by torch when each worker process imports it: the processes share the cores, not oversubscribe them.
        os.environ["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // settings.processes))
    shared_dir = _shared_metrics_dir() if settings.processes > 1 and not shared else None
    try:
        _serve(settings)
    finally:
        if shared_dir:
            shutil.rmtree(shared_dir, ignore_errors=True)
    return 0


def _refuse(*lines: str) -> int:
    for line in lines:
        print(f"python -m app: {line}", file=sys.stderr)
    return 2


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
    sys.exit(main(sys.argv[1:]))
