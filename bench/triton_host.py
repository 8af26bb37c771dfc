"""Host cost of the "triton" algorithm per call, measured without a GPU.

On a GPU the as-called ratio to cuDNN (bench/bench_gpu.py) is set by host time on most ResNet-50
layers: in the H200 runs of 2026-11-27 our forward+backward spent 0.3-0.8 ms of CPU per call against
0.1-0.6 ms of kernels (docs/gpu.md). This runs our whole Python path (kernels.conv2d, the autograd
Function, the layer plans, each launch up to the compiled kernel's C launcher) on CPU tensors of
bench_gpu's shapes, with Triton's first launch and the compiled kernel replaced by stand-ins that do
nothing, and the GPU's SM count set to an H200's (the split choices, and so the launches, are the
GPU's). So it times the CPU work of issuing a call, less the driver's own launch cost (a few us per
launch on the GPU host: `launches` counts them). The floor is a trivial autograd.Function that only
allocates the same output and gradients: what any Python autograd path pays before any work of ours
(allocations over 32 MiB are fresh mmaps on the CPU, ~25 us each, and appear in both).

float16 stands for both 16-bit types (bfloat16 takes the same host path on a GPU; the CPU check
refuses it, as the interpreter has no bfloat16 matmul). Our path copies nothing for channels-last
16-bit operands, so no CPU copy is timed; float32 adds one weight copy (one launch) per backward,
whose CPU cost here would be a real copy, so it is not offered. A proxy for changes to the host path
made where no GPU is: the GPU's own figures come from bench/gpu_check.sh.

    .venv/bin/python -m bench.triton_host             # bench_gpu's shapes, batch 32, channels_last
    .venv/bin/python -m bench.triton_host --reps 21

Needs triton installed, and TRITON_INTERPRET unset (the launches must take the compiled path).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

from app.memory import keep_freed_memory
from bench.bench_gpu import BATCH, SHAPES, Shape
from kernels.function import channels_last_strides

SM_COUNT = 132  # an H200's: the split choices (and so the launches) of the benchmarked GPU


class _NoKernel:
    """A CompiledKernel whose launches do nothing but count."""

    function = packed_metadata = None
    launches = 0

    @staticmethod
    def run(*args) -> None:
        _NoKernel.launches += 1


def install_stand_ins() -> None:
    """Launches as on a GPU (compiled path, Triton >= 3.3), into `_NoKernel`; the triton algorithm accepts CPU tensors."""
    from types import SimpleNamespace

    from kernels import triton_conv, triton_fwd, triton_grad_weight, triton_launch
    from kernels.base import Support

    def first_launch(kernel, grid, tensors, scalars, constexprs):
        config = kernel.configs[0].kwargs if hasattr(kernel, "configs") else {}
        dims = (*(grid({**constexprs, **config}) if callable(grid) else grid), 1, 1)[:3]
        return _NoKernel, dims, ()

    triton_launch._INTERPRETED, triton_launch._SUPPORTED = False, True
    triton_launch._first_launch = first_launch
    active = SimpleNamespace(get_current_device=lambda: 0, get_current_stream=lambda device: 0)
    triton_launch.driver = SimpleNamespace(active=active)
    for module in (triton_fwd, triton_grad_weight):
        module.sm_count = lambda device: SM_COUNT
    support = triton_conv.TritonConv.support
    triton_conv.TritonConv.support = lambda self: Support(**{**support(self).__dict__, "devices": ("cuda", "cpu")})


class _Floor(torch.autograd.Function):
    """Allocates what a conv returns and nothing else: the cost of any Python autograd.Function."""

    @staticmethod
    def forward(ctx, input, weight, out_shape):
        ctx.save_for_backward(input, weight)
        return torch.empty_strided(out_shape, channels_last_strides(out_shape), dtype=input.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        return torch.empty_like(input), torch.empty_like(weight), None


def steps(shape: Shape, dtype: torch.dtype) -> dict[str, Callable[[], None]]:
    import kernels

    x = torch.empty(BATCH, shape.in_channels, shape.size, shape.size, dtype=dtype)
    w = torch.empty(shape.out_channels, shape.in_channels // shape.groups, shape.kernel, shape.kernel, dtype=dtype)
    x, w = (t.contiguous(memory_format=torch.channels_last) for t in (x, w))
    x_grad, w_grad = x.clone().requires_grad_(shape.input_grad), w.clone().requires_grad_()
    leaves = [x_grad, w_grad] if shape.input_grad else [w_grad]
    args = (None, shape.stride, shape.padding, 1, shape.groups)
    output = kernels.conv2d(x, w, *args, algorithm="triton")
    grad_output = torch.ones_like(output)

    def forward() -> None:
        with torch.no_grad():
            kernels.conv2d(x, w, *args, algorithm="triton")

    def forward_backward() -> None:
        torch.autograd.grad(kernels.conv2d(x_grad, w_grad, *args, algorithm="triton"), leaves, grad_output)

    def floor() -> None:
        torch.autograd.grad(_Floor.apply(x_grad, w_grad, output.shape), leaves, grad_output)

    return {"fwd": forward, "fwd_bwd": forward_backward, "floor": floor}


def per_call(step: Callable[[], None], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        step()
    return (time.perf_counter() - start) / calls


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=11, help="interleaved repetitions (median reported)")
    parser.add_argument("--calls", type=int, default=200, help="back-to-back calls per timed sample")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: the launches must take the compiled path")
    install_stand_ins()
    keep_freed_memory()  # as the service does: freed blocks under 32 MiB are reused, not mapped afresh

    cases = {(shape.name, "float16"): steps(shape, torch.float16) for shape in SHAPES}
    launches = {}
    for key, kinds in cases.items():
        for kind, step in kinds.items():
            for _ in range(20):  # first launches, plan caches
                step()
            before = _NoKernel.launches
            step()
            launches[key, kind] = _NoKernel.launches - before
    samples = {(key, kind): [] for key, kinds in cases.items() for kind in kinds}
    for _ in range(args.reps):
        for key, kinds in cases.items():
            for kind, step in kinds.items():
                samples[key, kind].append(per_call(step, args.calls))
    print(
        f"host us per call, triton with stand-in launches; {platform.processor() or 'cpu'}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}; batch {BATCH}, channels_last; median of {args.reps}"
    )
    print(f"{'shape':<24} {'dtype':<9} {'fwd':>7} {'fwd+bwd':>8} {'floor':>7} {'ours-floor':>10} {'launches fwd / fwd+bwd':>24}")
    rows = []
    for (name, label), kinds in cases.items():
        median = {kind: statistics.median(samples[(name, label), kind]) * 1e6 for kind in kinds}
        row = {
            "shape": name,
            "dtype": label,
            **median,
            "launches_fwd": launches[(name, label), "fwd"],
            "launches_fwd_bwd": launches[(name, label), "fwd_bwd"],
        }
        rows.append(row)
        print(
            f"{name:<24} {label:<9} {median['fwd']:7.1f} {median['fwd_bwd']:8.1f} {median['floor']:7.1f} "
            f"{median['fwd_bwd'] - median['floor']:10.1f} {row['launches_fwd']:>12} / {row['launches_fwd_bwd']}"
        )
    return rows


if __name__ == "__main__":
    main()
