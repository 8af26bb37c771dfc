"""app/codec.py: the three tensor forms both ways, the non-finite policy, and every refusal."""

from __future__ import annotations

import base64
import math

import orjson
import pytest
import torch

from app.codec import decode_tensor, encode_tensor, json_number
from app.errors import InvalidField, MalformedBody, TooLarge
from tests.app.helpers import NON_FINITE, from_json, to_json

ENCODINGS = ["list", "flat", "base64"]
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def decode(value, list_dtype=torch.float32, ranks=(1, 2, 3, 4), max_elements=1_000_000, field="input"):
    return decode_tensor(value, field, list_dtype=list_dtype, ranks=ranks, max_elements=max_elements)


def through_json(tensor: torch.Tensor, encoding: str):
    """encode, serialise as the service does, parse back."""
    return orjson.loads(orjson.dumps(encode_tensor(tensor, encoding), option=orjson.OPT_SERIALIZE_NUMPY))


def with_non_finite(dtype: torch.dtype) -> torch.Tensor:
    tensor = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(1)).to(dtype)
    tensor[0, 0, 0], tensor[0, 1, 2], tensor[1, 2, 3] = math.nan, math.inf, -math.inf
    return tensor


def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_trip_keeps_values_and_non_finite(encoding: str, dtype: torch.dtype) -> None:
    tensor = with_non_finite(dtype)
    encoded = through_json(tensor, encoding)
    assert_same(from_json(encoded, dtype), tensor)
    assert_same(decode(encoded, list_dtype=dtype), tensor)


@pytest.mark.parametrize("encoding", ["list", "flat"])
def test_non_finite_are_the_documented_strings(encoding: str) -> None:
    encoded = through_json(torch.tensor([math.nan, math.inf, -math.inf, 1.5]), encoding)
    values = encoded if encoding == "list" else encoded["data"]
    assert values == ["NaN", "Infinity", "-Infinity", 1.5]


@pytest.mark.parametrize("shape", [(30,), (3, 4), (2, 3, 5), (2, 1, 9, 2), (1, 1, 40, 3), (13, 1), (4, 2, 3)], ids=str)
@pytest.mark.parametrize("encoding", ["list", "flat"])
def test_tensors_with_non_finite_values_encode_in_chunks_as_one_document(monkeypatch, shape, encoding: str) -> None:
    """Past JSON_CHUNK_ELEMENTS a tensor holding NaN / infinities is written a run of sub-arrays at a time
    (never all its elements as Python objects at once): the same nested document, in every nesting case."""
    from app import codec

    generator = torch.Generator().manual_seed(len(shape))
    tensor = torch.randn(shape, generator=generator)
    flat = tensor.view(-1)
    flat[::3], flat[1::5], flat[2::7] = math.nan, math.inf, -math.inf
    whole = through_json(tensor, encoding)
    monkeypatch.setattr(codec, "JSON_CHUNK_ELEMENTS", 7)
    chunked = through_json(tensor, encoding)
    assert_same(from_json(chunked, torch.float32), tensor)
    assert json_values(chunked) == json_values(whole)


def json_values(document):
    """Nested JSON values with numbers as float32, so the shortest and the float64 reprs of one value compare equal."""
    if isinstance(document, dict):
        return {key: json_values(value) for key, value in document.items()}
    if isinstance(document, list):
        return [json_values(value) for value in document]
    return document if isinstance(document, str) else float(torch.tensor(document, dtype=torch.float32))


def test_finite_float32_lists_are_shortest_repr() -> None:
    assert through_json(torch.tensor([0.1, -2.5]), "list") == [0.1, -2.5]


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_request_forms_decode_to_the_same_tensor(encoding: str) -> None:
    tensor = torch.randn(2, 1, 3, 3, generator=torch.Generator().manual_seed(0))
    assert_same(decode(to_json(tensor, encoding)), tensor)


def test_lists_take_the_list_dtype_and_objects_their_own() -> None:
    assert decode([[1.0, 2.0]], list_dtype=torch.float64).dtype == torch.float64
    assert decode({"shape": [2], "dtype": "float16", "data": [1, 2]}, list_dtype=torch.float64).dtype == torch.float16
    assert decode({"shape": [2], "data": [1, 2]}).dtype == torch.float32


def test_non_finite_strings_are_accepted_in_requests() -> None:
    tensor = decode([list(NON_FINITE), [1, 2, 3]])
    assert math.isnan(tensor[0, 0]) and tensor[0, 1] == math.inf and tensor[0, 2] == -math.inf


def test_bfloat16_base64_is_its_own_bytes() -> None:
    tensor = torch.tensor([1.0, -2.0, 0.5], dtype=torch.bfloat16)
    encoded = encode_tensor(tensor, "base64")
    assert base64.b64decode(encoded["b64"]) == tensor.view(torch.int16).numpy().tobytes()
    assert encoded["dtype"] == "bfloat16"


