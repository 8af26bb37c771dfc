"""Invalid arguments raise what torch raises: the same exception class as F.conv2d / nn.Conv2d.

Each case is called on both sides; torch must raise (so the case really is invalid) and ours must
raise the same class, with every algorithm. Messages are ours (they name the field and the range).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kernels
from tests.kernels.cases import ALGORITHMS


def raised(call) -> type[BaseException] | None:
    try:
        call()
    except Exception as error:  # any class: the class is what is compared
        return type(error)
    return None


def tensors(input_shape=(2, 4, 5, 5), weight_shape=(6, 4, 3, 3), bias_size: int | None = 6, dtype=torch.float32):
    generator = torch.Generator().manual_seed(0)
    input = torch.randn(input_shape, generator=generator, dtype=dtype)
    weight = torch.randn(weight_shape, generator=generator, dtype=dtype)
    bias = None if bias_size is None else torch.randn(bias_size, generator=generator, dtype=dtype)
    return input, weight, bias


# id -> ((input, weight, bias), conv2d keyword arguments); every one is rejected by F.conv2d.
FUNCTIONAL_CASES = {
    "stride_0": (tensors(), dict(stride=0)),
    "stride_negative_tuple": (tensors(), dict(stride=(1, -1))),
    "stride_three_values": (tensors(), dict(stride=(1, 1, 1))),
    "padding_negative": (tensors(), dict(padding=-1)),
    "padding_negative_tuple": (tensors(), dict(padding=(0, -2))),
    "dilation_0": (tensors(), dict(dilation=0)),
    "groups_0": (tensors(), dict(groups=0)),
    "groups_not_dividing_in_channels": (tensors(), dict(groups=3)),
    "groups_not_dividing_out_channels": (tensors(weight_shape=(6, 1, 3, 3)), dict(groups=4)),
    "wrong_channel_count": (tensors(input_shape=(2, 3, 5, 5)), {}),
    "bias_length": (tensors(bias_size=5), {}),
    "kernel_bigger_than_padded_input": (tensors(input_shape=(2, 4, 2, 2)), dict(padding=0)),
    "dilated_kernel_bigger_than_input": (tensors(), dict(dilation=3)),
    "same_with_stride_2": (tensors(), dict(padding="same", stride=2)),
    "bad_padding_string": (tensors(), dict(padding="full")),
    "input_weight_dtype_mismatch": ((tensors()[0].double(), *tensors()[1:]), {}),
    "bias_dtype_mismatch": ((*tensors()[:2], tensors()[2].double()), {}),
    "input_2d": ((torch.randn(4, 5), *tensors()[1:]), {}),
    "input_5d": ((torch.randn(1, 2, 4, 5, 5), *tensors()[1:]), {}),
    "weight_3d": ((tensors()[0], torch.randn(6, 4, 3), None), {}),
    "empty_height_with_padding": (tensors(input_shape=(2, 4, 0, 5)), dict(padding=2)),
}


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("case", FUNCTIONAL_CASES.values(), ids=FUNCTIONAL_CASES.keys())
def test_functional_raises_like_torch(case, algorithm):
    (input, weight, bias), kwargs = case
    expected = raised(lambda: F.conv2d(input, weight, bias, **kwargs))
    assert expected is not None, "F.conv2d accepted the case: it is not invalid"
    actual = raised(lambda: kernels.conv2d(input, weight, bias, algorithm=algorithm, **kwargs))
    assert actual is expected


BASE_MODULE = dict(in_channels=4, out_channels=6, kernel_size=3)

# id -> nn.Conv2d constructor arguments; nn.Conv2d rejects each, at construction or on the forward.
MODULE_CASES = {
    "bad_padding_mode": dict(padding_mode="mirror"),
    "groups_0": dict(groups=0),
    "groups_not_dividing": dict(groups=3),
    "same_with_stride_2": dict(padding="same", stride=2),
    "bad_padding_string": dict(padding="full"),
    "stride_0": dict(stride=0),
    "padding_negative": dict(padding=-1),
    "dilation_0": dict(dilation=0),
    "reflect_padding_not_below_size": dict(padding=5, padding_mode="reflect"),
    "circular_wraps_twice": dict(padding=6, padding_mode="circular"),
    "wrong_in_channels": dict(in_channels=3),
}


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("kwargs", MODULE_CASES.values(), ids=MODULE_CASES.keys())
def test_module_raises_like_nn_conv2d(kwargs, algorithm):
    input = torch.randn(2, 4, 5, 5)
    options = {**BASE_MODULE, **kwargs}
    expected = raised(lambda: nn.Conv2d(**options)(input))
    assert expected is not None, "nn.Conv2d accepted the case: it is not invalid"
    actual = raised(lambda: kernels.Conv2d(**options, algorithm=algorithm)(input))
    assert actual is expected


@pytest.mark.parametrize("padding_mode", ["mirror", "zero", ""])
def test_functional_bad_padding_mode_is_value_error(padding_mode):
    # F.conv2d has no padding_mode; nn.Conv2d raises ValueError for a bad one, and so do we.
    input, weight, bias = tensors()
    with pytest.raises(ValueError, match="padding_mode"):
        kernels.conv2d(input, weight, bias, padding=1, padding_mode=padding_mode)


@pytest.mark.parametrize("padding_mode", ["reflect", "circular"])
def test_functional_padding_mode_limits_raise_like_nn_conv2d(padding_mode):
    input, weight, bias = tensors()
    module = nn.Conv2d(4, 6, 3, padding=6, padding_mode=padding_mode)
    expected = raised(lambda: module(input))
    assert expected is not None
    assert raised(lambda: kernels.conv2d(input, weight, bias, padding=6, padding_mode=padding_mode)) is expected


@pytest.mark.parametrize("name", ["Reference", "im2col ", "", "triton2", None])
def test_unknown_algorithm_lists_valid_names(name):
    input, weight, bias = tensors()
    for call in (lambda: kernels.conv2d(input, weight, bias, algorithm=name), lambda: kernels.Conv2d(4, 6, 3, algorithm=name)):
        with pytest.raises(ValueError) as error:
            call()
        for valid in kernels.names():
            assert repr(valid) in str(error.value) or valid in str(error.value)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8])
def test_int_dtype_is_a_clear_unsupported_problem(algorithm, dtype):
    input, weight, bias = (tensor.to(dtype) for tensor in tensors())
    with pytest.raises(kernels.UnsupportedProblem, match=str(dtype).removeprefix("torch.")) as error:
        kernels.conv2d(input, weight, bias, algorithm=algorithm)
    assert isinstance(error.value, ValueError)


def test_non_tensor_arguments_raise_type_error_like_torch():
    input, weight, bias = tensors()
    for args in ((input.tolist(), weight, bias), (input, weight.tolist(), bias), (input, weight, bias.tolist())):
        assert raised(lambda args=args: F.conv2d(*args)) is TypeError
        assert raised(lambda args=args: kernels.conv2d(*args)) is TypeError
