"""kernels.Conv2d as a drop-in for nn.Conv2d: state_dict, initialisation, repr, forward and gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kernels
from kernels.tolerances import tolerance
from tests.kernels.cases import ALGORITHMS, Case, make_inputs, unless_refused

MODULE_CONFIGS = {
    "int_kernel": dict(in_channels=3, out_channels=4, kernel_size=3),
    "tuple_everything": dict(in_channels=4, out_channels=6, kernel_size=(3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2),
    "same_even_no_bias": dict(in_channels=3, out_channels=2, kernel_size=(2, 4), padding="same", bias=False),
    "depthwise_reflect": dict(in_channels=3, out_channels=6, kernel_size=3, groups=3, padding=1, padding_mode="reflect"),
    "circular_valid": dict(in_channels=2, out_channels=2, kernel_size=2, padding="valid", padding_mode="circular"),
    "replicate": dict(in_channels=2, out_channels=3, kernel_size=3, padding=2, padding_mode="replicate"),
    "pointwise": dict(in_channels=4, out_channels=2, kernel_size=1),
}


def as_case(config: dict) -> Case:
    kernel = config["kernel_size"]
    return Case(
        "module",
        in_channels=config["in_channels"],
        out_channels=config["out_channels"],
        kernel_size=(kernel, kernel) if isinstance(kernel, int) else kernel,
        **{key: config[key] for key in ("stride", "padding", "dilation", "groups", "bias", "padding_mode") if key in config},
        size=(6, 7),
    )


def module_grid() -> list:
    return [
        unless_refused(as_case(config), algorithm, config, algorithm, id=f"{name}-{algorithm}")
        for name, config in MODULE_CONFIGS.items()
        for algorithm in ALGORITHMS
    ]


@pytest.mark.parametrize(("config", "algorithm"), module_grid())
def test_state_dict_round_trip_gives_same_outputs_and_gradients(config, algorithm):
    torch.manual_seed(0)
    theirs = nn.Conv2d(**config).double()
    ours = kernels.Conv2d(**config, algorithm=algorithm).double()
    state = theirs.state_dict()
    assert ours.load_state_dict(state) is not None  # strict: raises on missing / unexpected keys
    assert list(ours.state_dict()) == list(state)
    for key, value in ours.state_dict().items():
        assert torch.equal(value, state[key]), key

    input = torch.randn(2, config["in_channels"], 6, 7, dtype=torch.float64)
    expected, actual = theirs(input), ours(input)
    atol, rtol = tolerance(torch.float64)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)
    grad_output = torch.randn_like(expected)
    expected.backward(grad_output)
    actual.backward(grad_output)
    for name, parameter in theirs.named_parameters():
        torch.testing.assert_close(
            ours.get_parameter(name).grad, parameter.grad, atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}.grad: {m}"
        )


@pytest.mark.parametrize("config", MODULE_CONFIGS.values(), ids=MODULE_CONFIGS.keys())
def test_same_initialisation_when_seeded_alike(config):
    torch.manual_seed(1234)
    theirs = nn.Conv2d(**config)
    torch.manual_seed(1234)
    ours = kernels.Conv2d(**config)
    assert torch.equal(ours.weight, theirs.weight)
    assert (ours.bias is None) == (theirs.bias is None)
    if theirs.bias is not None:
        assert torch.equal(ours.bias, theirs.bias)
    # Not vacuous: a different seed gives different weights.
    torch.manual_seed(4321)
    assert not torch.equal(kernels.Conv2d(**config).weight, theirs.weight)


@pytest.mark.parametrize("config", MODULE_CONFIGS.values(), ids=MODULE_CONFIGS.keys())
def test_repr_matches_nn_conv2d_for_auto(config):
    assert repr(kernels.Conv2d(**config)) == repr(nn.Conv2d(**config))
    assert kernels.Conv2d(**config).extra_repr() == nn.Conv2d(**config).extra_repr()


@pytest.mark.parametrize("algorithm", [name for name in ALGORITHMS if name != "auto"])
def test_repr_names_a_chosen_algorithm(algorithm):
    text = repr(kernels.Conv2d(3, 4, 3, algorithm=algorithm))
    assert text == repr(nn.Conv2d(3, 4, 3))[:-1] + f", algorithm={algorithm})"


def test_int_kernel_size_is_a_square_kernel():
    module = kernels.Conv2d(3, 5, 2)
    assert module.kernel_size == (2, 2)
    assert module.weight.shape == (5, 3, 2, 2)
    assert module(torch.randn(1, 3, 4, 4)).shape == (1, 5, 3, 3)


def test_module_is_an_nn_conv2d_and_follows_dtype_and_device_moves():
    module = kernels.Conv2d(2, 2, 3, padding=1).to(torch.float64)
    assert isinstance(module, nn.Conv2d)
    output = module(torch.randn(2, 4, 4, dtype=torch.float64))  # unbatched
    assert output.shape == (2, 4, 4) and output.dtype == torch.float64


def test_module_uses_our_conv_not_torchs():
    # The module must route through kernels.conv2d: a refused algorithm surfaces as our UnsupportedProblem.
    module = kernels.Conv2d(2, 2, 3, algorithm="reference")
    kernels_limits = kernels.get_limits()
    try:
        kernels.set_limits(reference_max_macs=1)
        with pytest.raises(kernels.WorkTooLarge):
            module(torch.randn(1, 2, 4, 4))
    finally:
        kernels.set_limits(reference_max_macs=kernels_limits.reference_max_macs)


def test_numpy_integer_arguments_are_taken_as_torch_takes_them():
    """Configs read through numpy give np.int64 strides and groups; nn.Conv2d and F.conv2d take them."""
    np = pytest.importorskip("numpy")
    torch.manual_seed(3)
    ours = kernels.Conv2d(4, 6, 3, stride=np.int64(2), padding=np.int32(1), dilation=(np.int64(1), 2), groups=np.int64(2)).double()
    theirs = nn.Conv2d(4, 6, 3, stride=np.int64(2), padding=np.int32(1), dilation=(np.int64(1), 2), groups=np.int64(2)).double()
    theirs.load_state_dict(ours.state_dict())
    input = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    torch.testing.assert_close(ours(input), theirs(input), **dict(zip(("atol", "rtol"), tolerance(torch.float64))))
    with pytest.raises(TypeError, match="stride must contain ints"):
        kernels.conv2d(input, theirs.weight, stride=(np.float64(2), 1), groups=2)


def test_zero_dim_integer_tensors_are_taken_as_ints_as_torch_takes_them():
    torch.manual_seed(8)
    input, weight = torch.randn(2, 4, 9, 9, dtype=torch.float64), torch.randn(6, 2, 3, 3, dtype=torch.float64)
    arguments = dict(stride=torch.tensor(2), padding=(torch.tensor(1, dtype=torch.int32), 2), dilation=torch.tensor(1), groups=2)
    expected = torch.nn.functional.conv2d(input, weight, **arguments)
    torch.testing.assert_close(
        kernels.conv2d(input, weight, **arguments), expected, **dict(zip(("atol", "rtol"), tolerance(torch.float64)))
    )
    with pytest.raises(TypeError, match="stride must be an int or a pair of ints"):
        kernels.conv2d(input, weight, stride=torch.tensor(2.0), groups=2)


ZERO_CHANNELS = Case("zero_channels", in_channels=0, out_channels=3, padding=1, size=(5, 6))


@pytest.mark.parametrize("algorithm", [unless_refused(ZERO_CHANNELS, name, name, id=name) for name in ALGORITHMS])
def test_zero_input_channels_give_the_bias_and_empty_gradients(algorithm: str):
    """An empty sum: every output is its bias, for every algorithm (they used to fail in their own ops, each
    differently). torch's F.conv2d returns an (N, 0, H_out, W_out) tensor here, which is no conv's shape."""
    input = torch.randn(2, 0, 5, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 0, 3, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)
    output = kernels.conv2d(input, weight, bias, padding=1, algorithm=algorithm)
    assert torch.equal(output, bias.detach().view(1, 3, 1, 1).expand(2, 3, 5, 6))
    output.sum().backward()
    assert input.grad.shape == input.shape and weight.grad.shape == weight.shape
    assert torch.equal(bias.grad, torch.full((3,), 60.0, dtype=torch.float64))  # 2 images x 5 x 6 outputs


@pytest.mark.parametrize("with_grad", [False, True], ids=["no_grad", "grad"])
def test_autocast_runs_the_conv_in_its_dtype_as_nn_conv2d_does(with_grad: bool):
    """Under torch.autocast nn.Conv2d computes in the autocast dtype; so must the drop-in, gradients included."""
    torch.manual_seed(4)
    ours, theirs = kernels.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)
    theirs.load_state_dict(ours.state_dict())
    input = torch.randn(2, 3, 8, 8, requires_grad=with_grad)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.set_grad_enabled(with_grad):
        output, expected = ours(input), theirs(input)
    assert output.dtype == expected.dtype == torch.bfloat16
    atol, rtol = tolerance(torch.bfloat16)
    torch.testing.assert_close(output.float(), expected.float(), atol=atol, rtol=rtol)
    if with_grad:
        (weight_grad,) = torch.autograd.grad(output.float().sum(), ours.weight)
        (expected_grad,) = torch.autograd.grad(expected.float().sum(), theirs.weight)
        assert weight_grad.dtype == torch.float32  # the parameter's own dtype, through autocast's cast
        # A 128-term bfloat16 sum: its rounding scales with the largest gradient, so the tolerance does too.
        assert (weight_grad - expected_grad).abs().max() <= atol + rtol * expected_grad.abs().max()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # float64 is not cast, as autocast leaves it
        assert ours.double()(input.double()).dtype == torch.float64


def _func_problem() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    return tuple(torch.randn(shape, generator=generator, dtype=torch.float64) for shape in ((2, 3, 6, 6), (4, 3, 3, 3), (4,)))


FUNC_TRANSFORMS = {
    "grad": lambda conv, x, w, b: torch.func.grad(lambda x, w, b: conv(x, w, b).square().sum(), argnums=(0, 1, 2))(x, w, b),
    "jvp": lambda conv, x, w, b: torch.func.jvp(conv, (x, w, b), (torch.ones_like(x), w.flip(0), b + 1)),
    "vmap_input": lambda conv, x, w, b: torch.func.vmap(conv, in_dims=(0, None, None))(torch.stack([x, 2 * x, -x]), w, b),
    "vmap_weight": lambda conv, x, w, b: torch.func.vmap(conv, in_dims=(None, 0, 0))(x, torch.stack([w, w.flip(1)]), torch.stack([b, -b])),
    "vmap_both": lambda conv, x, w, b: torch.func.vmap(conv, in_dims=(0, 0, None))(torch.stack([x, x + 1]), torch.stack([w, 2 * w]), b),
    "jacfwd": lambda conv, x, w, b: torch.func.jacfwd(lambda w: conv(x[:1, :, :4, :4], w, b).sum(dim=(0, 2, 3)))(w),
    "jacrev": lambda conv, x, w, b: torch.func.jacrev(lambda w: conv(x[:1, :, :4, :4], w, b).sum(dim=(0, 2, 3)))(w),
    # Through the Function's vmap rule: vmapped weights become groups, vmapped inputs the batch.
    "ensemble_grad": lambda conv, x, w, b: torch.func.vmap(
        torch.func.grad(lambda w, b: conv(x, w, b).square().sum(), argnums=(0, 1)), in_dims=(0, 0)
    )(torch.stack([w, w.flip(1), -w]), torch.stack([b, -b, b])),
    "per_sample_grad": lambda conv, x, w, b: torch.func.vmap(
        torch.func.grad(lambda x, w: conv(x.unsqueeze(0), w, b).square().sum(), argnums=1), in_dims=(0, None)
    )(x, w),
}


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # torch.func's own
@pytest.mark.parametrize("transform", list(FUNC_TRANSFORMS))
@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
def test_torch_func_transforms_give_nn_conv2ds_numbers(transform: str, padding_mode: str):
    """torch.func (grad, jvp, vmap over inputs and over weights, jacfwd, jacrev, per-sample gradients):
    the same numbers as through nn.Conv2d's own conv, in float64."""
    x, w, b = _func_problem()
    ours = kernels.Conv2d(3, 4, 3, padding=1, padding_mode=padding_mode).double()
    theirs = nn.Conv2d(3, 4, 3, padding=1, padding_mode=padding_mode).double()

    def through(module):
        return lambda x, w, b: torch.func.functional_call(module, {"weight": w, "bias": b}, (x,))

    actual, expected = FUNC_TRANSFORMS[transform](through(ours), x, w, b), FUNC_TRANSFORMS[transform](through(theirs), x, w, b)
    atol, rtol = tolerance(torch.float64)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # forward AD's own