def test_json_number() -> None:
    assert [json_number(v) for v in (1.0, math.nan, math.inf, -math.inf)] == [1.0, "NaN", "Infinity", "-Infinity"]


REFUSALS = [
    # (value, error type, field path in loc / words in the message)
    pytest.param([[1, 2], [3]], InvalidField, "ragged", id="ragged"),
    pytest.param([[1, 2], [3, [4]]], InvalidField, "ragged", id="ragged-deep"),
    pytest.param([[1, "x"]], InvalidField, "numbers", id="non-numeric-string"),
    pytest.param([[1, {"a": 1}]], InvalidField, "numbers", id="object-in-list"),
    pytest.param([[[[[1]]]]], InvalidField, "rank", id="too-deep"),
    pytest.param([], InvalidField, "dimension", id="empty"),
    pytest.param("abc", InvalidField, "nested lists", id="string"),
    pytest.param(3.0, InvalidField, "nested lists", id="scalar"),
    pytest.param({"shape": [2], "data": [1, 2, 3]}, InvalidField, "data", id="data-length"),
    pytest.param({"shape": [2, 2], "data": [[1, 2], [3, 4]]}, InvalidField, "data", id="data-nested"),
    pytest.param({"shape": [2], "data": "12"}, InvalidField, "data", id="data-not-list"),
    pytest.param({"shape": [2], "dtype": "int64", "data": [1, 2]}, InvalidField, "dtype", id="dtype-unknown"),
    pytest.param({"shape": [2], "dtype": "__class__", "data": [1, 2]}, InvalidField, "dtype", id="dtype-attribute"),
    pytest.param({"shape": "2", "data": [1, 2]}, InvalidField, "shape", id="shape-not-list"),
    pytest.param({"shape": [2.0], "data": [1, 2]}, InvalidField, "shape", id="shape-float"),
    pytest.param({"shape": [True], "data": [1]}, InvalidField, "shape", id="shape-bool"),
    pytest.param({"shape": [0, 2], "data": []}, InvalidField, "dimension", id="shape-zero"),
    pytest.param({"shape": [-1, 2], "data": [1, 2]}, InvalidField, "dimension", id="shape-negative"),
    pytest.param({"shape": [2], "data": [1, 2], "b64": "AAAA"}, InvalidField, "exactly one", id="data-and-b64"),
    pytest.param({"shape": [2]}, InvalidField, "exactly one", id="neither"),
    pytest.param({"shape": [2], "data": [1, 2], "extra": 1}, InvalidField, "unknown", id="unknown-key"),
    pytest.param({"shape": [2], "b64": "AAAAAAAA"}, InvalidField, "bytes", id="b64-length"),
    pytest.param({"shape": [1], "b64": 123}, InvalidField, "base64", id="b64-not-string"),
    pytest.param({"shape": [1], "b64": "AAA"}, MalformedBody, "base64", id="b64-bad-length"),
    pytest.param({"shape": [1], "b64": "AA!AAA=="}, MalformedBody, "base64", id="b64-bad-char"),
    pytest.param({"shape": [1_000_000_000], "data": []}, TooLarge, "CONV_MAX_TENSOR_ELEMENTS", id="shape-over-limit"),
    pytest.param({"shape": [1_000_000_000], "b64": ""}, TooLarge, "CONV_MAX_TENSOR_ELEMENTS", id="b64-over-limit"),
    pytest.param([[0.0] * 1001] * 1000, TooLarge, "CONV_MAX_TENSOR_ELEMENTS", id="list-over-limit"),
]


@pytest.mark.parametrize("value, error, words", REFUSALS)
def test_refusals(value, error, words: str) -> None:
    with pytest.raises(error) as raised:
        decode(value, ranks=(1, 2))
    text = str(raised.value.detail)
    assert words in text
    if error is InvalidField:
        assert raised.value.detail[0]["loc"][:2] == ["body", "input"]


def test_rank_error_names_field_and_allowed_ranks() -> None:
    with pytest.raises(InvalidField) as raised:
        decode([[1.0]], ranks=(3, 4), field="weight")
    (entry,) = raised.value.detail
    assert entry["loc"] == ["body", "weight"] and "rank 3 or 4" in entry["msg"]


def test_limit_is_checked_before_the_list_is_converted(monkeypatch) -> None:
    import app.codec as codec

    def never(*args, **kwargs):
        raise AssertionError("converted before the limit check")

    monkeypatch.setattr(codec, "_numbers", never)
    with pytest.raises(TooLarge):
        decode([[0.0] * 11] * 10, max_elements=100)
