"""The image's CMD, run as a local process (no Docker here): a typo in CMD or ENV fails this test.

The command and environment come from the Dockerfile's final stage; only what cannot hold outside
the container is changed: `python` is this interpreter (the project is installed in it, as in the
image), CONV_HOST is loopback, CONV_PORT a free port, and HOME stays the tester's own.
"""

from __future__ import annotations

import signal
import subprocess
import sys

import httpx
import pytest

from tests.deploy.support import (
    free_port,
    parse_dockerfile,
    python_argv,
    server_env,
    start_process,
    stop_process,
    tail,
    wait_ready,
)

# The image's ENV entries that name paths of the container only.
CONTAINER_ONLY_ENV = {"HOME"}
READY_TIMEOUT_S = 120.0


@pytest.mark.slow
def test_image_cmd_serves_readyz_and_passes_its_healthcheck(tmp_path):
    dockerfile = parse_dockerfile()
    image_env = {key: value for key, value in dockerfile.env().items() if key not in CONTAINER_ONLY_ENV}
    port = free_port()
    env = server_env(port)
    env.update(image_env)
    env.update(CONV_HOST="127.0.0.1", CONV_PORT=str(port))
    log_path = tmp_path / "server.log"
    # The HEALTHCHECK runs the probe script at its image path; here, the repository file COPY'd there.
    _, script, *probe_args = dockerfile.exec_form("HEALTHCHECK")
    healthcheck_argv = [sys.executable, str(dockerfile.copied_from(script)), *probe_args]

    # A working directory outside the repository, as in the image: the installed package must serve.
    module = dockerfile.exec_form("CMD")[2]
    installed = subprocess.run(
        [sys.executable, "-c", f"import importlib.util, sys; sys.exit(importlib.util.find_spec({module!r}) is None)"],
        cwd=tmp_path,
        timeout=30,
    )
    assert installed.returncode == 0, (
        f"package {module!r} is not installed in {sys.executable} (scripts/setup.sh; pip install -e . maps only packages that existed then)"
    )
    server = start_process(python_argv(dockerfile.exec_form("CMD")), env, log_path, cwd=tmp_path)
    try:
        wait_ready(f"http://127.0.0.1:{port}/readyz", server, log_path, timeout_s=READY_TIMEOUT_S)
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200

        healthcheck = subprocess.run(healthcheck_argv, env=env, capture_output=True, text=True, timeout=30)
        assert healthcheck.returncode == 0, f"the image's HEALTHCHECK failed on a ready server: {healthcheck.stderr}"
    finally:
        returncode = stop_process(server)
    # `docker stop` sends SIGTERM and kills after a grace period: the server must exit before that.
    # Exit 0, or death by the SIGTERM that uvicorn re-raises after its graceful shutdown, are clean.
    assert returncode in (0, -signal.SIGTERM), f"the server did not stop cleanly on SIGTERM (exit {returncode}):\n{tail(log_path)}"

    # Once the server is gone the same probe must report unhealthy, or Docker would never restart it.
    healthcheck = subprocess.run(healthcheck_argv, env=env, capture_output=True, text=True, timeout=30)
    assert healthcheck.returncode == 1, healthcheck.stderr
