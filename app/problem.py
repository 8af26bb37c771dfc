"""A request body -> a validated `Problem`: options checked, tensors decoded, shapes and limits checked.

Everything here runs before any device work, so a client mistake is a 4xx that names its field:
shapes are checked with kernels' own rules (`kernels.params.normalize` on meta tensors, which
allocate nothing), and work is counted in MACs against the limits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import ValidationError

import kernels
from app.codec import DTYPE_NAMES, DTYPES, as_dtype, decode_tensor
from app.config import Settings
from app.errors import InvalidField, InvalidFields, TooLarge
from app.schemas import BackwardOptions, ForwardOptions
from kernels.limits import macs
from kernels.params import normalize

# Which JSON field a kernels/torch-style argument error is about, by the first phrase its message has.
_BLAME = (
    ("padding_mode", "padding_mode"),
    ("padding=", "padding"),
    ("Invalid padding", "padding"),
    ("negative padding", "padding"),
    ("Padding", "padding"),
    ("padding", "padding"),
    ("Kernel size", "weight"),
    ("stride", "stride"),
    ("dilation", "dilation"),
    ("divisible by", "groups"),
    ("channels", "input"),
    ("bias", "bias"),
    ("weight", "weight"),
    ("input", "input"),
)


@dataclass
class Problem:
    """A checked request: CPU tensors already in the compute dtype, the device to run on, its work in MACs."""

    options: ForwardOptions
    input: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    grad_output: torch.Tensor | None
    dtype: torch.dtype
    device: str
    macs: int
    # Host bytes it takes while it runs (app/admission.py): inputs, output and gradients, the oracle's
    # copies of the results with parity on, the padded input, and the results' encoded JSON.
    memory_bytes: int
    # Elements its convs read and write besides the MACs' count: the padded input and the output (x3 for
    # /backward). A 4-MAC request padded by 4,000 builds a 64M-element input: not a tiny problem.
    moved_elements: int = 0

    @property
    def dtype_name(self) -> str:
        return DTYPE_NAMES[self.dtype]


def _options(body: dict, model: type[ForwardOptions], tensor_fields: tuple[str, ...]) -> ForwardOptions:
    try:
        return model.model_validate({key: value for key, value in body.items() if key not in tensor_fields})
    except ValidationError as error:
        raise InvalidFields(_field_errors(error, model)) from None


def _field_errors(error: ValidationError, model: type[ForwardOptions]) -> list[dict]:
    """pydantic's errors, one entry per field: a union's alternatives are joined, the allowed values added."""
    by_field: dict[str, dict] = {}
    for entry in error.errors(include_url=False):
        field = str(entry["loc"][0]) if entry["loc"] else ""
        merged = by_field.setdefault(field, {"type": entry["type"], "loc": ["body", field] if field else ["body"], "msg": []})
        if entry["msg"] not in merged["msg"]:
            merged["msg"].append(entry["msg"])
    for field, merged in by_field.items():
        info = model.model_fields.get(field)
        allowed = f" (allowed: {info.description})" if info is not None and info.description else ""
        merged["msg"] = f"{field}: {'; or '.join(merged['msg'])}{allowed}" if field else "; ".join(merged["msg"])
    return list(by_field.values())


def resolve_device(requested: str, default: str, available: list[str]) -> str:
    """ "auto" -> the server's default; "cuda" -> "cuda:0"; 422 when the device is not on this host."""
    name = default if requested == "auto" else requested
    name = "cuda:0" if name == "cuda" else name
    if name not in available:
        raise InvalidField("device", f"device {requested!r} is not available here; allowed: {['auto', *available]}")
    return name


def _check_algorithm(name: str, device: str, dtype: torch.dtype) -> None:
    if name == "auto":
        return
    support = kernels.algorithms()[name]
    device_type = device.split(":")[0]
    if device_type not in support["devices"]:
        raise InvalidField(
            "algorithm", f"algorithm {name!r} runs on {support['devices']}, not {device_type}; use 'auto' or another from GET /info"
        )
    if DTYPE_NAMES[dtype] not in support["dtypes"]:
        raise InvalidField("algorithm", f"algorithm {name!r} supports dtypes {support['dtypes']}, not {DTYPE_NAMES[dtype]}")


def _blame(message: str) -> str:
    for phrase, field in _BLAME:
        if phrase in message:
            return field
    return "weight"


# The zero-padded input may have this many times CONV_MAX_TENSOR_ELEMENTS: the algorithms and the
# parity oracle (for non-zero padding modes) build it, and padding is not counted in MACs, so a 1 MB
# request (1x64x64x64, a 3x3 kernel dilated 2000, padding 2000) took the server to 4.4 GB. Four times
# (67M elements by default) takes "same" padding on small maps, which grows the input most: ConvNeXt-B's
# 7x7 depthwise on 7x7 maps at batch 256 (12.8M elements, 44.3M padded), DeepLab's rate-24 ASPP 3x3 on
# 41x41 maps at batch 3 (10.3M, 48.7M padded).
PADDED_INPUT_FACTOR = 4


