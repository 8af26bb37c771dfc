"""The V2 wire format with plain httpx: JSON forms, the binary extension both ways, error bodies, limits."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kernels.tolerances import tolerance
from tests.v2.servers import API_KEY, MAX_BODY_BYTES, MAX_TENSOR_ELEMENTS

HEADER = "Inference-Header-Content-Length"


def _problem(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(1, 2, 5, 5, generator=generator), torch.randn(3, 2, 3, 3, generator=generator), torch.randn(3, generator=generator)


def _json_input(name: str, tensor: torch.Tensor, datatype: str = "FP32", nested: bool = False) -> dict:
    data = tensor.double().tolist() if nested else tensor.double().flatten().tolist()
    return {"name": name, "shape": list(tensor.shape), "datatype": datatype, "data": data}


def _post(url: str, path: str, content: bytes, headers: dict | None = None) -> httpx.Response:
    return httpx.post(f"{url}{path}", content=content, headers=headers or {}, timeout=60)


def _infer_json(url: str, body: dict, model: str = "conv2d", headers: dict | None = None) -> httpx.Response:
    return _post(url, f"/v2/models/{model}/infer", json.dumps(body).encode(), {"content-type": "application/json", **(headers or {})})


def _split(response: httpx.Response) -> tuple[dict, bytes]:
    length = int(response.headers[HEADER])
    return json.loads(response.content[:length]), response.content[length:]


@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested"])
def test_json_in_json_out(open_server, nested: bool) -> None:
    x, w, b = _problem(1)
    body = {
        "id": "request-7",
        "inputs": [_json_input("INPUT", x, nested=nested), _json_input("WEIGHT", w, nested=nested), _json_input("BIAS", b)],
        "parameters": {"padding": 1},
    }
    response = _infer_json(open_server.url, body)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json") and HEADER not in response.headers
    result = response.json()
    assert result["id"] == "request-7"
    [output] = result["outputs"]
    assert output["name"] == "OUTPUT" and output["datatype"] == "FP32" and output["shape"] == [1, 3, 5, 5]
    actual = torch.tensor(output["data"]).reshape(output["shape"])
    torch.testing.assert_close(actual, F.conv2d(x, w, b, padding=1), atol=1e-5, rtol=1e-4)


def test_versioned_infer_and_bf16_json(open_server) -> None:
    x, w, _ = _problem(2)
    x16, w16 = x.bfloat16(), w.bfloat16()
    body = {"inputs": [_json_input("INPUT", x16, "BF16"), _json_input("WEIGHT", w16, "BF16")], "parameters": {"padding": "same"}}
    response = _post(open_server.url, "/v2/models/conv2d/versions/1/infer", json.dumps(body).encode())
    assert response.status_code == 200, response.text
    [output] = response.json()["outputs"]
    assert output["datatype"] == "BF16"
    expected = F.conv2d(x16.double(), w16.double(), padding="same")
    torch.testing.assert_close(torch.tensor(output["data"], dtype=torch.float64).reshape(output["shape"]), expected, atol=0.1, rtol=0.05)
    missing = _post(open_server.url, "/v2/models/conv2d/versions/3/infer", json.dumps(body).encode())
    assert missing.status_code == 404 and "version" in missing.json()["error"]


def test_binary_in_and_out_per_output(open_server) -> None:
    """Binary inputs; binary_data_output for all, overridden per output; the JSON header's length in the response."""
    x, w, b = _problem(3)
    grad_output = torch.randn(1, 3, 3, 3)
    tensors = {"INPUT": x, "WEIGHT": w, "BIAS": b, "GRAD_OUTPUT": grad_output}
    inputs = [
        {"name": name, "shape": list(t.shape), "datatype": "FP32", "parameters": {"binary_data_size": t.numel() * 4}}
        for name, t in tensors.items()
    ]
    header = json.dumps(
        {
            "inputs": inputs,
            "outputs": [
                {"name": "GRAD_WEIGHT", "parameters": {"binary_data": True}},
                {"name": "GRAD_BIAS", "parameters": {"binary_data": False}},
            ],
        }
    ).encode()
    content = header + b"".join(t.numpy().tobytes() for t in tensors.values())
    response = _post(
        open_server.url, "/v2/models/conv2d_backward/infer", content, {HEADER: str(len(header)), "content-type": "application/octet-stream"}
    )
    assert response.status_code == 200, response.text
    result, binary = _split(response)
    assert [entry["name"] for entry in result["outputs"]] == ["GRAD_WEIGHT", "GRAD_BIAS"]
    weight_entry, bias_entry = result["outputs"]
    assert weight_entry["parameters"]["binary_data_size"] == len(binary) == w.numel() * 4
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    F.conv2d(*leaves).backward(grad_output)
    grad_weight = torch.from_numpy(np.frombuffer(binary, dtype="<f4").copy()).reshape(weight_entry["shape"])
    torch.testing.assert_close(grad_weight, leaves[1].grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.tensor(bias_entry["data"]), leaves[2].grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("misalign", [0, 1, 2, 3])
def test_binary_inputs_at_any_offset(open_server, misalign: int) -> None:
    """Binary inputs are views of the request body when their offset suits the dtype, copies otherwise:
    a JSON header of any length (here padded so the first tensor starts at 4k + misalign) gives the same answer."""
    x, w, b = _problem(5)
    tensors = {"INPUT": x, "WEIGHT": w, "BIAS": b}
    inputs = [
        {"name": name, "shape": list(t.shape), "datatype": "FP32", "parameters": {"binary_data_size": t.numel() * 4}}
        for name, t in tensors.items()
    ]
    header = json.dumps({"inputs": inputs, "parameters": {"padding": 1, "binary_data_output": True}}).encode()
    header += b" " * ((misalign - len(header)) % 4)  # JSON allows trailing whitespace
    content = header + b"".join(t.numpy().tobytes() for t in tensors.values())
    response = _post(open_server.url, "/v2/models/conv2d/infer", content, {HEADER: str(len(header))})
    assert response.status_code == 200, response.text
    result, binary = _split(response)
    output = torch.from_numpy(np.frombuffer(binary, dtype="<f4").copy()).reshape(result["outputs"][0]["shape"])
    torch.testing.assert_close(output, F.conv2d(x, w, b, padding=1), atol=1e-5, rtol=1e-4)


def test_large_binary_outputs_arrive_whole_and_in_order(open_server) -> None:
    """Binary outputs are sent from the tensors' own memory, one part each after the JSON header: two of them,
    one over 64 KiB, with a JSON output between, must arrive as declared (lengths, order, values)."""
    generator = torch.Generator().manual_seed(6)
    x, w, b = (
        torch.randn(1, 4, 96, 96, generator=generator, dtype=torch.float64),
        torch.randn(8, 4, 3, 3, generator=generator, dtype=torch.float64),
        torch.randn(8, generator=generator, dtype=torch.float64),
    )
    grad_output = torch.randn(1, 8, 96, 96, generator=generator, dtype=torch.float64)
    tensors = {"INPUT": x, "WEIGHT": w, "BIAS": b, "GRAD_OUTPUT": grad_output}
    inputs = [
        {"name": name, "shape": list(t.shape), "datatype": "FP64", "parameters": {"binary_data_size": t.numel() * 8}}
        for name, t in tensors.items()
    ]
    outputs = [
        {"name": "GRAD_INPUT", "parameters": {"binary_data": True}},
        {"name": "GRAD_BIAS", "parameters": {"binary_data": False}},
        {"name": "GRAD_WEIGHT", "parameters": {"binary_data": True}},
    ]
    header = json.dumps({"inputs": inputs, "outputs": outputs, "parameters": {"padding": 1}}).encode()
    content = header + b"".join(t.numpy().tobytes() for t in tensors.values())
    response = _post(open_server.url, "/v2/models/conv2d_backward/infer", content, {HEADER: str(len(header))})
    assert response.status_code == 200, response.text
    assert int(response.headers["content-length"]) == len(response.content)
    result, binary = _split(response)
    input_entry, bias_entry, weight_entry = result["outputs"]
    sizes = [input_entry["parameters"]["binary_data_size"], weight_entry["parameters"]["binary_data_size"]]
    assert sizes == [x.numel() * 8, w.numel() * 8] and len(binary) == sum(sizes) and sizes[0] > 64 * 1024
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    F.conv2d(*leaves, padding=1).backward(grad_output)
    atol, rtol = tolerance(torch.float64)
    received = {"GRAD_INPUT": binary[: sizes[0]], "GRAD_WEIGHT": binary[sizes[0] :]}
    for (name, raw), expected in zip(received.items(), (leaves[0].grad, leaves[1].grad)):
        actual = torch.from_numpy(np.frombuffer(raw, dtype="<f8").copy()).reshape(expected.shape)
        torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=name)
    torch.testing.assert_close(torch.tensor(bias_entry["data"], dtype=torch.float64), leaves[2].grad, atol=atol, rtol=rtol)


