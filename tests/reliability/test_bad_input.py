"""A corpus of bad requests, one case each, against a real server on both compute routes.

Every case asserts the exact status, a detail that names the field (422: `loc`; otherwise the
sentence), an error body free of tracebacks, paths and tensor values, and a passing /healthz after.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import time
from dataclasses import dataclass, field

import httpx
import orjson
import pytest

from tests.reliability.conftest import MARKER, assert_clean, assert_healthy, read_response, record, seed_body

MiB = 1 << 20
DEFAULT_MAX_BODY = 64 * MiB
ROUTES = ["/forward", "/backward"]


@dataclass
class Case:
    id: str
    status: int
    names: str  # the field (422: an element of detail[].loc) or the phrase the detail must contain
    body: object = None  # a JSON-able body, or bytes sent as they are
    headers: dict = field(default_factory=dict)
    routes: tuple[str, ...] = tuple(ROUTES)

    def content(self) -> bytes:
        return self.body if isinstance(self.body, bytes) else orjson.dumps(self.body)


def _json_with(field_name: str, raw_value: str) -> bytes:
    """seed_body with one field's JSON text replaced verbatim (for tokens orjson will not write)."""
    body = seed_body()
    body[field_name] = "@@"
    return orjson.dumps(body).replace(b'"@@"', raw_value.encode())


def _tensor(shape, **extra) -> dict:
    return {"shape": shape, "dtype": "float32", **extra}


def _b64(count: int) -> str:
    return base64.b64encode(b"\0" * count).decode()


VALID = orjson.dumps(seed_body())
DEEP = 100_000

