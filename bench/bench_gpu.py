"""GPU benchmark: the "triton" and "im2col" algorithms against nn.Conv2d (cuDNN) on ResNet-50 layer shapes.

Forward (no grad) and forward+backward, N=32, channels_last, no bias, in bfloat16 and float32 (TF32
on for both sides by default: cuDNN's default for convs; `--fp32 ieee` or `both` to add IEEE float32).
Timing: CUDA events around a loop of calls, after a warm-up that includes Triton's autotuning and
cudnn.benchmark's algorithm search; providers interleaved per repetition; medians. Prints a table of
ratios ours / cuDNN per shape and dtype plus geomeans, and writes it to --results (and to $OUT if set).
A wall-clock --budget stops starting new shapes so the whole run fits a short GPU lease.

    PYTHONPATH=. python3 -m bench.bench_gpu --results results/gpu_check.md
    PYTHONPATH=. python3 -m bench.bench_gpu --graphs --results results/gpu_graphs.md   # GPU work alone
    TRITON_INTERPRET=1 .venv/bin/python -m bench.bench_gpu --dry-run     # CPU plumbing check, tiny shapes

A benchmark, not a test: it asserts nothing about speed. It does record each provider's error against
cuDNN's output and gradients, so a fast wrong answer cannot look good.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from bench.bench_kernels import Shape as KernelShape  # the layer fields; the GPU run adds input_grad

CUDNN = "cuDNN"
BATCH = 32
GOAL_GEOMEAN, GOAL_WORST = 1.25, 2.0


@dataclass(frozen=True)
class Shape(KernelShape):
    input_grad: bool = True  # the stem's input is the image: training never asks for its gradient

    def tiny(self) -> Shape:
        """The same layer kind at a size the Triton interpreter runs in seconds (for --dry-run)."""
        in_channels = min(self.in_channels, 8)
        out_channels = in_channels if self.groups > 1 else min(self.out_channels, 16)
        groups = in_channels if self.groups > 1 else 1
        return Shape(self.name, in_channels, out_channels, 4 + self.kernel, self.kernel, self.stride, self.padding, groups, self.input_grad)


SHAPES = (
    Shape("stem 3->64 7x7 s2 @224", 3, 64, 224, 7, 2, 3, input_grad=False),
    Shape("64->64 3x3 @56", 64, 64, 56, 3, 1, 1),
    Shape("64->256 1x1 @56", 64, 256, 56, 1),
    Shape("128->128 3x3 s2 @56", 128, 128, 56, 3, 2, 1),
    Shape("256->256 3x3 @14", 256, 256, 14, 3, 1, 1),
    Shape("512->512 3x3 @7", 512, 512, 7, 3, 1, 1),
    Shape("dw 256 3x3 @14", 256, 256, 14, 3, 1, 1, groups=256),
)


@dataclass(frozen=True)
class Mode:
    """A dtype and the TF32 setting both sides run under."""

    label: str
    dtype: torch.dtype
    tf32: bool


def _modes(fp32: str, dry_run: bool) -> list[Mode]:
    if dry_run:
        return [Mode("float32", torch.float32, False)]  # the interpreter has no bfloat16 tl.dot
    modes = [Mode("bfloat16", torch.bfloat16, False)]
    if fp32 in ("tf32", "both"):
        modes.append(Mode("float32 (TF32)", torch.float32, True))
    if fp32 in ("ieee", "both"):
        modes.append(Mode("float32 (IEEE)", torch.float32, False))
    return modes


class Clock:
    """CUDA events on a GPU (what the device spent, including any launch gaps), perf_counter on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def time(self, step: Callable[[], None], inner: int) -> float:
        """Seconds per call of `step`, over `inner` back-to-back calls."""
        if not self.cuda:
            start = time.perf_counter()
            for _ in range(inner):
                step()
            return (time.perf_counter() - start) / inner
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / inner


def conv_of(provider: str, shape: Shape) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    import kernels

    args = (None, shape.stride, shape.padding, 1, shape.groups)
    if provider == CUDNN:
        return lambda x, w: F.conv2d(x, w, *args)
    return lambda x, w: kernels.conv2d(x, w, *args, algorithm=provider)


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).abs().max() / expected.float().abs().max().clamp_min(1e-30)).item()


