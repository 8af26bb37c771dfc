"""app/config.py: CONV_* variables, defaults, and bad values refused at start-up."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from pydantic import ValidationError

from app.config import Settings
from app.main import create_app
from kernels import compiled


def test_defaults(monkeypatch) -> None:
    for name in ("CONV_HOST", "CONV_PORT", "CONV_API_KEY", "CONV_DEVICE", "CONV_MAX_BODY_BYTES"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings()
    assert (settings.host, settings.port, settings.device) == ("127.0.0.1", 8000, "auto")
    assert settings.max_body_bytes == 64 * 1024 * 1024 and settings.api_key is None


def test_environment(monkeypatch) -> None:
    monkeypatch.setenv("CONV_PORT", "9001")
    monkeypatch.setenv("CONV_MAX_MACS", "1234")
    monkeypatch.setenv("CONV_LOG_LEVEL", "WARNING")
    monkeypatch.setenv("CONV_API_KEY", "s3cret")
    settings = Settings()
    assert (settings.port, settings.max_macs, settings.log_level) == (9001, 1234, "warning")
    assert settings.api_key.get_secret_value() == "s3cret" and "s3cret" not in repr(settings)


def test_empty_api_key_means_no_auth(monkeypatch) -> None:
    monkeypatch.setenv("CONV_API_KEY", "")
    assert Settings().api_key is None


def test_api_key_read_from_a_file_loses_its_newline_and_unsendable_keys_are_refused(monkeypatch) -> None:
    """The token a client sends is stripped before it is compared, so the key must be too (else every request
    is a 401); a blank key or one an HTTP header cannot carry could never match, so it stops the start-up."""
    monkeypatch.setenv("CONV_API_KEY", "s3cret\n")
    assert Settings().api_key.get_secret_value() == "s3cret"
    for value, message in (("   ", "only whitespace"), ("clé", "printable ASCII"), ("two words", "printable ASCII")):
        monkeypatch.setenv("CONV_API_KEY", value)
        with pytest.raises(ValidationError, match=message):
            Settings()


def run_app(*arguments: str, **env: str) -> subprocess.CompletedProcess:
    """`python -m app` as a user starts it, with only these CONV_* variables; one that would serve is not run here."""
    environment = {key: value for key, value in os.environ.items() if not key.startswith("CONV_") and key != "PROMETHEUS_MULTIPROC_DIR"}
    return subprocess.run([sys.executable, "-m", "app", *arguments], env={**environment, **env}, capture_output=True, text=True, timeout=60)


def test_python_m_app_refuses_arguments_and_bad_settings_with_one_line_each() -> None:
    usage = run_app("--help")
    assert usage.returncode == 0 and "CONV_PORT (default 8000)" in usage.stdout and "CONV_API_KEY (default unset)" in usage.stdout
    assert run_app("--port", "9000").stderr.strip() == (
        "python -m app: it takes no arguments, got '--port 9000': set CONV_* variables (--help lists them)"
    )
    bad = run_app(CONV_PORT="abc", CONV_QUEUE_SIZE="0", CONV_API_KEY="clé")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    lines = bad.stderr.splitlines()
    assert [line.split(":")[1].strip() for line in lines] == ["CONV_PORT", "CONV_QUEUE_SIZE", "CONV_API_KEY"], lines
    assert "(got 'abc')" in lines[0] and "clé" not in bad.stderr  # the key is never echoed
    missing = run_app(PROMETHEUS_MULTIPROC_DIR="/nonexistent/metrics", CONV_PROCESSES="2")
    assert missing.returncode == 2 and "PROMETHEUS_MULTIPROC_DIR='/nonexistent/metrics' is not a writable directory" in missing.stderr


@pytest.mark.parametrize(
    "name, value",
    [
        ("CONV_PORT", "0"),
        ("CONV_PORT", "70000"),
        ("CONV_PORT", "http"),
        ("CONV_DEVICE", "tpu"),
        ("CONV_MAX_BODY_BYTES", "-1"),
        ("CONV_QUEUE_SIZE", "0"),
        ("CONV_REQUEST_TIMEOUT_S", "0"),
        ("CONV_LOG_LEVEL", "loud"),
        ("CONV_MAX_TENSOR_ELEMENTS", "0"),
        ("CONV_KEEP_ALIVE_S", "0"),
        ("CONV_COMPILE", "sync"),  # kernels' "sync" compiles inside requests: not a server mode
        ("CONV_GEMM", "mkl"),
    ],
)
def test_bad_values_are_refused(monkeypatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=name.removeprefix("CONV_").lower()):
        Settings()


def test_absent_device_is_refused_at_start_up() -> None:
    with pytest.raises(ValueError, match="CONV_DEVICE"):
        create_app(Settings(device="cuda:99"))


@pytest.mark.anyio
@pytest.mark.parametrize("mode", ["background", "off"])
async def test_compile_mode_reaches_the_kernels_at_start_up(mode: str) -> None:
    app = create_app(Settings(compile=mode, warmup=False, parse_processes=0))
    with compiled.mode("sync"):
        async with app.router.lifespan_context(app):
            assert compiled.get_mode() == mode