def _output_shape(
    options: ForwardOptions, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> tuple[tuple[int, ...], ForwardOptions, tuple[int, int, int, int]]:
    """Validate the conv arguments with kernels' rules; -> the output's shape, the options with the
    stride clamped to the span the kernel can move over, and the zero-padded input's shape (N, C, H_pad, W_pad).

    A stride past that span gives the same one-pixel output whatever its size, but torch's CPU backward
    (the parity oracle) crashes the whole process on strides near 2**16, so no conv ever sees one."""
    batched = input if input.dim() == 4 else input.unsqueeze(0)
    try:  # normalize reads only shapes, dtypes and devices
        spec = normalize(batched, weight, bias, options.stride, options.padding, options.dilation, options.groups, options.padding_mode)
    except (RuntimeError, ValueError, TypeError) as error:
        raise InvalidField(_blame(str(error)), str(error)) from None
    out_height, out_width = spec.output_size(batched.shape[2], batched.shape[3], weight.shape[2], weight.shape[3])
    shape = (batched.shape[0], weight.shape[0], out_height, out_width)
    top, bottom, left, right = spec.padding
    padded = (batched.shape[0], batched.shape[1], batched.shape[2] + top + bottom, batched.shape[3] + left + right)
    spans = (padded[2] - spec.dilation[0] * (weight.shape[2] - 1), padded[3] - spec.dilation[1] * (weight.shape[3] - 1))
    stride = [max(1, min(step, span)) for step, span in zip(spec.stride, spans)]
    if tuple(stride) != spec.stride:
        options = options.model_copy(update={"stride": stride})
    return (shape if input.dim() == 4 else shape[1:]), options, padded


def parse_problem(body: Any, backward: bool, settings: Settings, devices: list[str], default_device: str) -> Problem:
    """Body (parsed JSON) -> Problem; raises the 4xx ApiErrors. Runs off the event loop (it converts tensors)."""
    if not isinstance(body, dict):
        raise InvalidField((), f"the body must be a JSON object, got {type(body).__name__}")
    tensor_fields = ("input", "weight", "bias", "grad_output") if backward else ("input", "weight", "bias")
    options = _options(body, BackwardOptions if backward else ForwardOptions, tensor_fields)
    if options.exact and not options.parity:  # else the float64 comparison asked for would be silently skipped
        raise InvalidField("exact", "exact is part of the parity report (parity.exact): it needs parity true")
    device = resolve_device(options.device, default_device, devices)
    for required in ("input", "weight"):
        if body.get(required) is None:
            raise InvalidField(required, f"{required} is required: nested lists or {{shape, dtype, data | b64}}", kind="missing")
    list_dtype = DTYPES[options.dtype] if options.dtype else torch.float32
    limit = settings.max_tensor_elements

    def decode(field: str, ranks: tuple[int, ...]) -> torch.Tensor | None:
        value = body.get(field)
        return None if value is None else decode_tensor(value, field, list_dtype=list_dtype, ranks=ranks, max_elements=limit)

    input = decode("input", (3, 4))
    weight = decode("weight", (4,))
    bias = decode("bias", (1,))
    grad_output = decode("grad_output", (3, 4)) if backward else None
    if grad_output is not None and "loss" in options.model_fields_set:
        raise InvalidField(
            "loss", "give grad_output or loss, not both: with grad_output the gradients are those of sum(output * grad_output)"
        )
    assert input is not None and weight is not None
    dtype = DTYPES[options.dtype] if options.dtype else input.dtype
    input, weight, bias, grad_output = (as_dtype(tensor, dtype) for tensor in (input, weight, bias, grad_output))
    _check_algorithm(options.algorithm, device, dtype)

    output_shape, options, padded_shape = _output_shape(options, input, weight, bias)
    if grad_output is not None and tuple(grad_output.shape) != output_shape:
        raise InvalidField("grad_output", f"grad_output must have the output's shape {list(output_shape)}, got {list(grad_output.shape)}")
    output_elements = torch.Size(output_shape).numel()
    if output_elements > limit:
        raise TooLarge(
            f"the output would have {output_elements:,} elements (shape {list(output_shape)}); the limit is {limit:,} per tensor (CONV_MAX_TENSOR_ELEMENTS)"
        )
    forward_macs = macs(output_elements, 1, 1, 1, *weight.shape[1:])
    work = forward_macs * (3 if backward else 1)
    if work > settings.max_macs:
        raise TooLarge(f"this request needs {work:,} multiply-accumulates; the limit is {settings.max_macs:,} (CONV_MAX_MACS)")
    padded_elements = torch.Size(padded_shape).numel()
    if padded_elements > PADDED_INPUT_FACTOR * limit:
        raise TooLarge(
            f"padding: the padded input would have {padded_elements:,} elements (shape {list(padded_shape)}); the limit is "
            f"{PADDED_INPUT_FACTOR * limit:,}, {PADDED_INPUT_FACTOR}x the per-tensor limit (CONV_MAX_TENSOR_ELEMENTS)"
        )
    if options.algorithm == "reference" and forward_macs > settings.reference_max_macs:
        raise TooLarge(
            f"algorithm 'reference' is limited to {settings.reference_max_macs:,} MACs (CONV_REFERENCE_MAX_MACS); "
            f"this problem needs {forward_macs:,}: use 'auto' or 'im2col'"
        )
    tensors = sum(tensor.numel() for tensor in (input, weight, bias, grad_output) if tensor is not None)
    results = output_elements + (input.numel() + weight.numel() if backward else 0)
    element_size = torch.empty((), dtype=dtype).element_size()
    memory = element_size * (tensors + results * (2 if options.parity else 1) + padded_elements)
    memory += math.ceil(results * _encoded_bytes_per_element(options.encoding, element_size)) + REPORT_BYTES
    moved = (padded_elements + output_elements) * (3 if backward else 1)
    return Problem(options, input, weight, bias, grad_output, dtype, device, work, memory, moved)


# The response's parity report, timings and JSON framing, beside its tensors.
REPORT_BYTES = 4096


def _encoded_bytes_per_element(encoding: str, element_size: int) -> float:
    """Response bytes per result element: base64 is 4/3 of the raw bytes; a JSON number takes up to
    15 characters and a comma for float32 and the 16-bit types ("-1.1754944e-38,"), 25 for float64."""
    if encoding == "base64":
        return element_size * 4 / 3
    return 25 if element_size == 8 else 16
