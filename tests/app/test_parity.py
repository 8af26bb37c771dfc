"""app/parity.py: the small-tensor comparison on Python floats gives exactly what the float64 torch ops give."""

from __future__ import annotations

import math

import pytest
import torch

from app import parity

SPECIAL = [math.nan, math.inf, -math.inf, 0.0, -0.0, 1e-9]


def _pair(size: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(result, expected): close values, some equal, some far, near-zero ones and NaN / infinities on either or both sides."""
    generator = torch.Generator().manual_seed(seed)
    expected = torch.randn(size, generator=generator, dtype=torch.float64)
    result = expected + torch.randn(size, generator=generator, dtype=torch.float64) * 10.0 ** torch.randint(
        -9, 1, (size,), generator=generator
    )
    picks = torch.randint(0, 4 * len(SPECIAL), (2, size), generator=generator).tolist()
    for index in range(size):
        if index % 5 == 0:
            result[index] = expected[index]
        for tensor, pick in ((result, picks[0][index]), (expected, picks[1][index])):
            if pick < len(SPECIAL):
                tensor[index] = SPECIAL[pick]
    return result.to(dtype), expected.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("size", [1, 4, 37, parity.SMALL_ELEMENTS])
@pytest.mark.parametrize("seed", range(6))
def test_small_comparison_matches_the_torch_ops(monkeypatch, dtype, size, seed):
    result, expected = _pair(size, dtype, seed)
    atol, rtol = (1e-5, 1e-4) if seed % 2 else (0.0, 0.0)
    fast = parity.compare(result, expected, atol, rtol), parity.errors(result, expected, atol)
    monkeypatch.setattr(parity, "SMALL_ELEMENTS", 0)  # every size through the torch ops
    slow = parity.compare(result, expected, atol, rtol), parity.errors(result, expected, atol)
    assert fast == slow
    assert fast[0]["allclose"] == torch.allclose(result.double(), expected.double(), rtol=rtol, atol=atol, equal_nan=True)


def test_small_comparison_reports_real_errors():
    result, expected = torch.tensor([1.0, 2.0, math.nan, 5.0]), torch.tensor([1.0, 2.5, math.nan, 0.0])
    entry = parity.compare(result, expected, atol=1e-5, rtol=1e-4)
    assert entry == {"max_abs_err": 5.0, "max_rel_err": 0.2, "allclose": False, "close": False}
    same = {"max_abs_err": 0.0, "max_rel_err": 0.0, "allclose": True, "close": True}
    assert parity.compare(expected, expected, atol=0.0, rtol=0.0) == same
    assert parity.errors(torch.tensor([1.0, math.nan]), torch.tensor([1.0, 3.0]), 1e-5) == (math.inf, math.inf)


@pytest.mark.parametrize("small", [True, False])
def test_allclose_boundary_is_inclusive(monkeypatch, small):
    if not small:
        monkeypatch.setattr(parity, "SMALL_ELEMENTS", 0)
    result, expected = torch.tensor([1.5, 2.0], dtype=torch.float64), torch.tensor([1.0, 2.0], dtype=torch.float64)
    assert parity.compare(result, expected, atol=0.5, rtol=0.0)["allclose"] is True
    assert parity.compare(result, expected, atol=0.25, rtol=0.0)["allclose"] is False


@pytest.mark.parametrize("seed", range(4))
def test_chunked_comparison_matches_one_pass(monkeypatch, seed):
    """Big tensors are compared a chunk at a time (bounded float64 temporaries): the same figures as one pass,
    and allclose false when only one element, in the last chunk, is far."""
    monkeypatch.setattr(parity, "SMALL_ELEMENTS", 0)
    result, expected = _pair(1000, torch.float32, seed)
    atol, rtol = 1e-5, 1e-4
    whole = parity.compare(result, expected, atol, rtol), parity.errors(result, expected, atol)
    monkeypatch.setattr(parity, "CHUNK_ELEMENTS", 7)
    assert (parity.compare(result, expected, atol, rtol), parity.errors(result, expected, atol)) == whole
    close = expected.clone()
    close[-1] = close[-1] + 1.0 if torch.isfinite(close[-1]) else 1.0
    entry = parity.compare(close, expected, atol, rtol)
    assert entry["allclose"] is False and entry == {**entry, "allclose": torch.allclose(close, expected, rtol, atol, equal_nan=True)}


@pytest.mark.parametrize("small", [True, False])
def test_close_is_judged_against_the_tensors_scale(monkeypatch, small):
    """`close` (the verdict): max error <= atol + rtol * max |expected|. Rounding of a long sum near one
    small element passes it though allclose fails; a fault of the terms' size does not."""
    if not small:
        monkeypatch.setattr(parity, "SMALL_ELEMENTS", 0)
    expected = torch.tensor([100.0, 1.0, math.inf, math.nan], dtype=torch.float64)
    rounding = parity.compare(expected + torch.tensor([0.0, 2e-4, 0.0, 0.0], dtype=torch.float64), expected, atol=1e-5, rtol=1e-4)
    assert rounding["allclose"] is False and rounding["close"] is True
    fault = parity.compare(expected + torch.tensor([0.0, 0.5, 0.0, 0.0], dtype=torch.float64), expected, atol=1e-5, rtol=1e-4)
    assert fault["allclose"] is False and fault["close"] is False
    one_sided = parity.compare(torch.tensor([100.0, 1.0, 5.0, math.nan], dtype=torch.float64), expected, atol=1e-5, rtol=1e-4)
    assert one_sided["close"] is False, "an infinity on one side only is never close"
