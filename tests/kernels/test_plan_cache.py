"""The caches in front of the algorithms (validated calls, "auto"'s choice) never change an answer.

`kernels.params.normalize` and `kernels.function._plan` remember a call by what their result depends
on; these tests change one of those inputs at a time after a cached call and check that the answer
follows, and that an invalid call still raises after a valid look-alike was cached.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels.function import _plan
from tests.kernels.cases import assert_parity, force_gemm


@pytest.fixture
def seed_tensors():
    generator = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 6, 6, generator=generator), torch.randn(4, 3, 3, 3, generator=generator)


@pytest.mark.parametrize(
    ("valid", "invalid", "error"),
    [
        (dict(stride=1), dict(stride=True), TypeError),  # True == 1 and hashes alike: the key must tell them apart
        (dict(stride=[1, 1]), dict(stride=[1, True]), TypeError),
        (dict(padding=1), dict(padding=-1), RuntimeError),
        (dict(groups=1), dict(groups=True), TypeError),
        (dict(padding_mode="zeros"), dict(padding_mode="zero"), ValueError),
    ],
    ids=["stride_bool", "stride_list_bool", "padding_negative", "groups_bool", "padding_mode"],
)
def test_an_invalid_call_raises_after_a_valid_one_was_cached(seed_tensors, valid, invalid, error):
    input, weight = seed_tensors
    kernels.conv2d(input, weight, **valid)
    kernels.conv2d(input, weight, **valid)  # now cached
    with pytest.raises(error):
        kernels.conv2d(input, weight, **invalid)
    with pytest.raises(error):
        kernels.conv2d(input, weight, **invalid)  # errors are never cached either way


def test_a_mismatched_dtype_raises_after_the_same_shapes_were_cached(seed_tensors):
    input, weight = seed_tensors
    kernels.conv2d(input, weight, padding=1)
    with pytest.raises(RuntimeError, match="type"):
        kernels.conv2d(input, weight.double(), padding=1)


def test_the_output_format_follows_the_input_strides(seed_tensors):
    input, weight = seed_tensors
    assert kernels.conv2d(input, weight, padding=1).is_contiguous()
    channels_last = input.contiguous(memory_format=torch.channels_last)
    output = kernels.conv2d(channels_last, weight, padding=1)
    assert output.stride() == F.conv2d(channels_last, weight, padding=1).stride()
    assert_parity("output", output, F.conv2d(channels_last.double(), weight.double(), padding=1), torch.float32)


def test_auto_follows_the_thread_count(restore_threads, monkeypatch):
    """At 64 channels on 56x56, with torch's GEMMs, `auto` takes shifted_gemm from 2 threads and winograd below
    (kernels/selection.py)."""
    force_gemm(monkeypatch, "torch")
    input, weight = torch.empty(1, 64, 56, 56), torch.empty(64, 64, 3, 3)
    torch.set_num_threads(2)
    assert _plan(input, weight, None, 1, 1, 1, 1, "zeros", "auto")[1].name == "shifted_gemm"
    torch.set_num_threads(1)
    assert _plan(input, weight, None, 1, 1, 1, 1, "zeros", "auto")[1].name == "winograd"


def test_auto_follows_the_gemm_backend(restore_threads, monkeypatch):
    """The same layer goes to shifted_gemm with torch's GEMMs and to im2col with oneDNN's (kernels/selection.py):
    a plan made under one backend is not reused under the other."""
    force_gemm(monkeypatch, "onednn")  # skips where it cannot run
    input, weight = torch.empty(1, 64, 56, 56), torch.empty(64, 64, 3, 3)
    torch.set_num_threads(2)
    for backend, expected in (("torch", "shifted_gemm"), ("onednn", "im2col"), ("torch", "shifted_gemm")):
        force_gemm(monkeypatch, backend)
        assert _plan(input, weight, None, 1, 1, 1, 1, "zeros", "auto")[1].name == expected


def test_a_named_algorithm_follows_the_limits(restore_limits):
    """'reference' refuses work over reference_max_macs: lowering the limit after a cached call refuses it."""
    input, weight = torch.empty(1, 4, 8, 8), torch.empty(4, 4, 3, 3)  # 9,216 MACs
    _plan(input, weight, None, 1, 1, 1, 1, "zeros", "reference")
    kernels.set_limits(reference_max_macs=1_000)
    with pytest.raises(kernels.WorkTooLarge):
        _plan(input, weight, None, 1, 1, 1, 1, "zeros", "reference")
