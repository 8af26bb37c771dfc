"""The Kubernetes manifests under deploy/k8s, checked against their schemas and against the app."""

from __future__ import annotations

import os

import pytest
import yaml

from tests.deploy.support import (
    K8S_DIR,
    SETTINGS_PREFIX,
    get_routes,
    parse_dockerfile,
    setting_env_names,
    validate_settings_env,
)

# The oldest Kubernetes these manifests promise to work on (autoscaling/v2 HPA behavior, policy/v1).
KUBERNETES_VERSION = "1.29.0"


def load_manifests() -> dict[str, dict]:
    """Every resource in deploy/k8s (except the kustomization), keyed by kind."""
    resources: dict[str, dict] = {}
    for path in sorted(K8S_DIR.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for document in yaml.safe_load_all(path.read_text()):
            if document:
                assert document["kind"] not in resources, f"two {document['kind']}s"
                resources[document["kind"]] = document
    return resources


@pytest.fixture(scope="module")
def manifests() -> dict[str, dict]:
    return load_manifests()


@pytest.fixture(scope="module")
def container(manifests) -> dict:
    (only,) = manifests["Deployment"]["spec"]["template"]["spec"]["containers"]
    return only


def container_port(container: dict, port: int | str) -> int:
    """A probe's or Service's port, by number or by the container port's name."""
    if isinstance(port, int):
        return port
    (match,) = [entry["containerPort"] for entry in container["ports"] if entry.get("name") == port]
    return match


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())
    files = {path.name for path in K8S_DIR.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files


def test_manifests_match_the_kubernetes_schemas(manifests):
    try:
        import kubernetes_validate
    except ModuleNotFoundError:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("kubernetes-validate is not installed (dev extras); CI=true, so this fails instead of skipping")
        pytest.skip("kubernetes-validate is not installed (dev extras)")
    for kind, resource in manifests.items():
        try:
            kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{kind}: {error.message} at {'.'.join(map(str, error.path))}")


def test_probes_use_real_routes_on_the_served_port(container):
    routes = get_routes()
    expected = {"readinessProbe": "/readyz", "livenessProbe": "/healthz", "startupProbe": "/healthz"}
    served_port = int(env_of(container)["CONV_PORT"])
    for probe, path in expected.items():
        http_get = container[probe]["httpGet"]
        assert http_get["path"] == path and path in routes, f"{probe} probes {http_get['path']!r}"
        assert container_port(container, http_get["port"]) == served_port, f"{probe} probes a port the server does not listen on"


def env_of(container: dict) -> dict[str, str]:
    return {entry["name"]: entry["value"] for entry in container["env"] if "value" in entry}


def test_env_names_are_real_settings_with_valid_values(container):
    names = {entry["name"] for entry in container["env"]}
    unknown = {name for name in names if name.startswith(SETTINGS_PREFIX)} - setting_env_names()
    assert not unknown, f"the Deployment sets {sorted(unknown)}, which no Settings field reads"
    env = env_of(container)
    assert env["CONV_HOST"] == "0.0.0.0" and env["CONV_DEVICE"] == "cuda"
    validate_settings_env(env)


def test_container_runs_the_image_as_built(container):
    assert "command" not in container and "args" not in container, "the image's CMD is the one entrypoint"
    (port,) = container["ports"]
    assert port["containerPort"] == int(env_of(container)["CONV_PORT"])
    dockerfile = parse_dockerfile()
    assert str(port["containerPort"]) == dockerfile.last("EXPOSE").arguments
    assert container["image"].split(":")[0] == "conv-as-a-service"


def test_one_gpu_per_pod(container):
    limits = container["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == 1, "one replica per GPU, as in docker-compose.yml"


def test_pod_runs_as_the_image_user(manifests, container):
    pod_security = manifests["Deployment"]["spec"]["template"]["spec"]["securityContext"]
    image_uid = parse_dockerfile().last("USER").arguments.split(":")[0]
    assert pod_security["runAsNonRoot"] is True and str(pod_security["runAsUser"]) == image_uid
    assert container["securityContext"]["allowPrivilegeEscalation"] is False


def test_service_targets_the_container_port(manifests, container):
    service = manifests["Service"]
    pod_labels = manifests["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items(), "the Service selects no pod"
    for port in service["spec"]["ports"]:
        assert container_port(container, port["targetPort"]) == container["ports"][0]["containerPort"]


def test_autoscaler_targets_the_deployment(manifests):
    deployment, hpa = manifests["Deployment"], manifests["HorizontalPodAutoscaler"]
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        deployment["apiVersion"],
        "Deployment",
        deployment["metadata"]["name"],
    )
    assert 1 <= hpa["spec"]["minReplicas"] <= deployment["spec"]["replicas"] <= hpa["spec"]["maxReplicas"]


def test_disruption_budget_selects_the_pods(manifests):
    selector = manifests["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"]
    assert selector == manifests["Deployment"]["spec"]["selector"]["matchLabels"]
