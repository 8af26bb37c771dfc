"""V2 inference request -> the native request body; the native outcome -> a V2 inference response.

A V2 request is a JSON header, optionally followed by the binary tensor data extension's raw bytes
(`Inference-Header-Content-Length` says where the JSON ends; each binary input says its
`binary_data_size`, in the order of "inputs"). It becomes the body /forward or /backward would take,
so `app.problem.parse_problem` validates it exactly as it validates theirs (same fields, same limits):

- binary input  -> a tensor over the raw bytes (their count checked against the shape first; the codec
  checks rank and the element limit, as for its own forms);
- flat "data"   -> {"shape", "dtype", "data"};
- nested "data" -> nested lists, parsed in the compute dtype (the INPUT's datatype unless the "dtype"
  parameter says otherwise), and checked against the declared shape afterwards.

Conv parameters come from the request's "parameters": ints, [h, w] lists or "h,w" strings for stride,
padding and dilation; padding also "same" / "valid". Triton's own request parameters
(binary_data_output, priority, sequence_*, timeout in microseconds) are understood, not forwarded.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import orjson
import torch

from app.codec import DTYPE_NAMES, encode_tensor
from app.compute import Outcome
from app.deps import decimal_int
from app.problem import Problem
from app.responses import Buffer
from app.v2.errors import ProtocolError
from app.v2.models import DATATYPE_NAMES, DATATYPES, VERSION, Model

_PAIRS = ("stride", "padding", "dilation")
# Triton's reserved request parameters: meaningful to the protocol, not conv options.
_IGNORED = {"sequence_id", "sequence_start", "sequence_end", "priority"}
_NOT_PARAMETERS = {"input", "weight", "bias", "grad_output", "encoding"}
HEADER_LENGTH = "Inference-Header-Content-Length"
# Where split_body looks for binary inputs when a body without Inference-Header-Content-Length is not JSON.
_HINT_BYTES = 1 << 16
_V2_NAMES = {"output": "OUTPUT", "grad_input": "GRAD_INPUT", "grad_weight": "GRAD_WEIGHT", "grad_bias": "GRAD_BIAS"}


@dataclass
class V2Request:
    """A decoded V2 request: the native body, what the response should hold, and how."""

    id: str | None
    body: dict[str, Any]
    shapes: dict[str, list[int]]
    outputs: dict[str, bool] | None = None  # requested V2 output -> binary; None: all, `binary_default`
    binary_default: bool = False


def split_body(raw: bytes, header_length: str | None) -> tuple[Any, memoryview]:
    """The JSON header (parsed) and the binary section after it (a view of the body)."""
    view = memoryview(raw)
    if header_length is None:
        json_bytes, binary = view, view[:0]
    else:
        length = decimal_int(header_length)
        if length is None or length > len(raw):
            raise ProtocolError(
                f"Inference-Header-Content-Length must be an integer <= the body's {len(raw):,} bytes, got {header_length!r}"
            )
        json_bytes, binary = view[:length], view[length:]
    try:
        return orjson.loads(json_bytes), binary
    except orjson.JSONDecodeError as error:
        hint = ""
        if header_length is None and b'"binary_data_size"' in bytes(view[:_HINT_BYTES]):
            hint = f" (binary tensor data after the JSON needs the {HEADER_LENGTH} header to say where the JSON ends)"
        raise ProtocolError(f"the inference request header is not valid JSON: {error}{hint}") from None


def _pair(name: str, value: Any) -> Any:
    """ "h,w" -> [h, w]; "3" -> 3; "same" / "valid" and ints / lists unchanged (the options model checks them)."""
    if not isinstance(value, str) or value in ("same", "valid"):
        return value
    parts = [part.strip() for part in value.split(",")]
    numbers = [decimal_int(part) for part in parts]
    if len(numbers) in (1, 2) and None not in numbers:
        return numbers[0] if len(numbers) == 1 else numbers
    allowed = 'an int, [h, w], "h,w"' + (', "same" or "valid"' if name == "padding" else "")
    raise ProtocolError(f"parameter {name} must be {allowed}, got {value!r}")


def _options(parameters: Any) -> tuple[dict[str, Any], bool]:
    """Request parameters -> native option fields, and binary_data_output."""
    if parameters is None:
        return {}, False
    if not isinstance(parameters, dict):
        raise ProtocolError(f"parameters must be a JSON object, got {type(parameters).__name__}")
    options: dict[str, Any] = {}
    binary_output = parameters.get("binary_data_output", False)
    if not isinstance(binary_output, bool):
        raise ProtocolError(f"parameter binary_data_output must be true or false, got {binary_output!r}")
    for name, value in parameters.items():
        if name in _IGNORED or name == "binary_data_output":
            continue
        if name in _NOT_PARAMETERS:
            raise ProtocolError(f"parameter {name!r} is not accepted here: tensors are inputs, and binary_data_output chooses the encoding")
        if name == "timeout":
            # Triton's timeout is in microseconds; an explicit timeout_s wins.
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                options.setdefault("timeout_s", value / 1e6)
                continue
            raise ProtocolError(f"parameter timeout must be a positive int (microseconds), got {value!r}")
        options[name] = _pair(name, value) if name in _PAIRS else value
    return options, binary_output


def _shape(name: str, shape: Any) -> list[int]:
    if not isinstance(shape, list) or any(isinstance(size, bool) or not isinstance(size, int) or size < 0 for size in shape):
        raise ProtocolError(f"input {name}: shape must be a list of non-negative ints, got {shape!r}")
    return shape


def _binary_tensor(name: str, shape: list[int], dtype: torch.dtype, raw: memoryview) -> torch.Tensor:
    """Raw little-endian bytes -> a tensor over them; the codec then checks rank and limits."""
    needed = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if len(raw) != needed:
        raise ProtocolError(
            f"input {name}: binary_data_size is {len(raw):,} bytes but shape {shape} of {DATATYPE_NAMES[dtype]} needs {needed:,}"
        )
    if not needed:
        return torch.empty(shape, dtype=dtype)
    tensor = torch.frombuffer(raw if not raw.readonly else bytearray(raw), dtype=dtype)
    # A view of the request body (read into a bytearray) when its offset suits the dtype: no copy of
    # megabytes; a misaligned one is copied once, so kernels never see unaligned data.
    if tensor.data_ptr() % tensor.element_size():
        tensor = tensor.clone()
    return tensor.reshape(shape)


def _json_tensor(name: str, shape: list[int], dtype: torch.dtype, data: Any) -> Any:
    if not isinstance(data, list):
        raise ProtocolError(f"input {name}: data must be a list of numbers (flat row-major or nested)")
    if data and isinstance(data[0], list):
        return data  # nested: the codec reads its shape, checked against `shape` after parsing
    if len(data) != math.prod(shape):
        raise ProtocolError(f"input {name}: data has {len(data):,} values but shape {shape} needs {math.prod(shape):,}")
    return {"shape": shape, "dtype": DTYPE_NAMES[dtype], "data": data}


def _entry_parameters(entry: dict, what: str) -> dict[str, Any]:
    parameters = entry.get("parameters")
    if parameters is None:
        return {}
    if not isinstance(parameters, dict):
        raise ProtocolError(f"{what}: parameters must be a JSON object, got {type(parameters).__name__}")
    return parameters


def _requested_outputs(model: Model, outputs: Any, binary_default: bool) -> dict[str, bool] | None:
    if outputs is None:
        return None
    if not isinstance(outputs, list):
        raise ProtocolError("outputs must be a list of {name, parameters}")
    if not outputs:
        return None  # as Triton reads it: no output named means every output
    requested: dict[str, bool] = {}
    for entry in outputs:
        name = entry.get("name") if isinstance(entry, dict) else None
        if name not in model.outputs:
            raise ProtocolError(f"model {model.name} has no output {name!r}; outputs: {list(model.outputs)}")
        if name in requested:
            raise ProtocolError(f"output {name} is requested twice")
        binary = _entry_parameters(entry, f"output {name}").get("binary_data", binary_default)
        if not isinstance(binary, bool):
            raise ProtocolError(f"output {name}: parameter binary_data must be true or false, got {binary!r}")
        requested[name] = binary
    return requested


def decode_request(model: Model, header: Any, binary: memoryview) -> V2Request:
    """The JSON header and the binary section -> V2Request; 400 (ProtocolError) for protocol mistakes."""
    if not isinstance(header, dict):
        raise ProtocolError(f"the inference request must be a JSON object, got {type(header).__name__}")
    options, binary_default = _options(header.get("parameters"))
    inputs = header.get("inputs")
    if not isinstance(inputs, list):
        raise ProtocolError(f"inputs must be a list of tensors; model {model.name} takes {list(model.inputs)}")
    body: dict[str, Any] = dict(options)
    shapes: dict[str, list[int]] = {}
    datatypes: dict[str, torch.dtype] = {}
    offset = 0
    for entry in inputs:
        name = entry.get("name") if isinstance(entry, dict) else None
        if name not in model.inputs:
            raise ProtocolError(f"model {model.name} has no input {name!r}; inputs: {list(model.inputs)}")
        if name in shapes:
            raise ProtocolError(f"input {name} is given twice")
        datatype = entry.get("datatype")
        if datatype not in DATATYPES:
            raise ProtocolError(f"input {name}: datatype must be one of {list(DATATYPES)}, got {datatype!r}")
        dtype, shape = DATATYPES[datatype], _shape(name, entry.get("shape"))
        size = _entry_parameters(entry, f"input {name}").get("binary_data_size")
        if size is not None and "data" in entry:
            raise ProtocolError(f"input {name} has both data and a binary_data_size parameter; give one")
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise ProtocolError(f"input {name}: binary_data_size {size!r} does not fit the {len(binary) - offset:,} binary bytes left")
            body[model.inputs[name]] = _binary_tensor(name, shape, dtype, binary[offset : offset + size])
            offset += size
        elif "data" in entry:
            body[model.inputs[name]] = _json_tensor(name, shape, dtype, entry["data"])
        else:
            raise ProtocolError(f"input {name} has neither data nor a binary_data_size parameter")
        shapes[name], datatypes[name] = shape, dtype
    if offset != len(binary):
        raise ProtocolError(f"the binary section has {len(binary):,} bytes but the inputs' binary_data_size add up to {offset:,}")
    missing = [name for name in model.required if name not in shapes]
    if missing:
        raise ProtocolError(f"model {model.name} needs inputs {list(model.required)}; missing {missing}")
    # Compute dtype: the INPUT's datatype, as the native API takes the input's dtype; nested lists parse in it.
    body.setdefault("dtype", DTYPE_NAMES[datatypes["INPUT"]])
    outputs = _requested_outputs(model, header.get("outputs"), binary_default)
    if model.backward and outputs is not None and "OUTPUT" in outputs:
        body["return_output"] = True
    if outputs is not None and "GRAD_BIAS" in outputs and "BIAS" not in shapes:
        raise ProtocolError("output GRAD_BIAS needs input BIAS")
    request_id = header.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise ProtocolError(f"id must be a string, got {type(request_id).__name__}")
    return V2Request(request_id, body, shapes, outputs, binary_default)


def check_shapes(model: Model, request: V2Request, problem: Problem) -> None:
    """Each decoded tensor has the shape its input declared (nested data is read by its own nesting)."""
    for name, shape in request.shapes.items():
        tensor = getattr(problem, model.inputs[name])
        if tensor is not None and list(tensor.shape) != shape:
            raise ProtocolError(f"input {name}: data has shape {list(tensor.shape)} but the declared shape is {shape}")


def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes without a copy (sent as they are)."""
    tensor = tensor.detach().cpu().contiguous()
    # numpy has no bfloat16: its bits go out as int16, little-endian like the rest.
    return memoryview((tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor).numpy()).cast("B")


