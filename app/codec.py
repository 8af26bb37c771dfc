"""Tensors in JSON: decode the three request forms, encode the three response forms.

Forms (same in requests and responses):
  "list":   nested lists of numbers, as tensor.tolist() gives (rank = nesting depth).
  "flat":   {"shape": [...], "dtype": "float32", "data": [row-major numbers]}.
  "base64": {"shape": [...], "dtype": "float32", "b64": "<base64 of the little-endian row-major bytes>"}.

Non-finite values: JSON has no NaN or infinity, so in "list" and "flat" they are the strings "NaN",
"Infinity" and "-Infinity" (both ways); "base64" carries them bit for bit.

Speed: nothing here looks at elements one by one in Python. A nested list's shape is read from its
first elements and checked against the limits before numpy converts the whole list in C (which also
finds ragged lists); base64 lengths are checked against shape * itemsize before decoding.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import orjson
import torch

from app.errors import InvalidField, MalformedBody, TooLarge

Encoding = Literal["list", "flat", "base64"]

# The whitelist of dtype names; user strings are looked up here, never on the torch module.
DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}
# numpy has no bfloat16: such lists are parsed as float32 and rounded by torch.
_NUMPY_PARSE = {torch.float64: np.float64, torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.float32}
NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
_OBJECT_KEYS = {"shape", "dtype", "data", "b64"}


def dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES[dtype]


def _check_shape(shape: Sequence[int], field: str, ranks: Sequence[int], max_elements: int) -> int:
    """Rank, positive dims and the element limit, before anything is allocated; -> element count."""
    if len(shape) not in ranks:
        wanted = " or ".join(str(rank) for rank in ranks)
        raise InvalidField(field, f"{field} must have rank {wanted}, got shape {list(shape)}")
    if any(size < 1 for size in shape):
        raise InvalidField(field, f"{field} must have every dimension >= 1, got shape {list(shape)}")
    elements = math.prod(shape)
    if elements > max_elements:
        raise TooLarge(
            f"{field} has {elements:,} elements (shape {list(shape)}); the limit is {max_elements:,} per tensor (CONV_MAX_TENSOR_ELEMENTS)"
        )
    return elements


def _list_shape(value: list, field: str, max_rank: int) -> list[int]:
    """Shape of a nested list read from its first elements; raggedness is caught later by numpy."""
    shape: list[int] = []
    node: Any = value
    while isinstance(node, list):
        shape.append(len(node))
        if len(shape) > max_rank:
            raise InvalidField(field, f"{field} is nested deeper than rank {max_rank}")
        if not node:
            break
        node = node[0]
    return shape


def _numbers(value: Any, field: str, dtype: torch.dtype) -> np.ndarray:
    """Nested lists or a flat list of numbers / non-finite strings -> numpy array, in C."""
    try:
        with np.errstate(over="ignore"):  # out-of-range values round to +-inf, as torch's casts do
            array = np.array(value, dtype=_NUMPY_PARSE[dtype])
    except (ValueError, TypeError, OverflowError):
        raise InvalidField(
            field,
            f"{field} must be a rectangular (non-ragged) list of numbers or the strings {list(NON_FINITE)}",
        ) from None
    # numpy reads JSON null as NaN; NaN must be asked for by name. The object-array scan runs in C, and only
    # when there is a NaN to explain.
    if np.isnan(array).any() and np.equal(np.array(value, dtype=object), None).any():
        raise InvalidField(field, f'{field} holds null; write a missing value as the string "NaN"')
    return array


def as_dtype(tensor: torch.Tensor | None, dtype: torch.dtype, device: torch.device | None = None) -> torch.Tensor | None:
    """tensor in dtype (and on device, if given); itself when it already is (a no-op `.to` still costs ~3 us,
    and a request makes several)."""
    if tensor is None or (tensor.dtype == dtype and (device is None or tensor.device == device)):
        return tensor
    return tensor.to(device=device, dtype=dtype)


def _from_list(value: list, field: str, dtype: torch.dtype, ranks: Sequence[int], max_elements: int) -> torch.Tensor:
    shape = _list_shape(value, field, max(ranks))
    _check_shape(shape, field, ranks, max_elements)
    array = _numbers(value, field, dtype)
    if list(array.shape) != shape:
        raise InvalidField(field, f"{field} is a ragged list: expected shape {shape}, found {list(array.shape)}")
    return as_dtype(torch.from_numpy(array), dtype)


def _object_shape(value: dict, field: str) -> list[int]:
    shape = value.get("shape")
    if not isinstance(shape, list):
        raise InvalidField((field, "shape"), f"{field}.shape must be a list of ints, got {type(shape).__name__}")
    wrong = [size for size in shape if isinstance(size, bool) or not isinstance(size, int)]
    if wrong:
        raise InvalidField((field, "shape"), f"{field}.shape must be a list of ints, got an element of type {type(wrong[0]).__name__}")
    return shape


def _from_object(value: dict, field: str, ranks: Sequence[int], max_elements: int) -> torch.Tensor:
    unknown = set(value) - _OBJECT_KEYS
    if unknown:
        raise InvalidField((field, sorted(unknown)[0]), f"{field} has unknown keys {sorted(unknown)}; allowed: shape, dtype, data or b64")
    if ("data" in value) == ("b64" in value):
        raise InvalidField(field, f"{field} must have exactly one of 'data' (a flat list of numbers) or 'b64' (base64 bytes)")
    shape = _object_shape(value, field)
    dtype_key = value.get("dtype", "float32")
    if not isinstance(dtype_key, str) or dtype_key not in DTYPES:
        raise InvalidField((field, "dtype"), f"{field}.dtype must be one of {list(DTYPES)}, got {dtype_key!r}")
    dtype = DTYPES[dtype_key]
    elements = _check_shape(shape, field, ranks, max_elements)
    if "data" in value:
        data = value["data"]
        if not isinstance(data, list):
            raise InvalidField((field, "data"), f"{field}.data must be a flat list of numbers")
        if len(data) != elements:
            raise InvalidField((field, "data"), f"{field}.data has {len(data):,} values but shape {shape} needs {elements:,}")
        array = _numbers(data, f"{field}.data", dtype)
        if array.ndim != 1:
            raise InvalidField((field, "data"), f"{field}.data must be flat (row-major), not nested")
        return torch.from_numpy(array).to(dtype).reshape(shape)
    return _from_base64(value["b64"], field, shape, elements, dtype)


def _from_base64(text: Any, field: str, shape: list[int], elements: int, dtype: torch.dtype) -> torch.Tensor:
    if not isinstance(text, str):
        raise InvalidField((field, "b64"), f"{field}.b64 must be a base64 string")
    if len(text) % 4:
        raise MalformedBody(f"{field}.b64 is not valid base64: its length {len(text)} is not a multiple of 4")
    expected = elements * torch.empty((), dtype=dtype).element_size()
    decoded_length = len(text) // 4 * 3 - (text[-2:].count("=") if text else 0)
    if decoded_length != expected:
        raise InvalidField(
            (field, "b64"),
            f"{field}.b64 holds {decoded_length:,} bytes but shape {shape} of {DTYPE_NAMES[dtype]} needs {expected:,}",
        )
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise MalformedBody(f"{field}.b64 is not valid base64") from None
    if not raw:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(raw), dtype=dtype).reshape(shape)


def decode_tensor(value: Any, field: str, *, list_dtype: torch.dtype, ranks: Sequence[int], max_elements: int) -> torch.Tensor:
    """A request tensor -> CPU tensor in its own dtype (`list_dtype` for nested lists).

    Raises InvalidField (422) for wrong rank / shape / ragged / non-numeric values, TooLarge (413) over
    `max_elements`, MalformedBody (400) for undecodable base64.
    """
    if isinstance(value, list):
        return _from_list(value, field, list_dtype, ranks, max_elements)
    if isinstance(value, dict):
        return _from_object(value, field, ranks, max_elements)
    if isinstance(value, torch.Tensor):  # decoded by the caller (V2's raw binary tensors): only rank and limits to check
        _check_shape(list(value.shape), field, ranks, max_elements)
        return value
    raise InvalidField(field, f"{field} must be nested lists of numbers or an object with shape, dtype and data or b64")


def _with_non_finite(array: np.ndarray) -> np.ndarray:
    """float array -> object array with NaN / +-inf replaced by their JSON strings (only when there are any)."""
    finite = np.isfinite(array)
    if finite.all():
        return array
    marked = array.astype(object)
    marked[np.isnan(array)] = "NaN"
    marked[np.isposinf(array)] = "Infinity"
    marked[np.isneginf(array)] = "-Infinity"
    return marked


# Elements turned into Python objects at a time when a tensor holds NaN or infinities. Whole, a 16.7M-element
# output (the element limit) became 16.7M Python floats and strings: ~1.4 GB for a 100 MB response.
JSON_CHUNK_ELEMENTS = 1 << 16


def _chunk_json(array: np.ndarray) -> bytes:
    marked = _with_non_finite(array)
    return orjson.dumps(marked.tolist() if marked.dtype == object else marked, option=orjson.OPT_SERIALIZE_NUMPY)


def _nested_json(array: np.ndarray) -> bytes:
    """The JSON text of nested lists of `array` (non-finite values as strings), built from runs of sub-arrays
    of at most JSON_CHUNK_ELEMENTS elements each, so only one run is ever Python objects."""
    if array.size <= JSON_CHUNK_ELEMENTS:
        return _chunk_json(array)
    per_item = array.size // array.shape[0]
    if per_item > JSON_CHUNK_ELEMENTS:
        parts = [_nested_json(item) for item in array]
    else:  # each run's "[a,b]" loses its brackets and the runs join with commas: the same text as one dump
        step = JSON_CHUNK_ELEMENTS // per_item
        parts = [_chunk_json(array[start : start + step])[1:-1] for start in range(0, array.shape[0], step)]
    return b"[" + b",".join(parts) + b"]"


def _json_numbers(array: np.ndarray) -> np.ndarray | orjson.Fragment:
    """Nested lists of `array` for orjson: the array itself when finite (orjson writes numpy arrays directly),
    else pre-built JSON with NaN / infinities as strings."""
    return array if np.isfinite(array).all() else orjson.Fragment(_nested_json(array))


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()  # exact: every bfloat16 is a float32
    return tensor.contiguous().numpy()


def encode_tensor(tensor: torch.Tensor, encoding: Encoding) -> Any:
    """A tensor -> its JSON form; numpy arrays in the result are serialised by orjson (OPT_SERIALIZE_NUMPY)."""
    if encoding == "base64":
        tensor = tensor.detach().cpu().contiguous()
        raw = tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor
        return {
            "shape": list(tensor.shape),
            "dtype": DTYPE_NAMES[tensor.dtype],
            "b64": base64.b64encode(raw.numpy().tobytes()).decode("ascii"),
        }
    array = _numpy(tensor)
    if encoding == "flat":
        return {"shape": list(tensor.shape), "dtype": DTYPE_NAMES[tensor.dtype], "data": _json_numbers(array.ravel())}
    return _json_numbers(array)


def json_number(value: float) -> float | str:
    """A float for a JSON body, with the same non-finite policy as tensors."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return value
