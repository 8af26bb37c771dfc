"""Where one conv's time goes on a GPU: host (Python, autograd, launches) against device kernels.

For each ResNet-50 shape of bench/bench_gpu.py and each provider, after a warm-up (autotuning,
cudnn.benchmark): the host time of issuing one call (perf_counter around back-to-back calls, no sync
inside, so it is what the CPU spends while the GPU keeps up), the device time of its kernels (sum of
the CUDA kernel durations torch.profiler records, per call), and its heaviest kernels. A call whose
host time exceeds its device time is launch-bound: there the GPU idles and only less Python helps.

    PYTHONPATH=. python3 -m bench.gpu_profile --results results/gpu_profile.md
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from bench.bench_gpu import BATCH, CUDNN, SHAPES, Mode, conv_of, inputs, steps_of, write_results


def host_seconds(step, calls: int, reps: int) -> float:
    """Median over `reps` of the CPU time per call of `calls` back-to-back calls (queue drained between)."""
    samples = []
    for _ in range(reps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            step()
        samples.append((time.perf_counter() - start) / calls)
    torch.cuda.synchronize()
    return statistics.median(samples)


def device_profile(step, calls: int) -> tuple[float, list[tuple[str, float]]]:
    """(kernel seconds per call, [(kernel name, seconds per call)] heaviest first) from torch.profiler."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            step()
        torch.cuda.synchronize()
    kernels = [(event.key, event.self_device_time_total / 1e6 / calls) for event in prof.key_averages() if event.self_device_time_total > 0]
    kernels.sort(key=lambda item: -item[1])
    return sum(seconds for _, seconds in kernels), kernels


def profile_shape(shape, mode: Mode, providers: list[str], batch: int, calls: int, reps: int) -> dict:
    device = torch.device("cuda")
    x, w, x_grad, w_grad, leaves = inputs(shape, mode, device, batch, torch.Generator().manual_seed(0))
    results = {}
    for provider in providers:
        conv = conv_of(provider, shape)
        try:
            steps = steps_of(conv, x, w, x_grad, w_grad, leaves, torch.randn_like(conv(x_grad, w_grad)))
            for _ in range(3):
                for step in steps.values():
                    step()
        except Exception as error:  # report and go on: the other providers' figures still count
            print(f"  {provider} failed on {shape.name} {mode.label}: {type(error).__name__}: {error}", flush=True)
            continue
        entry = {}
        for kind, step in steps.items():
            device_time, kernels = device_profile(step, calls)
            entry[kind] = {"host": host_seconds(step, calls, reps), "device": device_time, "kernels": kernels[:6]}
        results[provider] = entry
    return results


def render(rows: list[dict], environment: str) -> str:
    lines = [
        "# GPU profile: host time per call vs device kernel time per call",
        "",
        environment,
        "",
        "| shape | dtype | provider | fwd host us | fwd device us | fwd+bwd host us | fwd+bwd device us | heaviest fwd+bwd kernels (us) |",
        "|---|---|---|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        for provider, entry in row["results"].items():
            top = "; ".join(f"{name[:48]} {seconds * 1e6:.1f}" for name, seconds in entry["fwd_bwd"]["kernels"][:4])
            lines.append(
                f"| {row['shape']} | {row['mode']} | {provider} | {entry['fwd']['host'] * 1e6:.1f} | {entry['fwd']['device'] * 1e6:.1f} | "
                f"{entry['fwd_bwd']['host'] * 1e6:.1f} | {entry['fwd_bwd']['device'] * 1e6:.1f} | {top} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", default="results/gpu_profile.md")
    parser.add_argument("--providers", default="triton", help="ours to profile beside cuDNN (comma-separated)")
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--budget", type=float, default=120.0, help="seconds after which no new shape is started")
    args = parser.parse_args(argv)
    import triton

    torch.backends.cudnn.benchmark = True
    environment = f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}; triton {triton.__version__}; batch {BATCH}"
    providers = [CUDNN, *[p.strip() for p in args.providers.split(",") if p.strip()]]
    modes = [Mode("bfloat16", torch.bfloat16, False), Mode("float32 (TF32)", torch.float32, True)]
    started, rows = time.monotonic(), []
    for mode in modes:
        for shape in SHAPES:
            if time.monotonic() - started > args.budget:
                print(f"skipped (budget): {shape.name} {mode.label}", flush=True)
                continue
            results = profile_shape(shape, mode, providers, BATCH, args.calls, args.reps)
            rows.append({"shape": shape.name, "mode": mode.label, "results": results})
            print(
                f"[{time.monotonic() - started:6.1f}s] {shape.name} {mode.label}: "
                + ", ".join(
                    f"{p} host {r['fwd_bwd']['host'] * 1e6:.0f} / device {r['fwd_bwd']['device'] * 1e6:.0f} us" for p, r in results.items()
                ),
                flush=True,
            )
            write_results(render(rows, environment), args.results, {"environment": environment, "rows": rows})
    print(render(rows, environment))


if __name__ == "__main__":
    main()
