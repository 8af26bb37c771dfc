"""Request and response models.

The non-tensor fields are validated by pydantic (`ForwardOptions`, `BackwardOptions`); tensor fields are
validated by app/codec.py in bulk, never element by element here. `ForwardRequest` / `BackwardRequest`
describe the whole body for OpenAPI (/docs and schema-driven fuzzing); the routes parse the raw bytes
with orjson and validate the options with the *Options models.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field
from typing_extensions import TypeAliasType

import kernels

DTypeName = Literal["float64", "float32", "float16", "bfloat16"]
NonFinite = Literal["NaN", "Infinity", "-Infinity"]
Number = float | NonFinite
NestedNumbers = TypeAliasType("NestedNumbers", list[Union[Number, "NestedNumbers"]])
AlgorithmName = Literal[tuple(kernels.names())]  # type: ignore[valid-type]
# Upper bounds keep every derived size inside int64; far beyond any conv that fits the element limits.
MAX_ARGUMENT = 1 << 20
PositiveInt = Annotated[int, Field(ge=1, le=MAX_ARGUMENT)]
IntPair = PositiveInt | Annotated[list[PositiveInt], Field(min_length=2, max_length=2)]
NonNegativeInt = Annotated[int, Field(ge=0, le=MAX_ARGUMENT)]
ShapeDim = Annotated[int, Field(ge=0)]
Padding = NonNegativeInt | Annotated[list[NonNegativeInt], Field(min_length=2, max_length=2)] | Literal["same", "valid"]
Tolerance = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class TensorFlat(BaseModel):
    """A tensor as shape + row-major values."""

    model_config = ConfigDict(extra="forbid")
    shape: list[ShapeDim]
    dtype: DTypeName = "float32"
    data: list[Number]


class TensorBase64(BaseModel):
    """A tensor as shape + base64 of its little-endian row-major bytes."""

    model_config = ConfigDict(extra="forbid")
    shape: list[ShapeDim]
    dtype: DTypeName = "float32"
    b64: str


Tensor = TypeAliasType("Tensor", NestedNumbers | TensorFlat | TensorBase64)


class ForwardOptions(BaseModel):
    """Every /forward field except the tensors."""

    model_config = ConfigDict(strict=True, extra="forbid")

    stride: IntPair = Field(1, description="int or [h, w], >= 1")
    padding: Padding = Field(0, description='int, [h, w], "same" (stride 1 only) or "valid"')
    dilation: IntPair = Field(1, description="int or [h, w], >= 1")
    groups: PositiveInt = Field(1, description="input and output channels are split into this many groups")
    padding_mode: Literal["zeros", "reflect", "replicate", "circular"] = "zeros"
    algorithm: AlgorithmName = Field("auto", description="auto or a name listed by GET /info")
    dtype: DTypeName | None = Field(None, description="compute dtype; null: the input's (nested lists are float32)")
    device: Annotated[str, Field(pattern=r"^(auto|cpu|cuda(:\d+)?)$")] = Field("auto", description="auto: the server's CONV_DEVICE")
    parity: bool = Field(True, description="compare with nn.Conv2d's math (F.conv2d) on the same device and dtype")
    exact: bool = Field(False, description="also compare ours and nn.Conv2d with a float64 CPU oracle")
    atol: Tolerance | None = Field(None, description="parity tolerance; null: per dtype (see /info)")
    rtol: Tolerance | None = Field(None, description="parity tolerance; null: per dtype (see /info)")
    allow_tf32: bool = Field(False, description="allow TF32 in both ours and the reference (CUDA only)")
    encoding: Literal["list", "flat", "base64"] = Field("list", description="how tensors come back")
    timeout_s: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = Field(None, description="deadline; capped at the server's")


class BackwardOptions(ForwardOptions):
    """Every /backward field except the tensors."""

    loss: Literal["sum", "mean_square"] = Field(
        "sum", description="upstream gradient without grad_output: sum (ones) or mean_square (y.square().mean())"
    )
    return_output: bool = Field(False, description="also return the forward output")


_SEED_INPUT = [
    [[[0.5, -1.0, 2.0], [1.5, 0.0, -0.5], [1.0, 2.0, -2.0]]],
    [[[-1.5, 0.5, 1.0], [0.0, 1.0, 0.5], [2.0, -1.0, 0.0]]],
]
_SEED_WEIGHT = [
    [[[0.1, 0.2, 0.3], [0.0, -0.1, 0.2], [0.3, 0.1, -0.2]]],
    [[[-0.3, 0.0, 0.1], [0.2, 0.2, -0.1], [0.0, 0.1, 0.3]]],
]
FORWARD_EXAMPLE: dict[str, Any] = {"input": _SEED_INPUT, "weight": _SEED_WEIGHT, "bias": [0.1, -0.2], "padding": 1}
BACKWARD_EXAMPLE: dict[str, Any] = {**FORWARD_EXAMPLE, "loss": "mean_square", "return_output": True}


class ForwardRequest(ForwardOptions):
    """POST /forward body."""

    model_config = ConfigDict(json_schema_extra={"examples": [FORWARD_EXAMPLE]})
    input: Tensor = Field(description="(N, C_in, H, W) or (C_in, H, W)")
    weight: Tensor = Field(description="(C_out, C_in/groups, kH, kW)")
    bias: Tensor | None = Field(None, description="(C_out,) or null")


class BackwardRequest(BackwardOptions):
    """POST /backward body."""

    model_config = ConfigDict(json_schema_extra={"examples": [BACKWARD_EXAMPLE]})
    input: Tensor = Field(description="(N, C_in, H, W) or (C_in, H, W)")
    weight: Tensor = Field(description="(C_out, C_in/groups, kH, kW)")
    bias: Tensor | None = Field(None, description="(C_out,) or null")
    grad_output: Tensor | None = Field(None, description="upstream gradient, the output's shape; null: the loss's")


class Errors(BaseModel):
    max_abs_err: float | NonFinite
    max_rel_err: float | NonFinite


class TensorParity(Errors):
    allclose: bool = Field(
        description="torch.allclose(ours, reference, rtol, atol, equal_nan=True): every element within tolerance of itself"
    )
    close: bool = Field(description="the verdict: max_abs_err <= atol + rtol * max |reference| (the tensor's scale); `ok` is all of them")


class ExactReport(BaseModel):
    reference: str
    tensors: dict[str, dict[Literal["ours", "torch"], Errors]]


class Parity(BaseModel):
    ok: bool
    reference: str
    atol: float
    rtol: float
    tensors: dict[str, TensorParity]
    exact: ExactReport | None = None


class Timing(BaseModel):
    decode: float
    queue: float
    compute: float
    reference: float
    encode: float
    total: float


class ForwardResponse(BaseModel):
    output: Tensor
    algorithm: str
    device: str
    dtype: DTypeName
    parity: Parity | None
    timing_ms: Timing


class BackwardResponse(BaseModel):
    grad_input: Tensor
    grad_weight: Tensor
    grad_bias: Tensor | None
    output: Tensor | None = None
    algorithm: str
    device: str
    dtype: DTypeName
    parity: Parity | None
    timing_ms: Timing


class Detail(BaseModel):
    detail: Any
