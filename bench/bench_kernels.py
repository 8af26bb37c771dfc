"""CPU benchmark: our algorithms against nn.Conv2d (oneDNN) on ResNet-style shapes, forward and forward+backward.

Providers are measured interleaved in one process (each repetition runs every provider once, in turn),
after a warm-up, so drift in clock speed or background load hits all of them alike; we report medians
and the ratio ours / nn.Conv2d per shape, plus geometric means over the shapes.

    .venv/bin/python -m bench.bench_kernels                       # all shapes, default reps
    .venv/bin/python -m bench.bench_kernels --shapes stem,dw --reps 15 --json /tmp/bench.json
    .venv-peers/bin/python -m bench.bench_kernels --providers auto --plot docs/img/kernels_ratio.png  # needs matplotlib

A benchmark, not a test: it asserts nothing about speed. It does check each provider's output once
against nn.Conv2d so a fast wrong answer cannot look good.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

import kernels
from app.memory import keep_freed_memory
from kernels import compiled, gemm

BATCH = 4


@dataclass(frozen=True)
class Shape:
    name: str
    in_channels: int
    out_channels: int
    size: int
    kernel: int
    stride: int = 1
    padding: int = 0
    groups: int = 1


SHAPES = {
    shape.name: shape
    for shape in (
        Shape("64x56 3x3 s1", 64, 64, 56, 3, 1, 1),
        Shape("128x28 3x3 s1", 128, 128, 28, 3, 1, 1),
        Shape("128x28 3x3 s2", 128, 128, 28, 3, 2, 1),
        Shape("256x14 3x3 s1", 256, 256, 14, 3, 1, 1),
        Shape("stem 3x112 7x7 s2", 3, 64, 112, 7, 2, 3),
        Shape("1x1 256->64 56", 256, 64, 56, 1),
        Shape("dw 96x28 3x3", 96, 96, 28, 3, 1, 1, groups=96),
    )
}
# Short aliases for --shapes.
ALIASES = {"64": "64x56 3x3 s1", "128": "128x28 3x3 s1", "128s2": "128x28 3x3 s2", "256": "256x14 3x3 s1"}
ALIASES |= {"stem": "stem 3x112 7x7 s2", "1x1": "1x1 256->64 56", "dw": "dw 96x28 3x3"}

TORCH = "nn.Conv2d"


def machine() -> dict:
    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": model,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "mkldnn": torch.backends.mkldnn.is_available(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "gemm": gemm.backend(),  # what "auto" measured on this CPU (kernels/gemm.py)
    }


def providers() -> list[str]:
    """nn.Conv2d first, then every CPU algorithm except the (deliberately slow) reference."""
    ours = [name for name in kernels.names() if name != "reference" and "cpu" in _devices(name)]
    return [TORCH, *ours]


def _devices(name: str) -> list[str]:
    return ["cpu"] if name == "auto" else kernels.algorithms()[name]["devices"]


def _conv(provider: str, shape: Shape) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """provider: nn.Conv2d, one of our algorithms, or ALGORITHM@BACKEND with a GEMM backend (kernels/gemm.py)."""
    args = (None, shape.stride, shape.padding, 1, shape.groups)
    if provider == TORCH:
        return lambda x, w: F.conv2d(x, w, *args)
    algorithm, _, backend = provider.partition("@")
    if not backend:
        return lambda x, w: kernels.conv2d(x, w, *args, algorithm=algorithm)

    def conv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        with gemm.using(backend):
            return kernels.conv2d(x, w, *args, algorithm=algorithm)

    return conv


# wall: what a user waits. cpu: this process's CPU time, all threads; on a machine shared with other
# jobs it is far less noisy than wall time, and with --threads 1 it approximates the uncontended time.
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = CLOCKS["wall"]


def _timed(step: Callable[[], None], inner: int) -> float:
    start = _clock()
    for _ in range(inner):
        step()
    return (_clock() - start) / inner


def bench_shape(shape: Shape, names: list[str], reps: int, channels_last: bool, batch: int = BATCH) -> dict:
    """{provider: {"fwd": median s, "fwd_bwd": median s}} for one shape, providers interleaved.

    Providers that refuse the shape (UnsupportedProblem) are left out of the result.
    """
    torch.manual_seed(0)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch, shape.in_channels, shape.size, shape.size).contiguous(memory_format=memory_format)
    w = torch.randn(shape.out_channels, shape.in_channels // shape.groups, shape.kernel, shape.kernel) * 0.1
    x_grad, w_grad = x.clone().requires_grad_(), w.clone().requires_grad_()
    expected = F.conv2d(x, w, None, shape.stride, shape.padding, 1, shape.groups)
    grad_output = torch.randn_like(expected)

    steps = {}
    for name in names:
        conv = _conv(name, shape)
        try:
            output = conv(x, w)
        except kernels.UnsupportedProblem:
            continue  # a specialised algorithm (e.g. "pointwise") refuses this shape; reported as "-"
        torch.testing.assert_close(output, expected, atol=1e-3, rtol=1e-3, msg=lambda m, name=name: f"{name} on {shape.name}: {m}")

        def forward(conv=conv) -> None:
            with torch.no_grad():
                conv(x, w)

        def forward_backward(conv=conv) -> None:
            x_grad.grad = w_grad.grad = None
            conv(x_grad, w_grad).backward(grad_output)

        steps[name] = {"fwd": forward, "fwd_bwd": forward_backward}

    names = list(steps)
    # Warm-up, and pick an inner loop count so each timed sample lasts ~20 ms (less timer noise).
    inner = {}
    for name in names:
        for kind, step in steps[name].items():
            step()
            inner[name, kind] = max(1, round(0.02 / max(_timed(step, 1), 1e-6)))
    samples = {(name, kind): [] for name in names for kind in ("fwd", "fwd_bwd")}
    for _ in range(reps):
        for kind in ("fwd", "fwd_bwd"):
            for name in names:
                samples[name, kind].append(_timed(steps[name][kind], inner[name, kind]))
    return {name: {kind: statistics.median(samples[name, kind]) for kind in ("fwd", "fwd_bwd")} for name in names}


def _cell(ratio: dict | None) -> str:
    return f"{'-':>13} {'-':>8}" if ratio is None else f"{ratio['fwd']:>12.2f}x {ratio['fwd_bwd']:>7.2f}x"


def geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def plot(report: dict, path: str, provider: str) -> None:
    """Bar chart of provider / nn.Conv2d per shape (forward and forward+backward) with a line at 1.0, saved as a PNG.

    matplotlib is imported here, not at module level: the project's own environment does not ship it.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as missing:
        raise SystemExit(f"--plot needs matplotlib ({missing}); run with an environment that has it, e.g. .venv-peers/bin/python") from None
    shapes = [name for name, result in report["shapes"].items() if provider in result["ratio"]]
    if not shapes:
        raise SystemExit(f"--plot: provider {provider!r} ran on none of the shapes")
    positions = range(len(shapes))
    figure, axes = plt.subplots(figsize=(max(6.0, 1.3 * len(shapes)), 4.2))
    for offset, kind, label in ((-0.2, "fwd", "forward"), (0.2, "fwd_bwd", "forward+backward")):
        ratios = [report["shapes"][name]["ratio"][provider][kind] for name in shapes]
        bars = axes.bar([x + offset for x in positions], ratios, width=0.4, label=label)
        axes.bar_label(bars, fmt="%.2f", fontsize=7)
    axes.axhline(1.0, color="black", linewidth=0.8)
    axes.set_xticks(list(positions), shapes, rotation=20, ha="right", fontsize=8)
    axes.set_ylabel(f"{provider} time / nn.Conv2d time")
    info = report["machine"]
    axes.set_title(
        f"{provider} vs nn.Conv2d (oneDNN), batch {report['batch']}, {info['threads']} thread(s), {report['clock']} clock, "
        f"median of {report['reps']}",
        fontsize=9,
    )
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="all", help=f"comma-separated shape names or aliases {sorted(ALIASES)}; default all")
    parser.add_argument("--reps", type=int, default=9, help="timed repetitions per provider (median reported)")
    parser.add_argument(
        "--providers",
        default="all",
        help=f"comma-separated subset of {providers()}, each optionally NAME@onednn or NAME@torch (a GEMM backend); nn.Conv2d always runs",
    )
    parser.add_argument("--channels-last", action="store_true", help="feed channels_last input (default NCHW contiguous)")
    parser.add_argument("--batch", type=int, default=BATCH, help=f"images per call (default {BATCH}; the service's usual request is 1)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads before measuring (default: torch's choice)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall", help="wall time, or process CPU time (for a busy machine)")
    parser.add_argument(
        "--malloc",
        choices=("reuse", "default"),
        default="reuse",
        help="reuse: glibc keeps freed blocks, as the service runs (CONV_MALLOC_REUSE, app/memory.py); default: glibc's own",
    )
    parser.add_argument(
        "--compile",
        choices=("sync", "off"),
        default="sync",
        help="sync: compile where a kernel can (kernels/compiled.py) during the warm-up, so the timed reps see the steady state; off: eager paths only",
    )
    parser.add_argument("--json", help="write the raw medians and ratios to this file")
    parser.add_argument("--plot", help="draw the ratio per shape to this PNG (needs matplotlib; imported only then)")
    parser.add_argument("--plot-provider", default="auto", help="which of our providers --plot draws (default auto)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    # With glibc's defaults every output-sized allocation is fresh pages (~3 us a page fault on the
    # benchmark VM), and how often depends on the process's allocation history, so the same conv
    # timed 0.25 or 2.4 ms depending on what ran before it. The service keeps freed blocks.
    if args.malloc == "reuse" and not keep_freed_memory():
        print("note: --malloc reuse needs glibc; measuring with the C library's defaults")
    global _clock
    _clock = CLOCKS[args.clock]
    compiled.set_mode(args.compile)

    chosen = list(SHAPES) if args.shapes == "all" else [ALIASES.get(s.strip(), s.strip()) for s in args.shapes.split(",")]
    unknown = [s for s in chosen if s not in SHAPES]
    if unknown:
        parser.error(f"unknown shapes {unknown}; valid: {list(SHAPES)} or aliases {sorted(ALIASES)}")
    names = providers() if args.providers == "all" else [TORCH, *[p for p in args.providers.split(",") if p != TORCH]]

    info = machine()
    layout = "channels_last" if args.channels_last else "NCHW"
    print(
        f"machine: {info['cpu']}, {info['threads']} threads, torch {info['torch']} ({info['cpu_capability']}, mkldnn={info['mkldnn']}); "
        f"GEMMs: {info['gemm']}"
    )
    print(
        f"batch {args.batch}, float32, {layout} input, no bias, grads for input and weight; {args.clock} clock, median of {args.reps} interleaved reps; "
        f"malloc {args.malloc}; compile {args.compile}"
    )
    ours = [n for n in names if n != TORCH]
    header = f"{'shape':<20} {'nn.Conv2d fwd / fwd+bwd':>24} | " + " | ".join(f"{n + ' fwd  fwd+bwd':>22}" for n in ours)
    print(header)
    print("-" * len(header))

    results = {}
    for shape_name in chosen:
        timings = bench_shape(SHAPES[shape_name], names, args.reps, args.channels_last, args.batch)
        base = timings[TORCH]
        ratios = {n: {k: timings[n][k] / base[k] for k in base} for n in ours if n in timings}
        results[shape_name] = {"shape": asdict(SHAPES[shape_name]), "seconds": timings, "ratio": ratios}
        cells = " | ".join(_cell(ratios.get(n)) for n in ours)
        print(f"{shape_name:<20} {base['fwd'] * 1e3:>11.2f} / {base['fwd_bwd'] * 1e3:>6.2f} ms | {cells}", flush=True)

    means, worst = {}, {}
    for n in ours:
        ran = [results[s]["ratio"][n] for s in chosen if n in results[s]["ratio"]]
        means[n] = {k: geomean([r[k] for r in ran]) for k in ("fwd", "fwd_bwd")} if ran else None
        worst[n] = {k: max(r[k] for r in ran) for k in ("fwd", "fwd_bwd")} if ran else None
    print("-" * len(header))
    print(f"{'geomean ours/torch (shapes run)':<44} | " + " | ".join(_cell(means[n]) for n in ours))
    print(f"{'worst shape':<44} | " + " | ".join(_cell(worst[n]) for n in ours))
    compile_stats = compiled.stats()
    print(f"compiled kernels: {compile_stats['compiled']}, calls {compile_stats['calls']}, failed: {compile_stats['failed']}")
    report = {
        "machine": info,
        "batch": args.batch,
        "layout": layout,
        "clock": args.clock,
        "malloc": args.malloc,
        "compile": compile_stats,
        "reps": args.reps,
        "shapes": results,
        "geomean": means,
        "worst": worst,
    }
    if args.json:
        with open(args.json, "w") as out:
            json.dump(report, out, indent=2)
    if args.plot:
        plot(report, args.plot, args.plot_provider)
    return report


if __name__ == "__main__":
    main()