CASES = [
    # Bytes that are not a JSON body.
    Case("malformed_json", 400, "JSON", b'{"input": [[[[1.0]]]], "weight": }'),
    Case("truncated_json", 400, "JSON", VALID[: len(VALID) // 2]),
    Case("empty_body", 400, "JSON", b""),
    Case("body_not_object", 422, "body", b"[1, 2, 3]"),
    Case("nested_100k_deep", 400, "JSON", _json_with("input", "[" * DEEP + "]" * DEEP)),
    Case("nan_literal", 400, "JSON", _json_with("input", "[[[[NaN]]]]")),
    Case("infinity_literal", 400, "JSON", _json_with("input", "[[[[Infinity]]]]")),
    Case("minus_infinity_literal", 400, "JSON", _json_with("input", "[[[[-Infinity]]]]")),
    Case("float_literal_beyond_float64", 400, "JSON", _json_with("input", "[[[[1e400]]]]")),
    # Content type and encoding.
    Case("text_plain", 415, "Content-Type", VALID, {"content-type": "text/plain"}),
    Case("multipart", 415, "Content-Type", b"--x\r\n\r\n--x--\r\n", {"content-type": "multipart/form-data; boundary=x"}),
    Case("no_content_type", 415, "Content-Type", VALID, {"content-type": ""}),
    Case("gzip", 415, "Content-Encoding", gzip.compress(VALID), {"content-encoding": "gzip"}),
    # Tensor elements.
    Case("ragged", 422, "input", seed_body(input=[[[[1.0, 2.0], [3.0]]]])),
    Case("null_element", 422, "input", seed_body(input=[[[[None] * 5] * 5]] * 2)),
    Case("string_element", 422, "input", seed_body(input=[[[["abc"] * 5] * 5]] * 2)),
    Case("object_element", 422, "input", seed_body(input=[[[[{"a": 1}] * 5] * 5]] * 2)),
    Case("null_in_flat_data", 422, "input", seed_body(input=_tensor([1, 1, 2, 2], data=[1.0, None, 1.0, 1.0]))),
    Case("tensor_is_string", 422, "weight", seed_body(weight="file:///etc/passwd")),
    Case("rank_too_deep", 422, "input", seed_body(input=[[[[[MARKER]]]]])),
    # Shapes.
    Case("shape_negative", 422, "input", seed_body(input=_tensor([-1, 1, 5, 5], data=[]))),
    Case("shape_zero", 422, "input", seed_body(input=_tensor([0, 1, 5, 5], data=[]))),
    Case("shape_non_integer", 422, "shape", seed_body(input=_tensor([1.5, 1, 5, 5], data=[1.0]))),
    Case("shape_bool", 422, "shape", seed_body(input=_tensor([True, 1, 5, 5], data=[1.0] * 25))),
    Case("shape_string", 422, "shape", seed_body(input=_tensor(["2", 1, 5, 5], data=[1.0]))),
    Case("shape_product_overflows", 413, "CONV_MAX_TENSOR_ELEMENTS", seed_body(input=_tensor([2**62, 2**62, 2**62, 2**62], data=[]))),
    Case(
        "shape_dim_beyond_uint64",
        422,
        "shape",  # orjson reads an integer beyond uint64 as a float: not an int dimension
        _json_with("input", '{"shape": [1, 1, 5, 99999999999999999999999], "b64": ""}'),
    ),
    Case("data_count_mismatch", 422, "data", seed_body(input=_tensor([1, 1, 5, 5], data=[1.0] * 24))),
    Case("b64_count_mismatch", 422, "b64", seed_body(input=_tensor([1, 1, 5, 5], b64=_b64(96)))),
    Case("b64_invalid_characters", 400, "input.b64", seed_body(input=_tensor([1, 1, 1, 1], b64="!!!!!!=="))),
    Case("b64_bad_length", 400, "input.b64", seed_body(input=_tensor([1, 1, 1, 1], b64="AAAAA"))),
    Case("data_and_b64", 422, "input", seed_body(input=_tensor([1, 1, 1, 1], data=[1.0], b64=_b64(4)))),
    Case("tensor_unknown_key", 422, "input", seed_body(input=_tensor([1, 1, 1, 1], data=[1.0], path="/etc/passwd"))),
    # dtype names: a whitelist, never attribute look-ups.
    *(
        Case(f"tensor_dtype_{name}", 422, "dtype", seed_body(input={"shape": [1, 1, 1, 1], "dtype": name, "data": [1.0]}))
        for name in ("float8", "__class__", "__dict__", "int32", "int64", "bool", "complex64", "torch.float32")
    ),
    *(Case(f"compute_dtype_{name}", 422, "dtype", seed_body(dtype=name)) for name in ("__class__", "int32", "int8", "uint8")),
    # Conv parameters.
    Case("stride_zero", 422, "stride", seed_body(stride=0)),
    Case("stride_negative", 422, "stride", seed_body(stride=[-1, 1])),
    Case("stride_float", 422, "stride", seed_body(stride=1.5)),
    Case("dilation_zero", 422, "dilation", seed_body(dilation=0)),
    Case("padding_negative", 422, "padding", seed_body(padding=-1)),
    Case("padding_huge", 422, "padding", seed_body(padding=2**40)),
    Case("groups_zero", 422, "groups", seed_body(groups=0)),
    Case("groups_not_dividing", 422, "groups", seed_body(groups=2)),
    Case("groups_huge", 422, "groups", seed_body(groups=2**63)),
    Case("groups_beyond_int64", 422, "groups", _json_with("groups", "1" + "0" * 30)),
    Case("bias_wrong_length", 422, "bias", seed_body(bias=[1.0, 2.0, 3.0])),
    Case("kernel_larger_than_padded_input", 422, "weight", seed_body(padding=0, weight=[[[[MARKER] * 7] * 7]] * 2)),
    Case("same_with_stride_2", 422, "padding", seed_body(padding="same", stride=2)),
    Case("reflect_padding_too_large", 422, "padding", seed_body(padding=5, padding_mode="reflect")),
    Case("unknown_padding_mode", 422, "padding_mode", seed_body(padding_mode="mirror")),
    Case("unknown_field", 422, "strde", seed_body(strde=2)),
    Case("negative_atol", 422, "atol", seed_body(atol=-1.0)),
    Case("timeout_zero", 422, "timeout_s", seed_body(timeout_s=0)),
    # Names.
    Case("unknown_algorithm", 422, "algorithm", seed_body(algorithm="nope")),
    Case("algorithm_dunder", 422, "algorithm", seed_body(algorithm="__init__")),
    Case("unknown_device", 422, "device", seed_body(device="tpu")),
    Case("absent_cuda_device", 422, "device", seed_body(device="cuda:7")),
    Case("unknown_encoding", 422, "encoding", seed_body(encoding="pickle")),
    Case("unknown_loss", 422, "loss", seed_body(loss="l1"), routes=("/backward",)),
    # Gradient and work limits.
    Case("grad_output_wrong_shape", 422, "grad_output", seed_body(grad_output=[[[[1.0] * 4] * 4] * 2] * 2), routes=("/backward",)),
    # Either says which gradient to take; both at once would silently ignore the loss.
    Case("grad_output_and_loss", 422, "loss", seed_body(grad_output=[[[[1.0] * 3] * 3] * 2] * 2, loss="sum"), routes=("/backward",)),
    # 1x4096x1x1 input, 1x4096x3x3 weight, padding 2000: a tiny body, a 4001x4001 output, 5.9e11 MACs.
    Case(
        "macs_over_limit",
        413,
        "CONV_MAX_MACS",
        {
            "input": _tensor([1, 4096, 1, 1], b64=_b64(4 * 4096)),
            "weight": _tensor([1, 4096, 3, 3], b64=_b64(4 * 4096 * 9)),
            "padding": 2000,
        },
    ),
    Case("output_over_element_limit", 413, "CONV_MAX_TENSOR_ELEMENTS", seed_body(padding=3000)),
    # A 1 MB body whose padding (not counted in MACs) asked every algorithm for a 4.2 GB padded copy.
    Case(
        "padded_input_over_limit",
        413,
        "padding: the padded input would have 1,057,030,144 elements",
        {
            "input": _tensor([1, 64, 64, 64], b64=_b64(4 * 64**3)),
            "weight": _tensor([64, 64, 3, 3], b64=_b64(4 * 64 * 64 * 9)),
            "padding": 2000,
            "dilation": 2000,
        },
    ),
    # Named algorithms that refuse what would cost far more than its MACs say.
    Case(
        "shifted_gemm_mostly_padding",
        422,
        "algorithm",
        {
            "input": _tensor([1, 1, 4096, 1], b64=_b64(4 * 4096)),
            "weight": _tensor([64, 1, 1, 2], b64=_b64(4 * 128)),
            "padding": [0, 4000],
            "dilation": [1, 8000],
            "algorithm": "shifted_gemm",
        },
    ),
    Case(
        "loop_over_taps_past_limit",
        413,
        "Python loop iterations",
        {
            "input": _tensor([1, 2, 1, 65536], b64=_b64(4 * 2 * 65536)),
            "weight": _tensor([2, 1, 1, 65536], b64=_b64(4 * 2 * 65536)),
            "groups": 2,
            "algorithm": "im2col",
        },
    ),
]
DECLARED_AND_STREAMED = 2


def _cases() -> list:
    return [pytest.param(case, route, id=f"{route[1:]}-{case.id}") for case in CASES for route in case.routes]


def _detail_names(body: dict, names: str) -> bool:
    detail = body["detail"]
    if isinstance(detail, list):
        return any(names in [str(part) for part in entry["loc"]] or names in entry["msg"] for entry in detail)
    return names in detail


@pytest.mark.parametrize(("case", "route"), _cases())
def test_bad_input(main_server, case: Case, route: str) -> None:
    headers = {"content-type": "application/json", **case.headers}
    headers = {key: value for key, value in headers.items() if value}
    with httpx.Client(base_url=main_server.url, timeout=60) as client:
        response = client.post(route, content=case.content(), headers=headers)
    assert response.status_code == case.status, response.text[:1000]
    assert _detail_names(response.json(), case.names), f"the detail does not name {case.names!r}: {response.text[:1000]}"
    assert_clean(response)
    assert_healthy(main_server)


@pytest.mark.parametrize("route", ROUTES)
def test_every_content_encoding_header_is_read(main_server, route: str) -> None:
    """Two headers, identity then gzip, say the body is gzipped: the second one counts too."""
    headers = [("content-type", "application/json"), ("content-encoding", "identity"), ("content-encoding", "gzip")]
    response = httpx.post(f"{main_server.url}{route}", content=gzip.compress(VALID), headers=headers, timeout=60)
    assert response.status_code == 415 and "Content-Encoding 'gzip'" in response.json()["detail"], response.text
    assert_healthy(main_server)


@pytest.mark.parametrize("route", ROUTES)
def test_reference_on_a_big_input_is_refused_fast(main_server, route: str) -> None:
    """algorithm "reference" on 1x16x64x64 with padding 100: 1.6e8 MACs, refused before any work."""
    body = {"input": _tensor([1, 16, 64, 64], b64=_b64(4 * 16 * 64 * 64)), "weight": _tensor([16, 16, 3, 3], b64=_b64(4 * 16 * 9 * 16))}
    body.update(padding=100, algorithm="reference")
    start = time.perf_counter()
    response = httpx.post(f"{main_server.url}{route}", json=body, timeout=60)
    elapsed = time.perf_counter() - start
    assert response.status_code == 413, response.text
    assert "CONV_REFERENCE_MAX_MACS" in response.json()["detail"]
    assert elapsed < 2.0, f"the refusal took {elapsed:.2f} s"
    assert_healthy(main_server)


async def _raw_exchange(url: str, head: bytes, chunks, pause_s: float = 0.0) -> tuple[int, bytes]:
    """Send `head` then `chunks` on a raw socket until the server answers; -> (status, answer bytes)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(head)
        await writer.drain()
        answer = asyncio.ensure_future(read_response(reader))
        for chunk in chunks:
            if answer.done():
                break
            try:
                writer.write(chunk)
                await writer.drain()
            except ConnectionError:
                break
            if pause_s:
                await asyncio.sleep(pause_s)
        data = await asyncio.wait_for(answer, 30)
    finally:
        writer.close()
    return int(data.split(b" ", 2)[1]), data


def _head(route: str, length: int | None) -> bytes:
    framing = f"content-length: {length}" if length is not None else "transfer-encoding: chunked"
    return f"POST {route} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n{framing}\r\n\r\n".encode()


@pytest.mark.anyio
@pytest.mark.parametrize("route", ROUTES)
async def test_declared_body_over_the_cap_is_refused_before_it_is_sent(main_server, route: str) -> None:
    status, answer = await _raw_exchange(main_server.url, _head(route, DEFAULT_MAX_BODY + 1), [])
    assert status == 413 and b"CONV_MAX_BODY_BYTES" in answer, answer[:500]
    assert_healthy(main_server)


@pytest.mark.anyio
@pytest.mark.parametrize("route", ROUTES)
async def test_chunked_body_over_the_cap_is_cut_off(main_server, route: str) -> None:
    """65 MiB of chunked JSON-ish bytes: 413 once 64 MiB have arrived, without waiting for the rest."""
    payload = b"[" + b"0," * (MiB // 2 - 1) + b"0"  # one MiB per chunk
    chunk = f"{len(payload):x}\r\n".encode() + payload + b"\r\n"
    status, answer = await _raw_exchange(main_server.url, _head(route, None), [chunk] * (DEFAULT_MAX_BODY // MiB + 2))
    assert status == 413 and b"CONV_MAX_BODY_BYTES" in answer, answer[:500]
    assert_healthy(main_server)


def test_huge_integer_literals_follow_the_documented_policy(main_server) -> None:
    """Integers beyond 64 bits parse as float64; beyond the compute dtype's range they round to Infinity."""

    def content(digits: int) -> bytes:
        body = seed_body(input=[[[["@@"] * 5] * 5]] * 2, weight=[[[[1] * 3] * 3]] * 2, bias=[0, 0], encoding="flat")
        return orjson.dumps(body).replace(b'"@@"', b"1" + b"0" * digits)

    response = httpx.post(f"{main_server.url}/forward", content=content(30), headers={"content-type": "application/json"}, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["output"]["data"][0] == pytest.approx(4e30, rel=1e-5)
    response = httpx.post(f"{main_server.url}/forward", content=content(60), headers={"content-type": "application/json"}, timeout=60)
    assert response.status_code == 200, response.text
    assert set(response.json()["output"]["data"]) == {"Infinity"}


def test_zz_corpus_size() -> None:
    # The parametrised corpus, plus per route: declared and chunked over-cap bodies, the reference
    # refusal and the huge stride; plus the huge-integer policy test.
    cases = len(_cases()) + 4 * len(ROUTES) + 1
    record("bad_input_cases", cases=cases, corpus_items=len(CASES) + 4 + 1)
    assert cases >= 100


@pytest.mark.parametrize("route", ROUTES)
def test_huge_stride_is_served_not_a_crash(main_server, route: str) -> None:
    """Found by the fuzzer: torch's CPU conv backward (the parity oracle) segfaults on strides near 2**16;
    the service clamps a stride past the kernel's span, which leaves the one-pixel output unchanged."""
    body = seed_body(stride=[65535, 1048576], padding=0, encoding="flat")
    response = httpx.post(f"{main_server.url}{route}", json=body, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["parity"]["ok"]
    if route == "/forward":
        assert response.json()["output"]["shape"] == [2, 2, 1, 1]
    assert_healthy(main_server)