def response_parameters(outcome: Outcome, problem: Problem, timing_ms: dict[str, float], returned: Iterable[str]) -> dict[str, Any]:
    """Flat scalars, as the protocol's parameters are: parity_ok, parity_max_abs_err_OUTPUT, timing_ms_compute, ...
    Per-tensor figures only for the `returned` V2 outputs; parity_ok still covers everything computed."""
    returned = set(returned)
    parameters: dict[str, Any] = {"algorithm": outcome.algorithm, "device": problem.device, "dtype": problem.dtype_name}
    report = outcome.parity
    if report is not None:
        parameters.update(
            {
                "parity_ok": report["ok"],
                "parity_reference": report["reference"],
                "parity_atol": report["atol"],
                "parity_rtol": report["rtol"],
            }
        )
        for field_name, entry in report["tensors"].items():
            if _V2_NAMES[field_name] not in returned:
                continue
            for key, value in entry.items():
                parameters[f"parity_{key}_{_V2_NAMES[field_name]}"] = value
        for field_name, sides in ((report.get("exact") or {}).get("tensors") or {}).items():
            if _V2_NAMES[field_name] not in returned:
                continue
            for side, errors in sides.items():
                for key, value in errors.items():
                    parameters[f"exact_{side}_{key}_{_V2_NAMES[field_name]}"] = value
    for stage, milliseconds in timing_ms.items():
        parameters[f"timing_ms_{stage}"] = round(milliseconds, 3)
    return parameters