def test_binary_bf16_is_raw_little_endian(open_server) -> None:
    x, w, _ = _problem(4)
    x16, w16 = x.bfloat16(), w.bfloat16()
    raw = [t.view(torch.int16).numpy().astype("<i2").tobytes() for t in (x16, w16)]
    inputs = [
        {"name": name, "shape": list(t.shape), "datatype": "BF16", "parameters": {"binary_data_size": len(r)}}
        for name, t, r in (("INPUT", x16, raw[0]), ("WEIGHT", w16, raw[1]))
    ]
    header = json.dumps({"inputs": inputs, "parameters": {"binary_data_output": True}}).encode()
    response = _post(open_server.url, "/v2/models/conv2d/infer", header + b"".join(raw), {HEADER: str(len(header))})
    assert response.status_code == 200, response.text
    result, binary = _split(response)
    output = torch.frombuffer(bytearray(binary), dtype=torch.bfloat16).reshape(result["outputs"][0]["shape"])
    torch.testing.assert_close(output.double(), F.conv2d(x16.double(), w16.double()), atol=0.1, rtol=0.05)


def test_non_finite_json_values(open_server) -> None:
    x, w, _ = _problem(5)
    body = {"inputs": [_json_input("INPUT", x), _json_input("WEIGHT", w)]}
    body["inputs"][0]["data"][0] = "NaN"
    result = _infer_json(open_server.url, body).json()
    assert "NaN" in result["outputs"][0]["data"] and result["parameters"]["parity_ok"] is True


