"""The two V2 models, their tensors by V2 name and native field, and the metadata the protocol serves."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

import app as package

VERSION = "1"
# V2 datatype <-> torch dtype; BF16 travels as raw little-endian bfloat16 bits in binary, as numbers in JSON.
DATATYPES: dict[str, torch.dtype] = {"FP64": torch.float64, "FP32": torch.float32, "FP16": torch.float16, "BF16": torch.bfloat16}
DATATYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DATATYPES.items()}
# Triton's extension names for what this server implements of the protocol.
EXTENSIONS = ["binary_tensor_data", "parameters"]


@dataclass(frozen=True)
class Model:
    """One V2 model: `inputs` / `outputs` map V2 tensor names to the native request / response fields."""

    name: str
    backward: bool
    inputs: dict[str, str]
    required: tuple[str, ...]
    outputs: dict[str, str]
    ranks: dict[str, int]

    def metadata(self) -> dict[str, Any]:
        def tensor(name: str) -> dict[str, Any]:
            return {"name": name, "datatype": "FP32", "shape": [-1] * self.ranks[name]}

        return {
            "name": self.name,
            "versions": [VERSION],
            "platform": "conv-as-a-service",
            "inputs": [tensor(name) for name in self.inputs],
            "outputs": [tensor(name) for name in self.outputs],
        }


_FORWARD_INPUTS = {"INPUT": "input", "WEIGHT": "weight", "BIAS": "bias"}
_RANKS = {"INPUT": 4, "WEIGHT": 4, "BIAS": 1, "GRAD_OUTPUT": 4, "OUTPUT": 4, "GRAD_INPUT": 4, "GRAD_WEIGHT": 4, "GRAD_BIAS": 1}

MODELS: dict[str, Model] = {
    "conv2d": Model("conv2d", False, _FORWARD_INPUTS, ("INPUT", "WEIGHT"), {"OUTPUT": "output"}, _RANKS),
    "conv2d_backward": Model(
        "conv2d_backward",
        True,
        {**_FORWARD_INPUTS, "GRAD_OUTPUT": "grad_output"},
        ("INPUT", "WEIGHT"),
        {"GRAD_INPUT": "grad_input", "GRAD_WEIGHT": "grad_weight", "GRAD_BIAS": "grad_bias", "OUTPUT": "output"},
        _RANKS,
    ),
}


def server_metadata() -> dict[str, Any]:
    return {"name": "conv-as-a-service", "version": package.__version__, "extensions": EXTENSIONS}
