"""docker-compose.yml (+ the CPU override and the nginx config it mounts), checked against the app.

There is no Docker engine here, so the files are read as YAML and the few Compose rules they rely on
(`${VAR:-default}`, `<<` merge keys, `!reset`, profiles) are applied by hand.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from tests.deploy.support import (
    COMPOSE_CPU_FILE,
    COMPOSE_FILE,
    NGINX_CONF,
    REPO_ROOT,
    SETTINGS_PREFIX,
    get_routes,
    parse_dockerfile,
    setting_env_names,
    settings_default,
    validate_settings_env,
)

RESET = object()


class ComposeLoader(yaml.SafeLoader):
    """SafeLoader plus Compose's merge tags: `!reset` removes a value, `!override` replaces it."""


ComposeLoader.add_constructor("!reset", lambda loader, node: RESET)
ComposeLoader.add_constructor(
    "!override",
    lambda loader, node: loader.construct_mapping(node) if isinstance(node, yaml.MappingNode) else loader.construct_sequence(node),
)


def load_compose(path: Path) -> dict:
    return yaml.load(path.read_text(), Loader=ComposeLoader)


def interpolate(value: str) -> str:
    """`${VAR:-default}` and `${VAR}` as Compose reads them with an empty environment."""
    return re.sub(r"\$\{(\w+)(?::?-([^}]*))?\}", lambda m: m.group(2) or "", value)


def merge(base: object, override: object) -> object:
    """Compose's merge for mappings; scalars and sequences in the override replace the base's."""
    if override is RESET:
        return RESET
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            result = merge(base.get(key), value)
            if result is RESET:
                merged.pop(key, None)
            else:
                merged[key] = result
        return merged
    return override


def gpu_devices(service: dict) -> list[dict]:
    return service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])


def api_services(compose: dict) -> dict[str, dict]:
    """The services that run our image (those built from this repository)."""
    return {name: service for name, service in compose["services"].items() if "build" in service}


def service_env(service: dict) -> dict[str, str]:
    environment = service.get("environment", {})
    assert isinstance(environment, dict), "use the mapping form of environment"
    return {key: interpolate(str(value)) for key, value in environment.items()}


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_compose(COMPOSE_FILE)


@pytest.fixture(scope="module")
def nginx_conf() -> str:
    return NGINX_CONF.read_text()


def test_api_services_exist_and_build_this_image(compose):
    apis = api_services(compose)
    assert "api" in apis and "api-1" in apis, sorted(compose["services"])
    images = {service["image"] for service in apis.values()}
    assert len(images) == 1, f"replicas should run one image: {images}"
    for service in apis.values():
        assert service["build"]["context"] == ".", "the image is built from the repository root Dockerfile"


def test_healthchecks_probe_real_routes(compose):
    routes = get_routes()
    script = parse_dockerfile().exec_form("HEALTHCHECK")[1]
    for name, service in api_services(compose).items():
        test = service["healthcheck"]["test"]
        assert test[0] == "CMD", f"{name}: use the exec form, the image has no curl"
        assert test[1:3] == ["python", script], f"{name}: healthcheck should run the image's probe {script}"
        assert test[3] == "/readyz" and test[3] in routes, f"{name}: healthcheck probes {test[3]!r}"
    lb_test = compose["services"]["lb"]["healthcheck"]["test"]
    paths = [part[part.index("/", len("http://")) :] for part in lb_test if part.startswith("http://")]
    assert paths and all(path in routes for path in paths), lb_test


def test_env_names_are_real_settings_with_valid_values(compose):
    for name, service in api_services(compose).items():
        env = service_env(service)
        unknown = {key for key in env if key.startswith(SETTINGS_PREFIX)} - setting_env_names()
        assert not unknown, f"{name} sets {sorted(unknown)}, which no Settings field reads"
        assert env["CONV_HOST"] == "0.0.0.0", f"{name} must listen on all interfaces inside its container"
        validate_settings_env(env)