@pytest.mark.parametrize(
    ("mutate", "status", "phrase"),
    [
        (lambda body: body["inputs"].append({"name": "EXTRA", "shape": [1], "datatype": "FP32", "data": [1.0]}), 400, "no input 'EXTRA'"),
        (lambda body: body["inputs"][0].update(datatype="INT8"), 400, "datatype must be one of"),
        (lambda body: body["inputs"][0].update(shape=[1, 2, 5, 4]), 400, "input INPUT: data has 50 values but shape [1, 2, 5, 4] needs 40"),
        (lambda body: body["inputs"].pop(1), 400, "missing ['WEIGHT']"),
        (lambda body: body["inputs"][0].pop("data"), 400, "neither data nor"),
        (lambda body: body["inputs"][0].update(parameters={"binary_data_size": 200}), 400, "input INPUT has both data and"),
        (lambda body: body.update(outputs=[{"name": "GRAD_INPUT"}]), 400, "no output 'GRAD_INPUT'"),
        (lambda body: body.update(outputs=[{"name": "OUTPUT"}, {"name": "OUTPUT"}]), 400, "output OUTPUT is requested twice"),
        (lambda body: body.update(parameters={"encoding": "list"}), 400, "parameter 'encoding'"),
        (lambda body: body["inputs"][0].update(parameters=[1]), 400, "parameters must be a JSON object"),
        (lambda body: body.update(parameters={"binary_data_output": "yes"}), 400, "binary_data_output"),
        (lambda body: body.update(id={"a": 1}), 400, "id must be a string, got dict"),
        # Unicode digits pass str.isdigit but not int(); 5,000 digits pass neither int() nor any sense.
        (lambda body: body.update(parameters={"stride": "\u00b2"}), 400, "parameter stride must be"),
        (lambda body: body.update(parameters={"padding": "1,\u0662"}), 400, "parameter padding must be"),
        (lambda body: body.update(parameters={"dilation": "9" * 5000}), 400, "parameter dilation must be"),
        # A native 422's message gains its field when it does not start with it (V2 errors have no loc).
        (lambda body: body.update(parameters={"groups": 3}), 422, "input: Given groups=3"),
    ],
)
def test_protocol_errors_have_error_body(open_server, mutate, status: int, phrase: str) -> None:
    x, w, _ = _problem()
    body = {"inputs": [_json_input("INPUT", x), _json_input("WEIGHT", w)]}
    mutate(body)
    response = _infer_json(open_server.url, body)
    assert response.status_code == status, response.text
    assert set(response.json()) == {"error"} and phrase in response.json()["error"]


