"""The autograd Function behind `kernels.conv2d` (one backward and jvp, in torch.func's form and the
classic one), and the functional entry point.

Everything argument-shaped is handled here once: validation (kernels/params.py), unbatched input,
non-zero padding modes (kernels/padding.py), the output memory format, and which gradients are
needed. The algorithm only computes zero-padded, batched conv and its gradients.
"""

from __future__ import annotations

import math

import torch
import torch.autograd.forward_ad as forward_ad

from kernels import compiled, gemm
from kernels import padding as padding_modes
from kernels.base import ConvAlgorithm, UnsupportedProblem, get
from kernels.limits import get_limits
from kernels.memo import BoundedMemo
from kernels.params import ConvSpec, IntPair, PaddingArg, call_key, normalize
from kernels.selection import resolve


def prefers_channels_last(tensor: torch.Tensor) -> bool:
    """`tensor.suggest_memory_format() == torch.channels_last`, the test torch's conv uses for its output format.

    It reads the stride order, so a tensor that is contiguous *and* channels_last (one channel, or a
    (C_out, 1, kH, kW) depthwise weight, with NHWC strides) counts as channels_last, as in torch;
    `is_contiguous(memory_format=...)` cannot tell those apart. Port of c10's
    is_channels_last_strides_2d_s4 (an empty tensor is never channels_last).
    """
    return tensor.dim() == 4 and strides_prefer_channels_last(tensor.shape, tensor.stride())


