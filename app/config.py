"""Settings: one object, read once from CONV_* environment variables, that refuses bad values at start-up."""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1 << 20

LogLevel = Literal["critical", "error", "warning", "info", "debug", "trace"]
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")

# prometheus_client's variable for a directory shared by several processes' metrics: `python -m app` sets it
# for CONV_PROCESSES > 1 before the workers start, app/metrics.py reads it (as prometheus_client does, at import).
METRICS_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"


class Settings(BaseSettings):
    """Every field is CONV_<NAME> in the environment (e.g. CONV_MAX_BODY_BYTES=1048576)."""

    model_config = SettingsConfigDict(env_prefix="CONV_", case_sensitive=False, extra="ignore")

    host: str = Field("127.0.0.1", min_length=1, description="Interface to bind; the container sets 0.0.0.0.")
    port: int = Field(8000, ge=1, le=65535, description="TCP port.")
    processes: int = Field(
        1,
        ge=1,
        le=64,
        description="Server processes (uvicorn workers) on one port, each with its own device workers, queue and parser: "
        "one process is bound by the GIL to about one core of request handling. Each gets cores/processes torch threads "
        "unless OMP_NUM_THREADS is set.",
    )
    device: str = Field("auto", description='Device for requests that say "device": "auto": auto (CUDA when present), cpu, cuda, cuda:N.')
    max_body_bytes: int = Field(64 * MiB, ge=1024, description="Largest request body; more is refused with 413 before it is read.")
    max_tensor_elements: int = Field(1 << 24, ge=1, description="Largest element count of any one tensor in a request (413 above).")
    max_macs: int = Field(
        10_000_000_000, ge=1, description="Largest multiply-accumulates per request: forward MACs, x3 for /backward (413 above)."
    )
    reference_max_macs: int = Field(
        50_000_000, ge=1, description='MAC limit of algorithm "reference", the slow ground-truth loop (413 above).'
    )
    workspace_bytes: int = Field(
        256 * MiB,
        ge=MiB,
        description="Cap on im2col's patch buffer (larger problems are computed in chunks) and on depthwise's stacked copies "
        "(larger problems take its general path, which copies nothing).",
    )
    inline_macs: int = Field(
        1 << 18,
        ge=0,
        description='CPU requests with algorithm "auto" and at most this much work run on the event loop, not through the '
        "device queue: for them the thread hand-off costs more than the conv (0: always queue). Work is the MACs plus the "
        "padded input's and the output's elements (x3 for /backward).",
    )
    queue_size: int = Field(64, ge=1, description="Requests that may wait per device; one more is answered 503 + Retry-After.")
    max_inflight_bytes: int = Field(
        2 << 30,
        ge=MiB,
        description="Memory that the requests in progress may hold together, per server process: bodies as they arrive, "
        "then their tensors, outputs and gradients. A request that would pass it is answered 503 + Retry-After before its body "
        "is read; one request alone is always admitted.",
    )
    request_timeout_s: float = Field(60.0, gt=0, description="Deadline per request, from arrival to answer (504 past it).")
    body_timeout_s: float = Field(
        30.0,
        gt=0,
        description="Time allowed for a request body to arrive (a slower client is answered 408 and cut off), and for a client "
        "that has stopped reading its response to read again (else it is cut off, and the response's memory freed).",
    )
    retry_after_s: int = Field(1, ge=1, description="Retry-After seconds sent with 503.")
    keep_alive_s: int = Field(
        75,
        ge=1,
        le=3600,
        description="Seconds an idle keep-alive connection stays open. Longer than the idle timeouts of the clients and "
        "balancers that pool connections to us (httpx 5 s, aiohttp 15 s, nginx and AWS ALB 60 s), so that they close idle "
        "connections first: a server that closes one just as the client reuses it resets the request (uvicorn's own default, "
        "5 s, races httpx's 5 s).",
    )
    parse_processes: int = Field(1, ge=0, le=64, description="Helper processes that parse bodies of 1 MiB or more (0: parse in threads).")
    malloc_reuse: bool = Field(
        True, description="glibc: keep freed blocks up to 32 MiB for reuse instead of fresh pages per request (app/memory.py)."
    )
    warmup: bool = Field(True, description="Run a small conv on each device at start-up before /readyz turns 200.")
    compile: Literal["background", "off"] = Field(
        "background",
        description="CPU depthwise convs (stride 1) and Winograd's transforms: compile each problem's exact shapes with Inductor "
        "in a background thread (needs a C++ compiler; the eager path serves until then, and for good if compiling fails), "
        "or off (kernels/compiled.py).",
    )
    gemm: Literal["auto", "onednn", "torch"] = Field(
        "auto",
        description="The CPU algorithms' big float32 matrix products: auto (time oneDNN's matmul against torch's BLAS once "
        "at start-up and keep the faster), onednn, or torch (kernels/gemm.py; GET /info cpu_gemm says which runs).",
    )
    log_level: LogLevel = Field("info", description="uvicorn and app log level.")
    api_key: SecretStr | None = Field(None, description="When set, /forward and /backward need Authorization: Bearer <key>.")

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if not _DEVICE.match(value):
            raise ValueError(f"CONV_DEVICE must be auto, cpu, cuda or cuda:N, got {value!r}")
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("api_key")
    @classmethod
    def _usable_key(cls, value: SecretStr | None) -> SecretStr | None:
        """Empty: auth off (else "auth on with an empty key"). Otherwise a key a client can send and we can match:
        surrounding whitespace (a key read from a file ends in a newline) is dropped, as it is from the token sent;
        a key that is blank or holds characters an HTTP header cannot carry is refused."""
        if value is None or not value.get_secret_value():
            return None
        key = value.get_secret_value().strip(" \t\r\n")
        if not key:
            raise ValueError("only whitespace: set a key, or leave it empty to turn auth off")
        if not all("!" <= character <= "~" for character in key):
            raise ValueError("a key may hold only printable ASCII without spaces (what a Bearer token can carry)")
        return SecretStr(key)


@lru_cache
def get_settings() -> Settings:
    return Settings()


def describe_errors(error: ValidationError) -> list[str]:
    """One line per refused setting, named as it is set: "CONV_PORT: Input should be a valid integer (got 'abc')"."""
    lines = []
    for item in error.errors():
        name = "CONV_" + str(item["loc"][0]).upper() if item["loc"] else "settings"
        shown = "" if name == "CONV_API_KEY" else f" (got {item['input']!r})"  # never echo a secret
        lines.append(f"{name}: {item['msg'].removeprefix('Value error, ')}{shown}")
    return lines


def describe_settings() -> str:
    """Every setting with its default and meaning, for `python -m app --help`."""
    lines = []
    for name, field in Settings.model_fields.items():
        default = "unset" if field.default is None else field.default
        lines.append(f"  CONV_{name.upper()} (default {default}): {field.description}")
    return "\n".join(lines)
