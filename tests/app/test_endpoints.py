"""/healthz, /readyz, /info, /metrics, /openapi.json, and the API key on and off."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading

import httpx
import pytest
import torch

import kernels
from app.config import Settings
from app.main import create_app
from app.metrics import _forget_dead_processes
from app.schemas import BACKWARD_EXAMPLE, FORWARD_EXAMPLE
from kernels import gemm
from tests.app.conftest import running

pytestmark = pytest.mark.anyio


async def test_healthz(client) -> None:
    response = await client.get("/healthz")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


async def test_readyz_is_503_until_warm_up_finishes(monkeypatch) -> None:
    import app.compute as compute

    release = threading.Event()
    monkeypatch.setattr(compute, "warm_up", lambda device: release.wait(10))
    app = create_app(Settings(warmup=True, parse_processes=0))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            before = await client.get("/readyz")
            alive = await client.get("/healthz")
            release.set()
            for _ in range(200):
                if (after := await client.get("/readyz")).status_code == 200:
                    break
                await asyncio.sleep(0.01)
    assert before.status_code == 503 and before.headers["retry-after"] == "1"
    assert alive.status_code == 200
    assert after.status_code == 200 and after.json()["devices"]["cpu"]["ready"] is True


async def test_warm_up_runs_ours_and_the_reference() -> None:
    async with running(warmup=True) as (_, client):
        assert (await client.get("/readyz")).status_code == 200


async def test_info(client) -> None:
    info = (await client.get("/info")).json()
    assert info["version"] == "0.1.0" and info["torch"] and "triton" in info and "cuda" in info
    assert [device["name"] for device in info["devices"]][0] == "cpu"
    assert set(info["algorithms"]) == set(kernels.names()) - {"auto"}
    assert {"devices", "dtypes"} <= set(info["algorithms"]["im2col"])
    assert set(info["dtypes"]) == {"float64", "float32", "float16", "bfloat16"}
    assert info["dtypes"]["float32"] == {"atol": 1e-5, "rtol": 1e-4}
    assert {"max_body_bytes", "max_tensor_elements", "max_macs", "reference_max_macs", "queue_size", "request_timeout_s"} <= set(
        info["limits"]
    )
    assert info["auth"] is False
    assert info["cpu_gemm"] == gemm.backend() and info["cpu_gemm"] in ("onednn", "torch")


async def test_gemm_setting_forces_the_backend(monkeypatch) -> None:
    """CONV_GEMM=torch keeps every CPU product on torch's BLAS, whatever the calibration would pick."""
    monkeypatch.setattr(gemm._state, "setting", gemm._state.setting)  # restored after the test: it is process-wide
    async with running(gemm="torch") as (_, client):
        assert (await client.get("/info")).json()["cpu_gemm"] == "torch"
        answer = await client.post("/forward", json={**FORWARD_EXAMPLE, "algorithm": "im2col"})
        assert answer.status_code == 200 and answer.json()["parity"]["ok"] is True


async def test_forward_and_backward_name_the_algorithm_each_ran(monkeypatch) -> None:
    """ "auto" weighs the forward alone for /forward and forward+backward for /backward (kernels/selection.py): with
    oneDNN's GEMMs a 32-channel 14x14 layer runs im2col for the one and unfold for the other, and each response says so."""
    if not gemm._onednn_available():
        pytest.skip("this torch build has no oneDNN matmul (torch.ops.mkldnn._linear_pointwise)")
    monkeypatch.setattr(gemm._state, "setting", gemm._state.setting)  # restored after the test: it is process-wide
    generator = torch.Generator().manual_seed(97)
    body = {
        "input": torch.randn(1, 32, 14, 14, generator=generator).tolist(),
        "weight": (torch.randn(32, 32, 3, 3, generator=generator) / 288**0.5).tolist(),
        "padding": 1,
    }
    async with running(gemm="onednn") as (_, client):
        forward = await client.post("/forward", json=body)
        backward = await client.post("/backward", json=body)
    assert forward.status_code == backward.status_code == 200, (forward.text, backward.text)
    assert (forward.json()["algorithm"], backward.json()["algorithm"]) == ("im2col", "unfold")
    assert forward.json()["parity"]["ok"] and backward.json()["parity"]["ok"]