def test_routing_errors_under_v2_have_error_body(open_server) -> None:
    wrong_method = httpx.get(f"{open_server.url}/v2/models/conv2d/infer")
    assert wrong_method.status_code == 405 and set(wrong_method.json()) == {"error"}
    no_route = httpx.get(f"{open_server.url}/v2/models/conv2d/stats/extra")
    assert no_route.status_code == 404 and set(no_route.json()) == {"error"}
    native = httpx.get(f"{open_server.url}/nothing-here")
    assert native.status_code == 404 and set(native.json()) == {"detail"}


def test_empty_outputs_means_every_output_and_parity_follows_what_is_returned(open_server) -> None:
    """Triton reads "outputs": [] as no choice made; parity figures are given for the tensors sent only."""
    x, w, b = _problem(9)
    inputs = [_json_input("INPUT", x), _json_input("WEIGHT", w), _json_input("BIAS", b)]
    every = _infer_json(open_server.url, {"inputs": inputs, "outputs": []}, model="conv2d_backward")
    assert every.status_code == 200, every.text
    assert [output["name"] for output in every.json()["outputs"]] == ["GRAD_INPUT", "GRAD_WEIGHT", "GRAD_BIAS"]
    one = _infer_json(open_server.url, {"inputs": inputs, "outputs": [{"name": "GRAD_WEIGHT"}]}, model="conv2d_backward").json()
    [output] = one["outputs"]
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    F.conv2d(x64, w64, b.double()).sum().backward()
    actual = torch.tensor(output["data"], dtype=torch.float64).reshape(output["shape"])
    torch.testing.assert_close(actual, w64.grad, atol=1e-4, rtol=1e-4)
    parity_names = {
        key.rsplit("_", 2)[-2] + "_" + key.rsplit("_", 1)[-1] for key in one["parameters"] if key.startswith("parity_max_abs_err_")
    }
    assert parity_names == {"GRAD_WEIGHT"} and one["parameters"]["parity_ok"] is True


def test_binary_size_mismatch_and_bad_header_length(open_server) -> None:
    x, w, _ = _problem()
    inputs = [
        {"name": n, "shape": list(t.shape), "datatype": "FP32", "parameters": {"binary_data_size": t.numel() * 4}}
        for n, t in (("INPUT", x), ("WEIGHT", w))
    ]
    header = json.dumps({"inputs": inputs}).encode()
    short = _post(open_server.url, "/v2/models/conv2d/infer", header + x.numpy().tobytes(), {HEADER: str(len(header))})
    assert short.status_code == 400 and "binary_data_size" in short.json()["error"]
    inputs[1]["parameters"]["binary_data_size"] = w.numel() * 2
    content = header.replace(str(w.numel() * 4).encode(), str(w.numel() * 2).encode())
    wrong = _post(
        open_server.url,
        "/v2/models/conv2d/infer",
        content + x.numpy().tobytes() + w.numpy().tobytes()[: w.numel() * 2],
        {HEADER: str(len(content))},
    )
    assert wrong.status_code == 400 and "needs" in wrong.json()["error"]
    for length in ("lots", "\u00b2".encode("latin-1"), "9" * 5000, "0" * 5000 + "5"):
        bad = _post(open_server.url, "/v2/models/conv2d/infer", header, {HEADER: length})
        assert bad.status_code == 400 and HEADER in bad.json()["error"], (length, bad.text)
    body = header + x.numpy().tobytes() + w.numpy().tobytes()
    unsaid = _post(open_server.url, "/v2/models/conv2d/infer", body)
    assert unsaid.status_code == 400 and f"needs the {HEADER} header" in unsaid.json()["error"]
    broken = _post(open_server.url, "/v2/models/conv2d/infer", b"{not json")
    assert broken.status_code == 400 and "not valid JSON" in broken.json()["error"]


