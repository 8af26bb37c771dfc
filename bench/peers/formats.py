"""How each server is asked for the same conv: request bodies and response decoding, per server and encoding.

A `Variant` is one (server, encoding) pair: where to POST, a body (and any extra headers) built from the
workload's tensors, and a decoder that turns the response back into the output array so the benchmark can
check the answer before timing it. Encodings are grouped in two classes for the ratios: "text" (numbers as
JSON lists) and "binary" (raw float32 bytes, as base64 in JSON or as KServe's binary tensor extension).
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import orjson

Tensors = dict[str, np.ndarray]  # "input" (N, C_in, H, W), "weight" (C_out, C_in, kH, kW), "bias" (C_out,); float32


@dataclass(frozen=True)
class Variant:
    server: str  # "ours", "litserve", "kserve", "fastapi-noop", or a diagnostic run of ours ("ours-1thread", ...)
    encoding: str  # as shown in the tables
    kind: str  # "text" or "binary": which of our encodings a peer's ratio is taken against
    path: str
    build: Callable[[Tensors, dict], tuple[bytes, dict[str, str]]]  # -> (body, extra headers)
    decode: Callable[[bytes, dict[str, str]], np.ndarray] | None  # (response body, response headers) -> output; None: no answer to check
    content_type: str = "application/json"
    parity: bool = False

    @property
    def label(self) -> str:
        return f"{self.server} {self.encoding}" + (" +parity" if self.parity else "")


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array, dtype="<f4").tobytes()).decode("ascii")


def _from_b64(value: dict) -> np.ndarray:
    return np.frombuffer(base64.b64decode(value["b64"]), dtype="<f4").reshape(value["shape"])


def _json_tensor(array: np.ndarray, encoding: str) -> object:
    if encoding == "base64":
        return {"shape": list(array.shape), "dtype": "float32", "b64": _b64(array)}
    if encoding == "flat":
        return {"shape": list(array.shape), "dtype": "float32", "data": array.ravel()}
    return array  # orjson writes an ndarray as nested lists


def _dumps(body: dict) -> bytes:
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)


def _output_tensor(value: object) -> np.ndarray:
    if isinstance(value, dict):
        if "b64" in value:
            return _from_b64(value)
        return np.asarray(value["data"], dtype=np.float32).reshape(value["shape"])
    return np.asarray(value, dtype=np.float32)


# ours: POST /forward, {"input": T, "weight": T, "bias": T, conv args, "algorithm", "parity", "encoding"}.


def ours(encoding: str, parity: bool = False, server: str = "ours") -> Variant:
    def build(tensors: Tensors, conv: dict) -> bytes:
        body = {name: _json_tensor(tensors[name], encoding) for name in ("input", "weight", "bias")}
        return _dumps({**body, **conv["args"], "algorithm": conv["algorithm"], "parity": parity, "encoding": encoding}), {}

    def decode(content: bytes, headers: dict[str, str]) -> np.ndarray:
        return _output_tensor(orjson.loads(content)["output"])

    return Variant(server, encoding, "binary" if encoding == "base64" else "text", "/forward", build, decode, parity=parity)


def noop() -> Variant:
    """Our list request to bench/peers/noop_server.py, which answers a constant: the FastAPI ceiling."""
    return Variant("fastapi-noop", "list", "text", "/forward", ours("list").build, None)


# LitServe: POST /predict, {"input": T, "weight": T, "bias": T, conv args}; T nested lists or {shape, b64}.


def litserve(encoding: str, server: str = "litserve") -> Variant:
    def build(tensors: Tensors, conv: dict) -> bytes:
        body = {
            name: ({"shape": list(value.shape), "b64": _b64(value)} if encoding == "base64" else value) for name, value in tensors.items()
        }
        return _dumps({**body, **conv["args"]}), {}

    def decode(content: bytes, headers: dict[str, str]) -> np.ndarray:
        return _output_tensor(orjson.loads(content)["output"])

    return Variant(server, encoding, "binary" if encoding == "base64" else "text", "/predict", build, decode)


# KServe V2 (Open Inference Protocol): POST /v2/models/conv2d/infer, inputs as V2 tensors, conv args as parameters.

KSERVE_PATH = "/v2/models/conv2d/infer"
_HEADER_LENGTH = "Inference-Header-Content-Length"


def _v2_input(name: str, array: np.ndarray, binary: bool) -> dict:
    tensor = {"name": name, "shape": list(array.shape), "datatype": "FP32"}
    if binary:
        tensor["parameters"] = {"binary_data_size": array.size * 4}
    else:
        tensor["data"] = array.ravel()
    return tensor


def _v2_binary_request(names: dict[str, str], tensors: Tensors, parameters: dict) -> tuple[bytes, dict[str, str]]:
    """A V2 request with the binary tensor extension both ways: JSON header, then raw float32 bytes; -> (body, headers)."""
    inputs = [_v2_input(names.get(name, name), value, binary=True) for name, value in tensors.items()]
    header = _dumps({"inputs": inputs, "parameters": {**parameters, "binary_data_output": True}})
    raw = b"".join(np.ascontiguousarray(value, dtype="<f4").tobytes() for value in tensors.values())
    return header + raw, {_HEADER_LENGTH: str(len(header))}


def kserve(binary: bool) -> Variant:
    def build(tensors: Tensors, conv: dict) -> bytes:
        if binary:
            return _v2_binary_request({}, tensors, conv["args"])
        return _dumps({"inputs": [_v2_input(name, value, False) for name, value in tensors.items()], "parameters": conv["args"]}), {}

    def decode(content: bytes, headers: dict[str, str]) -> np.ndarray:
        if binary:
            return _v2_binary_output(content, headers)
        output = orjson.loads(content)["outputs"][0]
        return np.asarray(output["data"], dtype=np.float32).reshape(output["shape"])

    return Variant(
        "kserve",
        "v2-binary" if binary else "v2-json",
        "binary" if binary else "text",
        KSERVE_PATH,
        build,
        decode,
        content_type="application/octet-stream" if binary else "application/json",
    )


# ours, V2: the KServe request form on our server, POST /v2/models/conv2d/infer.


def ours_v2_binary(server: str = "ours") -> Variant:
    """Our V2 endpoint with the binary tensor extension both ways: raw float32 bytes, no JSON numbers, no base64."""
    names = {"input": "INPUT", "weight": "WEIGHT", "bias": "BIAS"}

    def build(tensors: Tensors, conv: dict) -> bytes:
        return _v2_binary_request(names, tensors, {**conv["args"], "algorithm": conv["algorithm"], "parity": False})

    return Variant(server, "v2-binary", "binary", KSERVE_PATH, build, _v2_binary_output, "application/octet-stream")


def _v2_binary_output(content: bytes, headers: dict[str, str]) -> np.ndarray:
    header_length = int(headers[_HEADER_LENGTH.lower()])
    output = orjson.loads(content[:header_length])["outputs"][0]
    return np.frombuffer(content[header_length:], dtype="<f4").reshape(output["shape"])


def v2_binary_timing(content: bytes, headers: dict[str, str]) -> dict[str, float]:
    """Our server's timing_ms from a V2 binary response's parameters (timing_ms_<stage>)."""
    parameters = orjson.loads(content[: int(headers[_HEADER_LENGTH.lower()])])["parameters"]
    return {key.removeprefix("timing_ms_"): value for key, value in parameters.items() if key.startswith("timing_ms_")}
