"""kernels.Conv2d in models that torch.compile or torch.export: whole graphs, our custom ops, nn.Conv2d's numbers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kernels
from kernels.tolerances import tolerance
from tests.kernels.test_module import MODULE_CONFIGS

OUR_CONV = {torch.ops.convservice.conv2d, torch.ops.convservice.conv2d.default}  # Dynamo's graphs name the packet
OUR_OPS = OUR_CONV | {torch.ops.convservice.conv2d_backward, torch.ops.convservice.conv2d_backward.default}
TORCH_CONVS = ("convolution", "conv2d", "conv_transpose", "mkldnn", "cudnn", "thnn_conv")


def twins(config: dict) -> tuple[kernels.Conv2d, nn.Conv2d]:
    """Our module and nn.Conv2d with the same parameters, float64."""
    ours = kernels.Conv2d(**config).double()
    theirs = nn.Conv2d(**config).double()
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def outputs_and_gradients(model: nn.Module, input: torch.Tensor) -> list[torch.Tensor]:
    """[output, d(loss)/d(input), d(loss)/d(each parameter)] for a loss that weights every output element differently."""
    input = input.detach().requires_grad_()
    output = model(input)
    weights = torch.linspace(-1, 2, output.numel(), dtype=output.dtype).view_as(output)
    gradients = torch.autograd.grad((output * weights).sum(), [input, *model.parameters()])
    return [output, *gradients]


def assert_same(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    atol, rtol = tolerance(torch.float64)
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected):
        torch.testing.assert_close(got, want, atol=atol, rtol=rtol)


class Recorder:
    """A torch.compile backend that keeps Dynamo's graph, then runs it through AOTAutograd (fake tensors, the
    autograd formula and the backward op's fake implementation all traced) without Inductor's C++ compile."""

    def __init__(self) -> None:
        from torch._dynamo.backends.registry import lookup_backend

        self.graphs: list[torch.fx.GraphModule] = []
        self._aot_eager = lookup_backend("aot_eager")

    def __call__(self, graph: torch.fx.GraphModule, example_inputs):
        self.graphs.append(graph)
        return self._aot_eager(graph, example_inputs)

    def targets(self) -> list:
        return [node.target for graph in self.graphs for node in graph.graph.nodes if node.op == "call_function"]


def torch_convs(targets: list) -> list:
    """The targets that are torch's own convs (anything conv-named that is not our op)."""
    return [target for target in targets if target not in OUR_OPS and any(name in str(target) for name in TORCH_CONVS)]


@pytest.mark.parametrize("config", MODULE_CONFIGS.values(), ids=MODULE_CONFIGS.keys())
def test_fullgraph_compile_calls_our_op_and_gives_nn_conv2ds_numbers(config):
    """Every module configuration (padding modes, "same", groups, no bias) compiles as one graph whose conv is
    our op, with nn.Conv2d's output and gradients in float64."""
    torch.manual_seed(0)
    ours, theirs = twins(config)
    recorder = Recorder()
    compiled = torch.compile(ours, backend=recorder, fullgraph=True)
    input = torch.randn(2, config["in_channels"], 6, 7, dtype=torch.float64)
    assert_same(outputs_and_gradients(compiled, input), outputs_and_gradients(theirs, input))
    targets = recorder.targets()
    assert OUR_CONV & set(targets), targets
    assert not torch_convs(targets)


def test_a_compiled_model_is_one_graph_through_inductor(needs_compiler):
    """conv -> BatchNorm -> ReLU -> strided conv: no graph break (the eager Function broke the graph at each
    conv), run by Inductor, whose own kernels do the BatchNorm and ReLU around our op."""
    torch.manual_seed(1)

    def model(conv):
        return nn.Sequential(conv(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), conv(8, 4, 3, stride=2, bias=False)).double()

    ours, theirs = model(kernels.Conv2d), model(nn.Conv2d)
    theirs.load_state_dict(ours.state_dict())
    input = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    explanation = torch._dynamo.explain(ours)(input)
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons
    assert_same(outputs_and_gradients(torch.compile(ours, fullgraph=True), input), outputs_and_gradients(theirs, input))