def test_forward_mode_ad_with_dual_tensors():
    import torch.autograd.forward_ad as forward_ad

    x, w, b = _func_problem()
    with forward_ad.dual_level():
        dual_x = forward_ad.make_dual(x, x.flip(-1))
        # Tensors that require grad take the autograd Function, whose jvp then gives every tangent's term.
        dual_w = forward_ad.make_dual(w.clone().requires_grad_(), torch.ones_like(w))
        dual_b = forward_ad.make_dual(b.clone().requires_grad_(), b.flip(0))
        actual = forward_ad.unpack_dual(kernels.conv2d(dual_x, dual_w, dual_b, stride=2, padding=1)).tangent
        expected = forward_ad.unpack_dual(torch.nn.functional.conv2d(dual_x, dual_w, dual_b, stride=2, padding=1)).tangent
        only_bias = forward_ad.unpack_dual(kernels.conv2d(x, w, dual_b, stride=2, padding=1)).tangent
    torch.testing.assert_close(only_bias, b.flip(0).view(1, -1, 1, 1).expand_as(actual), atol=0, rtol=0)
    atol, rtol = tolerance(torch.float64)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


def test_meta_tensors_give_nn_conv2ds_shapes_and_its_errors():
    """On the meta device (deferred initialisation, shape inference) only shapes exist: the same as nn.Conv2d's."""
    ours = kernels.Conv2d(3, 4, (3, 2), stride=2, padding="valid", dilation=(1, 2), device="meta")
    theirs = nn.Conv2d(3, 4, (3, 2), stride=2, padding="valid", dilation=(1, 2), device="meta")
    for input in (torch.empty(2, 3, 9, 8, device="meta"), torch.empty(3, 9, 8, device="meta")):
        output, expected = ours(input), theirs(input)
        assert output.device.type == "meta" and output.shape == expected.shape and output.dtype == expected.dtype
    with pytest.raises(RuntimeError, match="expected input"):
        ours(torch.empty(2, 5, 9, 8, device="meta"))


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore::UserWarning")  # functorch's slow-path notes for in-place ops under vmap
def test_per_sample_gradients_through_an_algorithm_whose_backward_vmap_cannot_batch():
    """depthwise's backward accumulates in place, which vmap refuses: under torch.func it hands over to im2col."""
    generator = torch.Generator().manual_seed(6)
    x, w = (
        torch.randn(3, 8, 7, 7, generator=generator, dtype=torch.float64),
        torch.randn(8, 1, 3, 3, generator=generator, dtype=torch.float64),
    )

    def per_sample(conv):
        return torch.func.vmap(torch.func.grad(lambda x, w: conv(x.unsqueeze(0), w).square().sum(), argnums=(0, 1)), in_dims=(0, None))(
            x, w
        )

    actual = per_sample(lambda x, w: kernels.conv2d(x, w, None, 1, 1, 1, 8, algorithm="depthwise"))
    expected = per_sample(lambda x, w: torch.nn.functional.conv2d(x, w, None, 1, 1, 1, 8))
    atol, rtol = tolerance(torch.float64)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