def _outputs(model: Model, request: V2Request, outcome: Outcome) -> dict[str, tuple[torch.Tensor, bool]]:
    """The outputs to send, in order: V2 name -> (tensor, as binary data?)."""
    available = {name: outcome.tensors.get(field_name) for name, field_name in model.outputs.items()}
    wanted = (
        request.outputs
        if request.outputs is not None
        else {name: request.binary_default for name, value in available.items() if value is not None}
    )
    return {name: (available[name], binary) for name, binary in wanted.items() if available[name] is not None}


def text_elements(model: Model, request: V2Request, outcome: Outcome) -> int:
    """How many elements encoding writes as JSON numbers (binary outputs cost no encoding time)."""
    return sum(tensor.numel() for tensor, binary in _outputs(model, request, outcome).values() if not binary)


def encode_response(
    model: Model, request: V2Request, outcome: Outcome, problem: Problem, timing_ms: dict[str, float]
) -> tuple[list[Buffer], int | None]:
    """-> (the body's parts in order, JSON header length when a binary section follows, else None).

    The parts are the JSON header, then each binary output's own memory: sent one after another
    (app/responses.PartsResponse), never joined into a copy."""
    outputs, chunks = [], []
    sent = _outputs(model, request, outcome)
    for name, (tensor, binary) in sent.items():
        entry: dict[str, Any] = {"name": name, "datatype": DATATYPE_NAMES[tensor.dtype], "shape": list(tensor.shape)}
        if binary:
            chunk = _raw_bytes(tensor)
            entry["parameters"] = {"binary_data_size": len(chunk)}
            chunks.append(chunk)
        else:
            entry["data"] = encode_tensor(tensor, "flat")["data"]
        outputs.append(entry)
    header: dict[str, Any] = {"model_name": model.name, "model_version": VERSION}
    if request.id is not None:
        header["id"] = request.id
    header["parameters"] = response_parameters(outcome, problem, timing_ms, sent)
    header["outputs"] = outputs
    json_bytes = orjson.dumps(header, option=orjson.OPT_SERIALIZE_NUMPY)
    return [json_bytes, *chunks], len(json_bytes) if chunks else None