def test_ports_agree_with_settings_and_nginx(compose, nginx_conf):
    upstream = re.findall(r"^\s*server\s+([\w.-]+):(\d+)\b", nginx_conf, flags=re.MULTILINE)
    apis = api_services(compose)
    assert sorted(host for host, _ in upstream) == sorted(apis), "nginx's upstream should list every api service once"
    for name, service in apis.items():
        port = service_env(service)["CONV_PORT"]
        assert service["expose"] == [port], f"{name} exposes {service['expose']}, the server listens on {port}"
        assert all(upstream_port == port for host, upstream_port in upstream if host == name), (name, upstream)
        for mapping in service.get("ports", []):
            assert interpolate(mapping).rsplit(":", 1)[1] == port, f"{name} publishes {mapping}, the server listens on {port}"
    assert interpolate(compose["services"]["api"]["ports"][0]).split(":")[0] == str(settings_default("port"))

    (listen,) = re.findall(r"^\s*listen\s+(\d+);", nginx_conf, flags=re.MULTILINE)
    lb = compose["services"]["lb"]
    assert [interpolate(mapping).rsplit(":", 1)[1] for mapping in lb["ports"]] == [listen]


def test_nginx_balances_least_conn_and_retries_posts(nginx_conf):
    assert re.search(r"^\s*least_conn;", nginx_conf, flags=re.MULTILINE)
    (next_upstream,) = re.findall(r"^\s*proxy_next_upstream\s+([^;]+);", nginx_conf, flags=re.MULTILINE)
    conditions = set(next_upstream.split())
    assert {"error", "timeout", "http_502", "http_503", "non_idempotent"} <= conditions, conditions
    tries = int(re.search(r"^\s*proxy_next_upstream_tries\s+(\d+);", nginx_conf, flags=re.MULTILINE).group(1))
    assert tries == 0 or tries >= 2, "at least one retry"


def test_nginx_limits_agree_with_settings(compose, nginx_conf):
    size = re.search(r"^\s*client_max_body_size\s+(\d+)([km]?);", nginx_conf, flags=re.MULTILINE)
    body_limit = int(size.group(1)) * {"": 1, "k": 1 << 10, "m": 1 << 20}[size.group(2)]
    assert body_limit == settings_default("max_body_bytes"), "nginx and the server should refuse the same body size"
    for service in api_services(compose).values():
        assert int(service_env(service)["CONV_MAX_BODY_BYTES"]) <= body_limit
    read_timeout = int(re.search(r"^\s*proxy_read_timeout\s+(\d+)s;", nginx_conf, flags=re.MULTILINE).group(1))
    for service in api_services(compose).values():
        request_timeout = float(service_env(service).get("CONV_REQUEST_TIMEOUT_S", settings_default("request_timeout_s")))
        assert read_timeout > request_timeout, "nginx must wait longer than the server's own deadline"


def test_lb_mounts_the_tested_nginx_config(compose):
    lb = compose["services"]["lb"]
    mounts = [volume.split(":") for volume in lb["volumes"]]
    assert [source for source, *_ in mounts] == ["./" + NGINX_CONF.relative_to(REPO_ROOT).as_posix()]
    assert mounts[0][1] == "/etc/nginx/conf.d/default.conf"
    image, _, tag = lb["image"].partition(":")
    assert tag and tag != "latest" and re.match(r"\d+\.\d+\.\d+", tag), lb["image"]
    assert set(lb["depends_on"]) == set(api_services(compose))


def test_each_replica_reserves_its_own_gpu(compose):
    seen: set[str] = set()
    for name, service in api_services(compose).items():
        (device,) = gpu_devices(service)
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"], f"{name}: {device}"
        ids = set(device["device_ids"])
        assert len(ids) == 1 and not ids & seen, f"{name} should have a GPU of its own: {device}"
        seen |= ids
        assert service_env(service)["CONV_DEVICE"] == "cuda", f"{name} has a GPU, so it should refuse to fall back to CPU"
        assert service["restart"] in {"unless-stopped", "always", "on-failure"}


def test_default_stack_is_one_replica_and_scale_profile_adds_the_rest(compose):
    default = {name for name, service in compose["services"].items() if not service.get("profiles")}
    assert default == {"api"}, "`docker compose up` alone should start one GPU replica, published"
    assert compose["services"]["api"]["ports"]
    scaled = {name for name, service in compose["services"].items() if "scale" in service.get("profiles", [])}
    assert scaled == set(compose["services"]) - default


def test_cpu_override_drops_every_gpu_reservation(compose):
    override = load_compose(COMPOSE_CPU_FILE)
    assert set(override["services"]) <= set(compose["services"])
    merged = merge(compose, override)
    for name, service in api_services(merged).items():
        assert not gpu_devices(service), f"{name} still reserves a GPU with the CPU override"
        env = service_env(service)
        assert env["CONV_DEVICE"] == "cpu", name
        validate_settings_env({key: value for key, value in env.items() if key.startswith(SETTINGS_PREFIX)})