def inputs(shape: Shape, mode: Mode, device: torch.device, batch: int, generator: torch.Generator):
    """(x, w) channels_last in the mode's dtype, and their requires-grad copies with the leaves to differentiate.

    Sets the mode's TF32 flags for both sides."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = mode.tf32
    x = torch.randn(batch, shape.in_channels, shape.size, shape.size, generator=generator)
    w = torch.randn(shape.out_channels, shape.in_channels // shape.groups, shape.kernel, shape.kernel, generator=generator)
    w = w / math.sqrt(w[0].numel())
    x = x.to(device, mode.dtype).contiguous(memory_format=torch.channels_last)
    w = w.to(device, mode.dtype).contiguous(memory_format=torch.channels_last)
    x_grad, w_grad = x.clone().requires_grad_(shape.input_grad), w.clone().requires_grad_()
    leaves = [x_grad, w_grad] if shape.input_grad else [w_grad]
    return x, w, x_grad, w_grad, leaves


def steps_of(conv, x, w, x_grad, w_grad, leaves, grad_output) -> dict[str, Callable[[], None]]:
    """{"fwd": one no-grad forward, "fwd_bwd": one forward and the gradients of `leaves`}: what is timed."""

    def forward() -> None:
        with torch.no_grad():
            conv(x, w)

    def forward_backward() -> None:
        torch.autograd.grad(conv(x_grad, w_grad), leaves, grad_output)

    return {"fwd": forward, "fwd_bwd": forward_backward}


def capture(step: Callable[[], object]) -> tuple[torch.cuda.CUDAGraph, object]:
    """(graph, what the captured call returned): `step` captured once into a CUDA graph, after a warm-up
    on a side stream, as torch's docs ask. Each replay rewrites the returned tensors in place."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    return graph, captured


def graphed(step: Callable[[], None]) -> Callable[[], None]:
    """The replay of `step` captured into a CUDA graph (`capture`).

    What a user who captures a training step gets: the kernels without the Python and launch cost
    of issuing them, so ours / cuDNN then compares the GPU work alone."""
    return capture(step)[0].replay


def bench_shape(shape: Shape, mode: Mode, providers: list[str], device: torch.device, batch: int, reps: int, graphs: bool = False) -> dict:
    """{provider: {"fwd": s, "fwd_bwd": s, "error": max relative error vs cuDNN}} for one shape and mode.

    graphs: time replays of each call captured in a CUDA graph instead of the calls themselves."""
    generator = torch.Generator().manual_seed(0)
    x, w, x_grad, w_grad, leaves = inputs(shape, mode, device, batch, generator)
    clock = Clock(device)

    steps, results, reference, grad_output = {}, {}, None, None
    for provider in providers:
        conv = conv_of(provider, shape)
        try:
            output = conv(x_grad, w_grad)
            if grad_output is None:
                grad_output = (
                    torch.randn(output.shape, generator=generator).to(device, mode.dtype).contiguous(memory_format=torch.channels_last)
                )
            outcome = [output.detach(), *torch.autograd.grad(output, leaves, grad_output)]
            # Drop the checked call's graph now: while it lives, it keeps the leaves' AccumulateGrad
            # nodes (made on the default stream) alive, and a CUDA-graph capture of the step then fails
            # ("operation would make the legacy stream depend on a capturing blocking stream").
            del output
        except Exception as error:  # one provider failing (unsupported, out of memory, a bug) must not end the run
            if provider == CUDNN:
                raise
            print(f"  {provider} failed on {shape.name} {mode.label}: {type(error).__name__}: {error}", flush=True)
            continue
        if reference is None:
            reference = outcome
        results[provider] = {"error": max(_relative_error(a, e) for a, e in zip(outcome, reference))}

        steps[provider] = steps_of(conv, x, w, x_grad, w_grad, leaves, grad_output)
        if graphs and device.type == "cuda":
            try:
                steps[provider] = {kind: graphed(step) for kind, step in steps[provider].items()}
            except Exception as error:  # a provider that cannot be captured is reported, not fatal
                if provider == CUDNN:
                    raise
                print(f"  {provider} could not be captured on {shape.name} {mode.label}: {type(error).__name__}: {error}", flush=True)
                del steps[provider], results[provider]

    # Warm-up (autotuning, cudnn.benchmark, caches), then ~2 ms of calls per timed sample.
    inner = {}
    for provider, kinds in steps.items():
        for kind, step in kinds.items():
            for _ in range(2):
                step()
            inner[provider, kind] = max(1, min(50, round(2e-3 / max(clock.time(step, 1), 1e-7))))
    samples = {key: [] for key in inner}
    for _ in range(reps):
        for kind in ("fwd", "fwd_bwd"):
            for provider in steps:
                samples[provider, kind].append(clock.time(steps[provider][kind], inner[provider, kind]))
    for (provider, kind), values in samples.items():
        results[provider][kind] = statistics.median(values)
    return results


def geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def _environment(device: torch.device) -> str:
    import triton

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or 'unknown'}), Triton interpreter"
    return f"device: {name}; torch {torch.__version__}; triton {triton.__version__}; python {platform.python_version()}"


def render(report: dict) -> str:
    """The markdown table and summary lines (what goes to stdout and to the results file)."""
    ours = [p for p in report["providers"] if p != CUDNN]
    lines = [
        "# GPU check: triton vs cuDNN",
        "",
        *(
            ["**DRY RUN** (CPU, Triton interpreter, tiny shapes): checks the plumbing; the times mean nothing.", ""]
            if report["dry_run"]
            else []
        ),
        report["environment"],
        f"batch {report['batch']}, channels_last, no bias; median of {report['reps']} interleaved reps; times in ms; "
        "ratio = ours / cuDNN (lower is better); err = max |ours - cuDNN| / max |cuDNN| over output and gradients",
        "",
        "| shape | dtype | cuDNN fwd | cuDNN fwd+bwd | "
        + " | ".join(f"{p} fwd | {p} fwd+bwd | {p}/cuDNN fwd | {p}/cuDNN fwd+bwd | {p} err" for p in ours)
        + " |",
        "|---|---|---:|---:|" + "---:|" * (5 * len(ours)),
    ]
    for row in report["rows"]:
        base = row["results"][CUDNN]
        cells = [row["shape"], row["mode"], f"{base['fwd'] * 1e3:.3f}", f"{base['fwd_bwd'] * 1e3:.3f}"]
        for provider in ours:
            result = row["results"].get(provider)
            if result is None:
                cells += ["-"] * 5
                continue
            cells += [f"{result['fwd'] * 1e3:.3f}", f"{result['fwd_bwd'] * 1e3:.3f}"]
            cells += [f"{result['fwd'] / base['fwd']:.2f}x", f"{result['fwd_bwd'] / base['fwd_bwd']:.2f}x", f"{result['error']:.1e}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for provider in ours:
        for mode in [*report["modes"], "all"]:
            rows = [r for r in report["rows"] if provider in r["results"] and mode in (r["mode"], "all")]
            if not rows:
                continue
            ratios = {kind: [r["results"][provider][kind] / r["results"][CUDNN][kind] for r in rows] for kind in ("fwd", "fwd_bwd")}
            worst = max(rows, key=lambda r: r["results"][provider]["fwd_bwd"] / r["results"][CUDNN]["fwd_bwd"])
            lines.append(
                f"- {provider} / cuDNN, {mode} ({len(rows)} shapes): geomean fwd {geomean(ratios['fwd']):.2f}x, "
                f"fwd+bwd {geomean(ratios['fwd_bwd']):.2f}x; worst fwd+bwd {max(ratios['fwd_bwd']):.2f}x ({worst['shape']}, {worst['mode']})"
            )
    if "triton" in ours and report["rows"]:
        for mode in report["modes"]:
            rows = [r for r in report["rows"] if r["mode"] == mode and "triton" in r["results"]]
            ratios = [r["results"]["triton"]["fwd_bwd"] / r["results"][CUDNN]["fwd_bwd"] for r in rows]
            if ratios:
                met = geomean(ratios) <= GOAL_GEOMEAN and max(ratios) <= GOAL_WORST
                lines.append(
                    f"- goal (fwd+bwd geomean <= {GOAL_GEOMEAN}x, every shape <= {GOAL_WORST}x), {mode}: {'MET' if met else 'NOT MET'}"
                )
    lines += [f"- skipped (time budget): {', '.join(report['skipped'])}"] if report["skipped"] else []
    return "\n".join(lines) + "\n"


def _report(environment, dry_run, batch, reps, providers, modes, rows, skipped, started) -> dict:
    return {
        "environment": environment,
        "dry_run": dry_run,
        "batch": batch,
        "reps": reps,
        "providers": providers,
        "modes": [m.label for m in modes],
        "rows": rows,
        "skipped": skipped,
        "seconds": time.monotonic() - started,
    }


def write_results(text: str, results: str, report: dict | None = None) -> None:
    """The table to `results` and to $OUT/ when set (rewritten after every shape, so a killed run keeps its rows)."""
    targets = [results] + ([os.path.join(os.environ["OUT"], os.path.basename(results))] if os.environ.get("OUT") else [])
    for target in targets:
        os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
        with open(target, "w") as out:
            out.write(text)
        if report is not None:
            with open(os.path.splitext(target)[0] + ".json", "w") as out:
                json.dump(report, out, indent=2)
            print(f"wrote {target}", file=sys.stderr)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", default="results/gpu_check.md", help="markdown results file (a .json beside it gets the raw numbers)")
    parser.add_argument("--fp32", choices=("tf32", "ieee", "both", "none"), default="tf32", help="float32 modes to run besides bfloat16")
    parser.add_argument("--providers", default="triton,im2col", help="our algorithms to compare with cuDNN (comma-separated)")
    parser.add_argument("--reps", type=int, default=15, help="timed repetitions per provider (median reported)")
    parser.add_argument("--budget", type=float, default=240.0, help="seconds after which no new shape is started")
    parser.add_argument("--dry-run", action="store_true", help="CPU plumbing check: tiny shapes, batch 2, 1 rep, Triton interpreter")
    parser.add_argument("--graphs", action="store_true", help="time CUDA-graph replays of each call (the GPU work without host cost)")
    args = parser.parse_args(argv)

    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of kernels / triton kernels
    elif not torch.cuda.is_available():
        parser.error("no CUDA device: run with --dry-run (TRITON_INTERPRET=1) to check the plumbing on CPU")
    import kernels

    device = torch.device("cpu" if args.dry_run else "cuda")
    shapes = [shape.tiny() for shape in SHAPES] if args.dry_run else list(SHAPES)
    batch, reps = (2, 1) if args.dry_run else (BATCH, args.reps)
    ours = [p.strip() for p in args.providers.split(",") if p.strip()]
    unknown = [p for p in ours if p not in kernels.names()]
    if unknown:
        parser.error(f"unknown providers {unknown}; valid: {kernels.names()}")
    providers = [CUDNN, *ours]
    modes = _modes(args.fp32, args.dry_run)
    torch.backends.cudnn.benchmark = True
    environment = _environment(device)
    if args.graphs and not args.dry_run:
        environment += "; CUDA graphs: every call captured once and replayed (kernels only, no host cost)"
    print(environment, flush=True)

    started, rows, skipped = time.monotonic(), [], []
    for mode in modes:
        for shape in shapes:
            if time.monotonic() - started > args.budget:
                skipped.append(f"{shape.name} {mode.label}")
                continue
            results = bench_shape(shape, mode, providers, device, batch, reps, graphs=args.graphs)
            rows.append({"shape": shape.name, "mode": mode.label, "spec": asdict(shape), "results": results})
            write_results(render(_report(environment, args.dry_run, batch, reps, providers, modes, rows, skipped, started)), args.results)
            base = results[CUDNN]
            summary = ", ".join(
                f"{p} {results[p]['fwd_bwd'] / base['fwd_bwd']:.2f}x (err {results[p]['error']:.1e})" for p in providers[1:] if p in results
            )
            print(f"[{time.monotonic() - started:6.1f}s] {shape.name:<24} {mode.label:<15} fwd+bwd vs cuDNN: {summary}", flush=True)

    report = _report(environment, args.dry_run, batch, reps, providers, modes, rows, skipped, started)
    text = render(report)
    print(text)
    write_results(text, args.results, report)
    return report


if __name__ == "__main__":
    main()
