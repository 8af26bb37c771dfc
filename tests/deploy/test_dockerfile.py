"""The Dockerfile, checked without a Docker engine: hadolint, and every name it shares with the app."""

from __future__ import annotations

import fnmatch
import importlib
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10; pytest depends on tomli there
    import tomli as tomllib

from tests.deploy.support import (
    DOCKERFILE,
    IMAGE_REQUIREMENTS,
    REPO_ROOT,
    SETTINGS_PREFIX,
    get_routes,
    parse_dockerfile,
    require_tool,
    setting_env_names,
    settings_default,
    validate_settings_env,
)

# Provided by the CUDA base image, never by the image's requirements (a pip torch would be a second,
# possibly CPU-only, copy).
BASE_IMAGE_PACKAGES = {"torch", "triton"}


@pytest.fixture(scope="module")
def dockerfile():
    return parse_dockerfile()


def test_hadolint_reports_no_warning():
    hadolint = require_tool("hadolint", extra_dirs=(Path(sys.executable).parent,))
    result = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "warning", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, f"hadolint:\n{result.stdout}{result.stderr}"


def test_base_images_are_pinned_cuda_runtime(dockerfile):
    for image in dockerfile.base_images:
        name, _, tag = image.partition(":")
        assert tag and tag != "latest", f"unpinned base image {image!r}"
        assert re.match(r"^\d+\.\d+\.\d+-cuda\d+\.\d+", tag), f"base image tag should pin torch and CUDA versions: {image!r}"
        assert "runtime" in tag, f"the runtime (not devel) variant keeps the image small: {image!r}"
    assert len(dockerfile.base_images) >= 2, "expected a multi-stage build (wheels, then runtime)"


def test_base_image_torch_satisfies_pyproject(dockerfile):
    torch_version = dockerfile.base_images[-1].partition(":")[2].split("-")[0]
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    (torch_requirement,) = [Requirement(line) for line in project["dependencies"] if canonicalize_name(Requirement(line).name) == "torch"]
    assert torch_requirement.specifier.contains(torch_version), f"base image torch {torch_version} vs pyproject {torch_requirement}"


def test_cmd_is_the_readme_module_entrypoint(dockerfile):
    cmd = dockerfile.exec_form("CMD")
    assert cmd[:2] == ["python", "-m"] and len(cmd) == 3, cmd
    module = cmd[2]
    assert importlib.util.find_spec(f"{module}.__main__") is not None, f"`python -m {module}` has no {module}/__main__.py"
    # Imported, not run: test_cmd_runs.py runs it. (Importing __main__ could start the server.)
    importlib.import_module(module)
    serve = (REPO_ROOT / "scripts" / "serve.sh").read_text()
    assert re.search(rf"python -m {re.escape(module)}\b", serve), "scripts/serve.sh and the image's CMD start different modules"
    assert not dockerfile.all("ENTRYPOINT"), "an ENTRYPOINT would change what CMD runs"


def test_healthcheck_probes_a_real_route_with_the_shipped_script(dockerfile):
    argv = dockerfile.exec_form("HEALTHCHECK")
    assert argv[0] == "python" and len(argv) == 3, argv
    script, path = argv[1], argv[2]
    assert path == "/readyz" and path in get_routes(), f"HEALTHCHECK probes {path!r}, not the app's /readyz"
    assert dockerfile.copied_from(script).is_file(), f"the file COPY'd to {script} does not exist"


def test_expose_matches_the_port_setting(dockerfile):
    env = dockerfile.env()
    exposed = dockerfile.last("EXPOSE").arguments.split()
    assert exposed == [str(settings_default("port"))] == [env["CONV_PORT"]], (exposed, env.get("CONV_PORT"))


def test_env_names_are_real_settings_with_valid_values(dockerfile):
    env = {key: value for key, value in dockerfile.env().items() if key.startswith(SETTINGS_PREFIX)}
    unknown = set(env) - setting_env_names()
    assert not unknown, f"the Dockerfile sets {sorted(unknown)}, which no Settings field reads"
    assert env.get("CONV_HOST") == "0.0.0.0", "the container must listen on all interfaces to be reachable"
    validate_settings_env(env)


def test_runs_as_non_root(dockerfile):
    user = dockerfile.last("USER").arguments.split(":")[0]
    assert user not in {"root", "0"}, user
    assert user.isdigit(), "a numeric USER lets Kubernetes check runAsNonRoot"


def test_requirements_pin_every_runtime_dependency():
    pinned = {}
    for line in IMAGE_REQUIREMENTS.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            requirement = Requirement(line)
            (specifier,) = requirement.specifier
            assert specifier.operator == "==", f"not pinned: {line}"
            pinned[canonicalize_name(requirement.name)] = specifier.version
    assert not BASE_IMAGE_PACKAGES & set(pinned), "torch/triton must come from the CUDA base image"
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    for line in project["dependencies"]:
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        if name in BASE_IMAGE_PACKAGES:
            continue
        assert name in pinned, f"pyproject.toml needs {line!r}; deploy/docker/requirements.txt does not pin it"
        assert requirement.specifier.contains(pinned[name]), f"{name}=={pinned[name]} does not satisfy {line!r}"


def _dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rule, for the patterns used here: the last matching pattern (or parent) decides."""
    excluded = False
    parts = path.split("/")
    candidates = ["/".join(parts[: index + 1]) for index in range(len(parts))]
    for pattern in patterns:
        negated = pattern.startswith("!")
        glob = pattern.lstrip("!").rstrip("/")
        if glob.startswith("**/"):
            hit = any(fnmatch.fnmatch(part, glob[3:]) for part in parts)
        else:
            hit = any(fnmatch.fnmatch(candidate, glob) for candidate in candidates)
        if hit:
            excluded = not negated
    return excluded


def test_dockerignore_keeps_what_the_dockerfile_copies():
    patterns = [
        line.strip() for line in (REPO_ROOT / ".dockerignore").read_text().splitlines() if line.strip() and not line.startswith("#")
    ]
    text = DOCKERFILE.read_text()
    sources = re.findall(r"^COPY (?!--from)(.+?) \S+$", text, flags=re.MULTILINE)
    for source in " ".join(sources).split():
        assert not _dockerignore_excludes(source.rstrip("/"), patterns), f".dockerignore drops {source}, which the Dockerfile copies"
        assert (REPO_ROOT / source).exists(), f"the Dockerfile copies {source}, which does not exist"
    assert _dockerignore_excludes(".venv", patterns) and _dockerignore_excludes(".git", patterns)