# Problems each algorithm takes (the transforms must reach its own ops, not unfold's, which "auto" picks for tiny convs).
TRANSFORM_CASES = {
    "3x3": Case("transform_3x3", in_channels=4, out_channels=4, padding=1, size=(8, 8)),
    "depthwise": Case("transform_depthwise", in_channels=4, out_channels=8, groups=4, padding=1, size=(8, 8)),
    "1x1": Case("transform_1x1", in_channels=4, out_channels=6, kernel_size=(1, 1), size=(5, 6)),
}
PLAIN_TRANSFORMS = {
    "jvp": lambda conv, x, w, b: torch.func.jvp(conv, (x, w, b), (x.flip(-1), w.flip(0), b + 1)),
    "vmap_input": lambda conv, x, w, b: torch.func.vmap(conv, in_dims=(0, None, None))(torch.stack([x, -2 * x]), w, b),
    "vmap_weight": lambda conv, x, w, b: torch.func.vmap(conv, in_dims=(None, 0, None))(x, torch.stack([w, w.flip(-1)]), b),
    "dual_tensors": lambda conv, x, w, b: _dual_tangent(conv, x, w, b),
}


def _dual_tangent(conv, x, w, b):
    import torch.autograd.forward_ad as forward_ad

    with forward_ad.dual_level():
        return forward_ad.unpack_dual(conv(forward_ad.make_dual(x, x.flip(-1)), w, b)).tangent