def test_dynamic_shapes_and_unbatched_input():
    """One compile for several input sizes (dynamic=True), and a 3-D input, as nn.Conv2d takes it."""
    torch.manual_seed(2)
    ours, theirs = twins(dict(in_channels=3, out_channels=4, kernel_size=3, stride=(2, 1), padding=1, padding_mode="reflect"))
    compiled = torch.compile(ours, backend=Recorder(), fullgraph=True, dynamic=True)
    for shape in ((2, 3, 8, 8), (3, 3, 9, 7), (1, 3, 5, 6), (3, 6, 5)):
        input = torch.randn(shape, dtype=torch.float64)
        assert_same(outputs_and_gradients(compiled, input), outputs_and_gradients(theirs, input))


def test_channels_last_output_format_survives_compilation():
    """The fake implementation promises nn.Conv2d's strides, and the real one must keep that promise."""
    torch.manual_seed(3)
    ours, theirs = twins(dict(in_channels=4, out_channels=6, kernel_size=3, padding=1))
    input = torch.randn(2, 4, 8, 8, dtype=torch.float64).to(memory_format=torch.channels_last)
    actual = torch.compile(ours, backend=Recorder(), fullgraph=True)(input)
    expected = theirs(input)
    assert actual.stride() == expected.stride()
    assert_same([actual], [expected])


def test_torch_export_gives_one_graph_with_our_op():
    torch.manual_seed(4)
    ours, theirs = twins(dict(in_channels=3, out_channels=5, kernel_size=(3, 2), stride=2, padding="valid", dilation=(1, 2)))
    input = torch.randn(2, 3, 9, 8, dtype=torch.float64)
    program = torch.export.export(ours, (input,))
    targets = [node.target for node in program.graph.nodes if node.op == "call_function"]
    assert torch.ops.convservice.conv2d.default in targets
    assert not torch_convs(targets)
    assert_same([program.module()(input)], [theirs(input)])


@pytest.mark.parametrize(
    "arguments",
    [
        dict(bias=True, stride=[1, 1], padding=[1, 1, 1, 1], dilation=[1, 1], groups=1, padding_mode="zeros", algorithm="auto"),
        dict(bias=False, stride=[2, 1], padding=[0, 1, 2, 0], dilation=[1, 2], groups=2, padding_mode="zeros", algorithm="im2col"),
        dict(bias=True, stride=[1, 2], padding=[2, 2, 1, 1], dilation=[1, 1], groups=1, padding_mode="circular", algorithm="auto"),
        dict(bias=False, stride=[1, 1], padding=[1, 1, 1, 1], dilation=[1, 1], groups=4, padding_mode="reflect", algorithm="depthwise"),
    ],
    ids=["plain", "grouped-uneven", "circular", "depthwise-reflect"],
)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_the_ops_pass_torchs_own_custom_op_checks(arguments: dict, layout: str):
    """torch.library.opcheck: schema, fake (shape-only) implementation against the real one, autograd
    registration, and tracing with dynamic shapes, for the forward op and through it the backward one."""
    generator = torch.Generator().manual_seed(5)
    groups = arguments["groups"]
    input = torch.randn(2, 4, 6, 7, generator=generator, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 4 // groups, 3, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    if layout == "channels_last":
        input = input.detach().to(memory_format=torch.channels_last).requires_grad_()
    bias = torch.randn(4, generator=generator, dtype=torch.float64, requires_grad=True) if arguments["bias"] else None
    rest = [arguments[key] for key in ("stride", "padding", "dilation", "groups", "padding_mode", "algorithm")]
    torch.library.opcheck(torch.ops.convservice.conv2d.default, (input, weight, bias, *rest))