def test_unknown_model_404_and_metadata_open(open_server) -> None:
    response = httpx.get(f"{open_server.url}/v2/models/conv3d")
    assert response.status_code == 404 and set(response.json()) == {"error"}
    assert httpx.get(f"{open_server.url}/v2/health/live").json() == {"live": True}
    assert httpx.get(f"{open_server.url}/v2/health/ready").json() == {"ready": True}


def test_strict_limits_and_auth_use_error_body(strict_server) -> None:
    big = torch.zeros(1, 1, 128, 128)
    w = torch.zeros(1, 1, 3, 3)
    body = {"inputs": [_json_input("INPUT", big), _json_input("WEIGHT", w)]}
    key = {"authorization": f"Bearer {API_KEY}"}
    too_large = _infer_json(strict_server.url, body, headers=key)
    assert too_large.status_code == 413 and f"{MAX_BODY_BYTES:,}" in too_large.json()["error"]
    small = {"inputs": [_json_input("INPUT", big[..., :8, :8]), _json_input("WEIGHT", w)]}
    unauthorized = _infer_json(strict_server.url, small)
    assert unauthorized.status_code == 401 and "API key" in unauthorized.json()["error"]
    assert unauthorized.headers["www-authenticate"] == "Bearer"
    assert _infer_json(strict_server.url, small, headers=key).status_code == 200
    gzip = _post(strict_server.url, "/v2/models/conv2d/infer", b"x", {**key, "content-encoding": "gzip"})
    assert gzip.status_code == 415 and set(gzip.json()) == {"error"}


def test_native_routes_keep_detail(open_server) -> None:
    response = httpx.post(f"{open_server.url}/forward", json={"input": [[[1.0]]]}, timeout=30)
    assert response.status_code == 422 and "detail" in response.json()


def test_metrics_count_v2_infer(open_server) -> None:
    x, w, _ = _problem(8)
    assert _infer_json(open_server.url, {"inputs": [_json_input("INPUT", x), _json_input("WEIGHT", w)]}).status_code == 200
    metrics = httpx.get(f"{open_server.url}/metrics").text
    assert 'conv_requests_total{algorithm="' in metrics and 'endpoint="/v2/infer"' in metrics


def test_binary_tensor_over_the_element_limit(strict_server) -> None:
    x, w = torch.zeros(1, 2, 64, 64), torch.zeros(1, 2, 3, 3)
    assert x.numel() > MAX_TENSOR_ELEMENTS and x.numel() * 4 < MAX_BODY_BYTES
    inputs = [
        {"name": n, "shape": list(t.shape), "datatype": "FP32", "parameters": {"binary_data_size": t.numel() * 4}}
        for n, t in (("INPUT", x), ("WEIGHT", w))
    ]
    header = json.dumps({"inputs": inputs}).encode()
    headers = {HEADER: str(len(header)), "authorization": f"Bearer {API_KEY}"}
    response = _post(strict_server.url, "/v2/models/conv2d/infer", header + x.numpy().tobytes() + w.numpy().tobytes(), headers)
    assert response.status_code == 413 and "CONV_MAX_TENSOR_ELEMENTS" in response.json()["error"]