def transform_grid() -> list:
    return [
        unless_refused(case, algorithm, case, algorithm, transform, id=f"{case_name}-{algorithm}-{transform}")
        for case_name, case in TRANSFORM_CASES.items()
        for algorithm in ALGORITHMS
        for transform in PLAIN_TRANSFORMS
    ]


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore::UserWarning")  # functorch's slow-path notes
@pytest.mark.parametrize(("case", "algorithm", "transform"), transform_grid())
def test_transforms_of_tensors_that_do_not_require_grad(case: Case, algorithm: str, transform: str):
    """jvp, vmap and dual tensors need the Function's rules even when nothing requires grad: without them the
    transforms ran the algorithms' own ops and failed (out= ops, in-place masks) for every algorithm but unfold."""
    x, w, b = (tensor.detach() for tensor in make_inputs(case, torch.float64, "cpu", seed=7))
    kwargs = case.conv_kwargs()

    def ours(x, w, b):
        return kernels.conv2d(x, w, b, **kwargs, algorithm=algorithm)

    def theirs(x, w, b):
        return torch.nn.functional.conv2d(x, w, b, kwargs["stride"], kwargs["padding"], kwargs["dilation"], kwargs["groups"])

    actual, expected = PLAIN_TRANSFORMS[transform](ours, x, w, b), PLAIN_TRANSFORMS[transform](theirs, x, w, b)
    atol, rtol = tolerance(torch.float64)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)