async def test_metrics_names(client) -> None:
    await client.post("/forward", json={**FORWARD_EXAMPLE, "algorithm": "im2col"})
    await client.post("/forward", json={"input": 1})
    text = (await client.get("/metrics")).text
    for name in (
        "conv_requests_total",
        "conv_request_duration_seconds_bucket",
        "conv_stage_duration_seconds_bucket",
        "conv_queue_depth",
        "conv_in_flight_requests",
        "conv_device_busy",
        "conv_device_memory_bytes",
        "conv_jobs_dropped",
    ):
        assert name in text, name
    assert 'conv_requests_total{algorithm="im2col",endpoint="/forward",status="200"} 1.0' in text
    assert 'endpoint="/forward",status="422"' in text


def test_shared_metrics_forget_the_live_gauges_of_processes_that_are_gone(tmp_path) -> None:
    """CONV_PROCESSES > 1 (app/metrics.py): a worker the supervisor restarted leaves files behind; its gauges
    (queue depth, bytes held) must not count any more, its counters must."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    files = [f"gauge_livesum_{gone.pid}.db", f"gauge_livesum_{os.getpid()}.db", f"counter_{gone.pid}.db", f"histogram_{gone.pid}.db"]
    for name in files:
        (tmp_path / name).write_bytes(b"")
    _forget_dead_processes(str(tmp_path))
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(files[1:])


async def test_openapi_declares_the_real_request_bodies(client) -> None:
    schema = (await client.get("/openapi.json")).json()
    for path, model, example in (("/forward", "ForwardRequest", FORWARD_EXAMPLE), ("/backward", "BackwardRequest", BACKWARD_EXAMPLE)):
        body = schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]
        assert body["schema"] == {"$ref": f"#/components/schemas/{model}"}
        assert body["examples"]["seed"]["value"] == example
        component = schema["components"]["schemas"][model]
        assert {"input", "weight", "bias"} <= set(component["properties"]) and component["required"] == ["input", "weight"]
        assert component["additionalProperties"] is False
    assert "grad_output" in schema["components"]["schemas"]["BackwardRequest"]["properties"]
    assert {"Tensor", "TensorFlat", "TensorBase64", "NestedNumbers"} <= set(schema["components"]["schemas"])
    assert (await client.get("/docs")).status_code == 200


async def test_openapi_examples_are_accepted(client) -> None:
    for path, example in (("/forward", FORWARD_EXAMPLE), ("/backward", BACKWARD_EXAMPLE)):
        assert (await client.post(path, json=example)).status_code == 200


@pytest.mark.parametrize(
    "headers, status",
    [
        ({}, 401),
        ({"authorization": "Bearer wrong"}, 401),
        ({"authorization": "Basic s3cret"}, 401),
        ({"authorization": "Bearer s3cret"}, 200),
    ],
)
async def test_api_key_on(headers: dict, status: int) -> None:
    async with running(api_key="s3cret") as (_, client):
        forward = await client.post("/forward", json=FORWARD_EXAMPLE, headers=headers)
        backward = await client.post("/backward", json=FORWARD_EXAMPLE, headers=headers)
        open_routes = [await client.get(path) for path in ("/healthz", "/readyz", "/info", "/metrics")]
    assert forward.status_code == status and backward.status_code == status
    if status == 401:
        assert "API key" in forward.json()["detail"] and forward.headers["www-authenticate"] == "Bearer"
        assert "s3cret" not in forward.text
    assert all(response.status_code == 200 for response in open_routes)


async def test_api_key_checked_before_the_body_is_read() -> None:
    async with running(api_key="s3cret") as (_, client):
        response = await client.post("/forward", content=b"not json", headers={"content-type": "application/json"})
    assert response.status_code == 401


async def test_api_key_off_needs_no_header(client) -> None:
    assert (await client.post("/forward", json=FORWARD_EXAMPLE)).status_code == 200