def channels_last_strides(size: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """The strides torch.empty(size, memory_format=torch.channels_last) gives an (N, C, H, W) tensor.

    For torch.empty_strided, which skips the memory-format logic: ~2 us a call against ~6-7 (2-core host)."""
    _, channels, height, width = size
    return (height * width * channels, 1, width * channels, channels)


def strides_prefer_channels_last(shape: tuple[int, ...], strides: tuple[int, ...]) -> bool:
    """`prefers_channels_last` for a 4-d tensor of this shape and these strides."""
    if strides[1] == 0:
        return False
    smallest = 0
    for dim in (1, 3, 2, 0):
        size, stride = shape[dim], strides[dim]
        if size == 0 or stride < smallest or (dim == 0 and smallest == strides[1]):
            return False
        smallest = stride * size
    return True


def _output_format(input: torch.Tensor, weight: torch.Tensor, padding_mode: str) -> torch.memory_format:
    """The memory format nn.Conv2d gives its output (and input gradient) for these operands.

    torch asks its conv backend (aten's _determine_backend_memory_format): channels_last when the
    input it convolves or the weight suggests it, except on CUDA where cuDNN never takes float64
    (and nothing else there returns channels_last). With a non-zero padding mode nn.Conv2d convolves
    F.pad's result, whose layout depends on the mode and device: circular always allocates NCHW, and
    CUDA's reflect/replicate kernels do too (CPU's keep the input's layout) - seen on the H200 run of
    bench/gpu_check.sh and on this CPU build. This is a layout question only: no torch conv is called.
    """
    if input.shape[0] == 0:  # torch answers an empty batch before asking its backends: always NCHW
        return torch.contiguous_format
    if input.device.type == "cuda" and (input.dtype == torch.float64 or weight.dtype == torch.float64 or not torch.backends.cudnn.enabled):
        return torch.contiguous_format
    padded_keeps_layout = padding_mode == "zeros" or (padding_mode != "circular" and input.device.type == "cpu")
    channels_last = (padded_keeps_layout and prefers_channels_last(input)) or prefers_channels_last(weight)
    return torch.channels_last if channels_last else torch.contiguous_format


def _in_format(tensor: torch.Tensor, memory_format: torch.memory_format) -> torch.Tensor:
    """`tensor` laid out in `memory_format`, with the strides torch would give it.

    `.contiguous()` is a no-op on an empty tensor (any strides count as contiguous), so an empty
    batch would keep whatever strides the algorithm produced; nn.Conv2d's have the format's strides.
    """
    if tensor.numel() == 0:
        return torch.empty_like(tensor, memory_format=memory_format)
    tensor = tensor.contiguous(memory_format=memory_format)
    # A size-1 dimension's stride addresses nothing, so `.contiguous` keeps whatever the algorithm left there; but
    # the next layer reads the strides to pick its format (`prefers_channels_last`), so they are made torch's: a view.
    strides = channels_last_strides(tensor.shape) if memory_format == torch.channels_last else _contiguous_strides(tensor.shape)
    return tensor if tensor.stride() == strides else tensor.as_strided(tensor.shape, strides, tensor.storage_offset())


def _contiguous_strides(size: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for extent in reversed(size):
        strides.append(step)
        step *= max(extent, 1)
    return tuple(reversed(strides))


def _save(ctx, inputs: tuple) -> None:
    input, weight, bias, spec, padding_mode, algorithm, memory_format = inputs
    ctx.save_for_backward(input, weight)
    ctx.save_for_forward(input, weight)
    ctx.conv = (spec, padding_mode, algorithm, memory_format)


# Algorithms whose backward runs on functorch's batched tensors (vmap over grad: jacrev, per-sample
# gradients), each checked against F.conv2d; depthwise accumulates in place into a buffer vmap cannot
# batch ("vmap: inplace arithmetic ... is not possible"), and triton's kernels take raw pointers.
_BATCHABLE_BACKWARD = frozenset({"im2col", "unfold", "shifted_gemm", "winograd", "pointwise"})


def _backward(ctx, grad_output):
    input, weight = ctx.saved_tensors
    need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
    kept, ctx.kept = getattr(ctx, "kept", None), None  # used once: a second backward (retain_graph) recomputes it
    grad_input, grad_weight = gradients(grad_output, input, weight, *ctx.conv, need_input, need_weight, kept)
    grad_bias = grad_output.sum(dim=(0, 2, 3)) if need_bias else None
    return grad_input, grad_weight, grad_bias, None, None, None, None


def gradients(
    grad_output,
    input,
    weight,
    spec: ConvSpec,
    padding_mode: str,
    algorithm: ConvAlgorithm,
    memory_format,
    need_input,
    need_weight,
    kept: tuple[ConvAlgorithm, object] | None = None,
):
    """(grad_input, grad_weight) of one conv, each None where not needed; grad_input in `memory_format`.

    kept: (algorithm, what it kept) from the forward of this input and weight (`_forward`, keep=True), or None."""
    if weight.shape[1] == 0:  # no input channels (`_forward`): both gradients are empty
        return (_in_format(torch.zeros_like(input), memory_format) if need_input else None), (
            torch.zeros_like(weight) if need_weight else None
        )
    padded, run_spec = _apply_padding_mode(input, spec, padding_mode)
    # create_graph=True: use an algorithm whose backward is itself differentiable, within its limits; under
    # torch.func, one whose backward takes batched tensors (vmap over grad).
    double = torch.is_grad_enabled() and not algorithm.support().double_backward
    if double or (algorithm.name not in _BATCHABLE_BACKWARD and _functorch_active is not None and _functorch_active()):
        algorithm = get("im2col")
        algorithm.accept(padded, weight, run_spec)
    # Where the forward ran this algorithm and its forward is inexact for NaN and infinities, it found the input and
    # weight finite: only the grad is new.
    known_finite = kept is not None and kept[0] is algorithm and "forward" in algorithm.inexact_nonfinite
    algorithm = _exact_for_nonfinite(algorithm, "backward", padded, weight, run_spec, grad_output, known_finite=known_finite)
    # Not in a double backward: what the forward kept is not a function of the input there, and grad_weight must be.
    if kept is not None and kept[0] is algorithm and not torch.is_grad_enabled():
        grad_input, grad_weight = algorithm.backward_kept(kept[1], grad_output, padded, weight, run_spec, need_input, need_weight)
    else:
        grad_input, grad_weight = algorithm.backward(grad_output, padded, weight, run_spec, need_input, need_weight)
    if grad_input is not None:
        if padded is not input:
            grad_input = padding_modes.unpad_grad(grad_input, spec.padding, padding_mode, input.shape[2], input.shape[3])
        grad_input = _in_format(grad_input, memory_format)
    return grad_input, grad_weight


def _jvp(ctx, input_tangent, weight_tangent, bias_tangent, *_):
    """d conv(x, w, b) = conv(dx, w) + conv(x, dw) + db; through `_apply`, so vmap (jacfwd) can fold it too."""
    input, weight = ctx.saved_tensors
    spec, padding_mode, algorithm, memory_format = ctx.conv
    arguments = (spec, padding_mode, algorithm, memory_format)
    tangent = None
    if input_tangent is not None:
        tangent = _apply(input_tangent, weight, None, *arguments)
    if weight_tangent is not None:
        term = _apply(input, weight_tangent, None, *arguments)
        tangent = term if tangent is None else tangent + term
    if bias_tangent is not None:
        term = bias_tangent.view(1, -1, 1, 1)
        tangent = (
            term.expand(_output_shape(input, weight, spec)).contiguous(memory_format=memory_format) if tangent is None else tangent + term
        )
    return tangent


class Conv2dFunction(torch.autograd.Function):
    """conv2d with our own forward and backward; dispatches the math to a ConvAlgorithm.

    Written in the form torch.func needs (forward without ctx, `setup_context`), with forward-mode AD
    (`jvp`: conv is linear in each operand) and a `vmap` rule that folds the vmapped dimension into the
    batch (or, for vmapped weights, into the channels as groups). Under vmap over gradients (jacrev,
    per-sample gradients) functorch runs `backward` on batched tensors, which only some algorithms'
    backward takes (`_BATCHABLE_BACKWARD`); the others hand it to im2col there.
    Outside torch.func transforms `_apply` takes `_EagerConv2dFunction`, the same Function in the classic form."""

    @staticmethod
    def forward(input, weight, bias, spec: ConvSpec, padding_mode: str, algorithm: ConvAlgorithm, memory_format):
        return _forward(input, weight, bias, spec, padding_mode, algorithm, memory_format)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _save(ctx, inputs)

    backward = staticmethod(_backward)
    jvp = staticmethod(_jvp)

    @staticmethod
    def vmap(info, in_dims, input, weight, bias, spec: ConvSpec, padding_mode: str, algorithm: ConvAlgorithm, memory_format):
        """One conv for the whole vmapped batch: (V, N, C, H, W) inputs as (V*N, C, H, W); vmapped weights
        (V, O, C/g, kH, kW) as one conv of V*g groups over (N, V*C, H, W)."""
        input_dim, weight_dim, bias_dim = in_dims[:3]
        size = info.batch_size
        if weight_dim is None and bias_dim is None:
            folded = input.movedim(input_dim, 0).flatten(0, 1)
            output = _apply_spec(folded, weight, bias, spec, padding_mode, algorithm)
            return output.unflatten(0, (size, -1)), 0
        inputs = input.movedim(input_dim, 0) if input_dim is not None else input.expand(size, *input.shape)
        weights = weight.movedim(weight_dim, 0) if weight_dim is not None else weight.expand(size, *weight.shape)
        if bias is not None:
            bias = (bias.movedim(bias_dim, 0) if bias_dim is not None else bias.expand(size, *bias.shape)).flatten()
        batch, channels = inputs.shape[1], inputs.shape[2]
        grouped = inputs.movedim(0, 1).reshape(batch, size * channels, *inputs.shape[3:])
        grouped_spec = ConvSpec(spec.stride, spec.padding, spec.dilation, spec.groups * size)
        output = _apply_spec(grouped, weights.flatten(0, 1), bias, grouped_spec, padding_mode, algorithm)
        return output.unflatten(1, (size, -1)).movedim(1, 0), 0


class _EagerConv2dFunction(torch.autograd.Function):
    """Conv2dFunction in the classic form (forward takes ctx). torch's Function.apply binds the arguments
    with inspect.signature on every call for the setup_context form, ~40 us here (a seed-sized forward +
    backward is ~350), which only torch.func's transforms need."""

    @staticmethod
    def forward(ctx, input, weight, bias, spec: ConvSpec, padding_mode: str, algorithm: ConvAlgorithm, memory_format):
        _save(ctx, (input, weight, bias, spec, padding_mode, algorithm, memory_format))
        output, ctx.kept = _forward(input, weight, bias, spec, padding_mode, algorithm, memory_format, keep=True)
        return output

    backward = staticmethod(_backward)
    jvp = staticmethod(_jvp)


# The test torch's own Function.apply makes (private; where a torch lacks it, every call takes the torch.func form).
_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", None)


def _differentiable(*tensors: torch.Tensor | None) -> bool:
    """Whether the call needs the Function: backward (an operand requires grad), or its jvp or vmap rule (a
    torch.func transform, or forward AD's dual tensors, which exist only inside a dual level). Without the
    Function those transforms would run the algorithms' own ops, which they cannot (out= ops, in-place masks)."""
    if torch.is_grad_enabled() and any(tensor is not None and tensor.requires_grad for tensor in tensors):
        return True
    return _functorch_active is None or _functorch_active() or getattr(forward_ad, "_current_level", 0) >= 0


def _apply(*arguments) -> torch.Tensor:
    """Conv2dFunction.apply, in the classic form when no torch.func transform is active."""
    if _functorch_active is None or _functorch_active():
        return Conv2dFunction.apply(*arguments)
    return _EagerConv2dFunction.apply(*arguments)


def _output_shape(input: torch.Tensor, weight: torch.Tensor, spec: ConvSpec) -> tuple[int, int, int, int]:
    height, width = spec.output_size(input.shape[2], input.shape[3], weight.shape[2], weight.shape[3])
    return (input.shape[0], weight.shape[0], height, width)


def _apply_spec(input, weight, bias, spec: ConvSpec, padding_mode: str, algorithm: ConvAlgorithm) -> torch.Tensor:
    """The conv of a checked spec on new operands (the vmap rule's folded ones): the same algorithm where it
    accepts them, else what "auto" picks; through `_apply`, so autograd and functorch see it."""
    try:
        chosen = resolve(algorithm.name, input, weight, spec)
    except UnsupportedProblem:  # WorkTooLarge included: the folded problem is bigger
        chosen = resolve("auto", input, weight, spec)
    return _apply(input, weight, bias, spec, padding_mode, chosen, _output_format(input, weight, padding_mode))


def _forward(input, weight, bias, spec: ConvSpec, padding_mode: str, algorithm: ConvAlgorithm, memory_format, keep: bool = False):
    """The output; with `keep`, (output, (the algorithm that ran, what it kept for the backward)) for `gradients`."""
    if weight.shape[1] == 0:  # no input channels: an empty sum, so every output is its bias (torch's (N, 0, ...) is no conv's shape)
        output = input.new_zeros(_output_shape(input, weight, spec))
        output = _in_format(output if bias is None else output + bias.view(1, -1, 1, 1), memory_format)
        return (output, None) if keep else output
    padded, run_spec = _apply_padding_mode(input, spec, padding_mode)
    algorithm = _exact_for_nonfinite(algorithm, "forward", padded, weight, run_spec)
    if not keep:
        return _in_format(algorithm.forward(padded, weight, bias, run_spec), memory_format)
    output, kept = algorithm.forward_keeping(padded, weight, bias, run_spec)
    return _in_format(output, memory_format), (algorithm, kept)


def _exact_for_nonfinite(
    algorithm: ConvAlgorithm, direction: str, input, weight, spec: ConvSpec, *more, known_finite: bool = False
) -> ConvAlgorithm:
    """`algorithm`, or im2col where its `direction` would spread a NaN or an infinity of these operands to elements
    torch keeps finite (`ConvAlgorithm.inexact_nonfinite`). Telling costs one sum per operand (`known_finite`: input
    and weight were found finite already, only `more` is summed): NaN and infinities survive a sum, and a finite sum
    that overflows only costs the exact path. Under torch.func (batched tensors have no .item()) it cannot tell, and
    takes im2col."""
    if direction not in algorithm.inexact_nonfinite:
        return algorithm
    transformed = _functorch_active is None or _functorch_active()
    operands = more if known_finite else (input, weight, *more)
    if not transformed and all(math.isfinite(tensor.sum().item()) for tensor in operands):
        return algorithm
    exact = get("im2col")
    exact.accept(input, weight, spec)
    return exact


def _apply_padding_mode(input: torch.Tensor, spec: ConvSpec, padding_mode: str) -> tuple[torch.Tensor, ConvSpec]:
    """Non-zero padding modes are materialised here so algorithms only see zero padding."""
    if padding_mode == "zeros" or not any(spec.padding):
        return input, spec
    return padding_modes.pad(input, spec.padding, padding_mode), spec.with_padding((0, 0, 0, 0))


# (spec, algorithm, output memory format) by call: validation, "auto"'s choice and the format test read
# only shapes, strides, dtypes, devices, the arguments, the thread count and the limits, and took ~45
# us of a seed-sized conv's ~80 (a model's small layers pay it on every call). Errors are not cached.
_PLANS = BoundedMemo(1024)


def _plan(batched, weight, bias, stride, padding, dilation, groups, padding_mode, algorithm, backward=True):
    """(spec, algorithm, output memory format); backward: whether autograd records this call ("auto" weighs forward+backward
    then, the forward alone otherwise: kernels/selection.py)."""
    key = (
        backward,
        *call_key(batched, weight, bias, stride, padding, dilation, groups, padding_mode),
        batched.stride(),
        weight.stride(),
        repr(algorithm),
        torch.get_num_threads(),
        torch.backends.cudnn.enabled,
        get_limits(),
        compiled.available(),  # "auto" prefers winograd on the CPU where its transforms compile
        gemm.backend() if batched.device.type == "cpu" else None,  # and weighs the others by where their GEMMs run
    )
    plan = _PLANS.get(key)
    if plan is None:
        spec = normalize(batched, weight, bias, stride, padding, dilation, groups, padding_mode)
        chosen = resolve(algorithm, batched, weight, spec, backward)
        plan = _PLANS.remember(key, (spec, chosen, _output_format(batched, weight, padding_mode)))
    return plan


def _autocast(tensor: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Autocast's rule for its lower-precision ops: floating tensors other than float64 take `dtype`."""
    if tensor is None or not tensor.is_floating_point() or tensor.dtype == torch.float64:
        return tensor
    return tensor.to(dtype)


def conv2d(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: IntPair = 1,
    padding: PaddingArg = 0,
    dilation: IntPair = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
    algorithm: str = "auto",
) -> torch.Tensor:
    """torch.nn.functional.conv2d semantics, plus nn.Conv2d's `padding_mode` and a choice of `algorithm`.

    input (N, C_in, H, W) or unbatched (C_in, H, W); weight (C_out, C_in/groups, kH, kW);
    bias (C_out,) or None. Returns (N, C_out, H_out, W_out) (or (C_out, H_out, W_out)) in input's dtype,
    in the memory format nn.Conv2d would give it (`_output_format`).
    """
    for value, name in ((input, "input"), (weight, "weight")):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"conv2d(): argument '{name}' must be Tensor, not {type(value).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"conv2d(): argument 'bias' must be Tensor or None, not {type(bias).__name__}")
    device_type = input.device.type
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):  # torch refuses the question for "meta"
        # As nn.Conv2d under autocast: run in the autocast dtype (float64 stays), with autocast off inside
        # so our own matmuls are not cast again.
        dtype = torch.get_autocast_dtype(device_type)
        input, weight, bias = (_autocast(tensor, dtype) for tensor in (input, weight, bias))
        with torch.autocast(device_type, enabled=False):
            return conv2d(input, weight, bias, stride, padding, dilation, groups, padding_mode, algorithm)
    unbatched = input.dim() == 3
    batched = input.unsqueeze(0) if unbatched else input
    if batched.device.type == "meta":  # shapes only (deferred initialisation, shape inference): nothing to compute
        spec = normalize(batched, weight, bias, stride, padding, dilation, groups, padding_mode)
        output = torch.empty(_output_shape(batched, weight, spec), dtype=input.dtype, device="meta")  # NCHW, as torch's meta conv
        return output.squeeze(0) if unbatched else output
    if torch.compiler.is_compiling():  # torch.compile / torch.export trace our custom op instead (kernels/ops.py)
        spec = normalize(batched, weight, bias, stride, padding, dilation, groups, padding_mode)
        if algorithm != "auto":
            get(algorithm)
        output = torch.ops.convservice.conv2d(
            batched, weight, bias, list(spec.stride), list(spec.padding), list(spec.dilation), spec.groups, padding_mode, algorithm
        )
        return output.squeeze(0) if unbatched else output
    differentiable = _differentiable(input, weight, bias)
    spec, chosen, memory_format = _plan(batched, weight, bias, stride, padding, dilation, groups, padding_mode, algorithm, differentiable)
    arguments = (batched, weight, bias, spec, padding_mode, chosen, memory_format)
    if differentiable:
        output = _apply(*arguments)
    else:  # nothing to differentiate or transform: skip the autograd node (~30 us, most of a tiny conv's time)
        with torch.no_grad():  # as inside the Function: compiled paths (kernels/compiled.py) refuse grad mode
            output = _forward(*arguments)
    return output.squeeze(0) if unbatched else output
