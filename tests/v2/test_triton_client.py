"""The V2 protocol through the official tritonclient[http], against a real server, compared with F.conv2d."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.v2.servers import API_KEY

triton = pytest.importorskip("tritonclient.http", reason='tritonclient[http] is a dev extra: pip install -e ".[dev]"')
ml_dtypes = pytest.importorskip("ml_dtypes")
InferenceServerException = pytest.importorskip("tritonclient.utils").InferenceServerException

MODELS = ["conv2d", "conv2d_backward"]


def _inputs(tensors: dict[str, np.ndarray], datatype: str, binary: bool) -> list[triton.InferInput]:
    inputs = []
    for name, array in tensors.items():
        entry = triton.InferInput(name, list(array.shape), datatype)
        entry.set_data_from_numpy(array, binary_data=binary)
        inputs.append(entry)
    return inputs


def _problem(seed: int = 0, dtype: torch.dtype = torch.float32, groups: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "INPUT": torch.randn(2, 4, 9, 8, generator=generator, dtype=torch.float64).to(dtype),
        "WEIGHT": torch.randn(6, 4 // groups, 3, 3, generator=generator, dtype=torch.float64).to(dtype),
        "BIAS": torch.randn(6, generator=generator, dtype=torch.float64).to(dtype),
    }


def _numpy(tensors: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {name: tensor.numpy() for name, tensor in tensors.items()}


# Conv parameters as the protocol carries them: "h,w" strings and lists, ints.
PARAMETERS = {"stride": "2,1", "padding": [1, 2], "dilation": 1, "groups": 2}
TORCH_ARGS = {"stride": (2, 1), "padding": (1, 2), "dilation": 1, "groups": 2}


def test_server_health_and_metadata(triton_client) -> None:
    assert triton_client.is_server_live()
    assert triton_client.is_server_ready()
    metadata = triton_client.get_server_metadata()
    assert metadata["name"] == "conv-as-a-service"
    assert {"binary_tensor_data", "parameters"} <= set(metadata["extensions"])


@pytest.mark.parametrize("model", MODELS)
def test_model_metadata_and_readiness(triton_client, model: str) -> None:
    metadata = triton_client.get_model_metadata(model)
    assert metadata["name"] == model and metadata["versions"] == ["1"]
    inputs = [entry["name"] for entry in metadata["inputs"]]
    outputs = [entry["name"] for entry in metadata["outputs"]]
    if model == "conv2d":
        assert (inputs, outputs) == (["INPUT", "WEIGHT", "BIAS"], ["OUTPUT"])
    else:
        assert inputs == ["INPUT", "WEIGHT", "BIAS", "GRAD_OUTPUT"]
        assert outputs[:3] == ["GRAD_INPUT", "GRAD_WEIGHT", "GRAD_BIAS"]
    assert triton_client.is_model_ready(model)
    assert triton_client.is_model_ready(model, model_version="1")
    assert triton_client.get_model_metadata(model, model_version="1") == metadata
    assert not triton_client.is_model_ready(model, model_version="2")
    assert not triton_client.is_model_ready("no_such_model")


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_forward(triton_client, binary: bool) -> None:
    tensors = _problem(1, groups=2)
    outputs = [triton.InferRequestedOutput("OUTPUT", binary_data=binary)]
    result = triton_client.infer("conv2d", _inputs(_numpy(tensors), "FP32", binary), outputs=outputs, parameters=PARAMETERS)
    expected = F.conv2d(tensors["INPUT"], tensors["WEIGHT"], tensors["BIAS"], **TORCH_ARGS)
    output = result.as_numpy("OUTPUT")
    assert output.dtype == np.float32
    torch.testing.assert_close(torch.from_numpy(output.copy()), expected, atol=1e-5, rtol=1e-4)
    response = result.get_response()
    assert response["model_name"] == "conv2d" and response["model_version"] == "1"
    parameters = response["parameters"]
    assert parameters["parity_ok"] is True and parameters["parity_allclose_OUTPUT"] is True
    assert 0 <= parameters["parity_max_abs_err_OUTPUT"] < 1e-5
    assert parameters["dtype"] == "float32" and parameters["device"] == "cpu" and parameters["algorithm"]
    assert ("binary_data_size" in (response["outputs"][0].get("parameters") or {})) is binary


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_backward(triton_client, binary: bool) -> None:
    tensors = _problem(2, groups=2)
    leaves = {name: tensor.clone().requires_grad_() for name, tensor in tensors.items()}
    output = F.conv2d(leaves["INPUT"], leaves["WEIGHT"], leaves["BIAS"], **TORCH_ARGS)
    grad_output = torch.randn(output.shape, generator=torch.Generator().manual_seed(3))
    output.backward(grad_output)
    inputs = _inputs(_numpy({**tensors, "GRAD_OUTPUT": grad_output}), "FP32", binary)
    names = ["GRAD_INPUT", "GRAD_WEIGHT", "GRAD_BIAS", "OUTPUT"]
    outputs = [triton.InferRequestedOutput(name, binary_data=binary) for name in names]
    result = triton_client.infer("conv2d_backward", inputs, outputs=outputs, parameters=PARAMETERS)
    for name, expected in zip(names, (leaves["INPUT"].grad, leaves["WEIGHT"].grad, leaves["BIAS"].grad, output.detach())):
        torch.testing.assert_close(torch.from_numpy(result.as_numpy(name).copy()), expected, atol=1e-4, rtol=1e-4)
    parameters = result.get_response()["parameters"]
    assert parameters["parity_ok"] and {f"parity_allclose_{name}" for name in names} <= set(parameters)


def test_backward_default_outputs_are_binary_without_output(triton_client) -> None:
    """No `outputs`: tritonclient asks binary_data_output; OUTPUT only comes back when asked for."""
    tensors = _problem(4)
    result = triton_client.infer("conv2d_backward", _inputs(_numpy(tensors), "FP32", True), parameters={"padding": "same", "loss": "sum"})
    response = result.get_response()
    assert [entry["name"] for entry in response["outputs"]] == ["GRAD_INPUT", "GRAD_WEIGHT", "GRAD_BIAS"]
    assert all("binary_data_size" in entry["parameters"] for entry in response["outputs"])
    leaves = {name: tensor.clone().requires_grad_() for name, tensor in tensors.items()}
    F.conv2d(leaves["INPUT"], leaves["WEIGHT"], leaves["BIAS"], padding="same").sum().backward()
    torch.testing.assert_close(torch.from_numpy(result.as_numpy("GRAD_WEIGHT").copy()), leaves["WEIGHT"].grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("datatype", "dtype", "binary", "tolerance"),
    [
        ("FP64", torch.float64, False, 1e-10),
        ("FP64", torch.float64, True, 1e-10),
        ("FP16", torch.float16, True, 2e-2),
        ("FP16", torch.float16, False, 2e-2),
        ("BF16", torch.bfloat16, True, 1e-1),
    ],
)
def test_datatypes(triton_client, datatype: str, dtype: torch.dtype, binary: bool, tolerance: float) -> None:
    tensors = _problem(5, dtype)
    arrays = {
        name: tensor.float().numpy().astype(ml_dtypes.bfloat16) if dtype == torch.bfloat16 else tensor.numpy()
        for name, tensor in tensors.items()
    }
    outputs = [triton.InferRequestedOutput("OUTPUT", binary_data=binary)]
    result = triton_client.infer("conv2d", _inputs(arrays, datatype, binary), outputs=outputs, parameters={"padding": 1})
    assert result.get_output("OUTPUT")["datatype"] == datatype
    output = result.as_numpy("OUTPUT")
    expected = F.conv2d(*(tensor.double() for tensor in tensors.values()), padding=1)
    torch.testing.assert_close(torch.from_numpy(output.astype(np.float64)), expected, atol=tolerance, rtol=tolerance)
    assert result.get_response()["parameters"]["parity_ok"] is True


def test_padding_valid_and_dilation_string(triton_client) -> None:
    tensors = _problem(6, groups=2)
    result = triton_client.infer(
        "conv2d", _inputs(_numpy(tensors), "FP32", True), parameters={"padding": "valid", "dilation": "2,1", "groups": 2}
    )
    expected = F.conv2d(tensors["INPUT"], tensors["WEIGHT"], tensors["BIAS"], dilation=(2, 1), groups=2)
    torch.testing.assert_close(torch.from_numpy(result.as_numpy("OUTPUT").copy()), expected, atol=1e-5, rtol=1e-4)


def _error(call) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as caught:
        call()
    return caught.value


def test_unknown_model_is_404(triton_client) -> None:
    error = _error(lambda: triton_client.infer("conv3d", _inputs(_numpy(_problem()), "FP32", True)))
    assert error.status() == "404" and "unknown model 'conv3d'" in error.message()


@pytest.mark.parametrize(
    ("parameters", "status", "phrase"),
    [
        ({"groups": 3}, "422", "groups"),
        ({"stride": "two"}, "400", "parameter stride"),
        ({"padding": "same", "stride": 2}, "422", "same"),
        ({"paddding": 1}, "422", "paddding"),
        ({"algorithm": "fft"}, "422", "algorithm"),
    ],
)
def test_bad_parameters(triton_client, parameters: dict, status: str, phrase: str) -> None:
    error = _error(lambda: triton_client.infer("conv2d", _inputs(_numpy(_problem()), "FP32", True), parameters=parameters))
    assert error.status() == status and phrase in error.message(), error


def test_auth(strict_triton_client) -> None:
    assert strict_triton_client.is_server_ready() and strict_triton_client.get_model_metadata("conv2d")["name"] == "conv2d"
    tensors = _problem(7)
    tensors["INPUT"] = tensors["INPUT"][:1, :, :4, :4]
    error = _error(lambda: strict_triton_client.infer("conv2d", _inputs(_numpy(tensors), "FP32", True)))
    assert error.status() == "401" and "API key" in error.message()
    wrong = _error(
        lambda: strict_triton_client.infer("conv2d", _inputs(_numpy(tensors), "FP32", True), headers={"Authorization": "Bearer nope"})
    )
    assert wrong.status() == "401"
    result = strict_triton_client.infer("conv2d", _inputs(_numpy(tensors), "FP32", True), headers={"Authorization": f"Bearer {API_KEY}"})
    expected = F.conv2d(tensors["INPUT"], tensors["WEIGHT"], tensors["BIAS"])
    torch.testing.assert_close(torch.from_numpy(result.as_numpy("OUTPUT").copy()), expected, atol=1e-5, rtol=1e-4)
