"""Service benchmark: our server against LitServe and KServe serving the same kernels.conv2d, driven by wrk.

Each server runs on 127.0.0.1, one at a time, and gets the same load from wrk (a separate process, one
thread, a pre-built body per request): a fixed duration at concurrency 1 and 16 for every workload and
encoding. Every variant's answer is checked against F.conv2d once before it is timed, so a fast wrong
answer cannot look good. For our server it also reads the server's own timing_ms (decode, queue, compute,
encode, total) and measures the pure compute in-process, so the serving overhead is visible.

    bash bench/setup_peers.sh                                   # peers venv (.venv-peers) and wrk, once
    .venv-peers/bin/python -m bench.serve_compare --nice -15 --json results/serve_compare.json --markdown results/serve_compare.md --plots docs/img
    .venv-peers/bin/python -m bench.serve_compare --workloads seed --servers ours,litserve-2w --duration 3

Slow variants (seconds per request) get longer runs, up to --max-duration, so about --min-requests
complete; a c=16 run that would need more than twice that is skipped and shown as "skipped".

Ratios are ours / peer: for req/s above 1 means we serve more, for p50 below 1 means we answer sooner.
A peer is compared with our variant of the same kind (text lists, or binary/base64), parity off.
A benchmark, not a test: it asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import psutil
import torch
import torch.nn.functional as F

import kernels
from app.memory import keep_freed_memory
from bench.peers import formats
from kernels import compiled

REPO = Path(__file__).resolve().parent.parent
LUA = REPO / "bench" / "wrk" / "post_body.lua"
CONCURRENCY = (1, 16)
# Run on the seed case only: fastapi-noop computes nothing, the ceiling for any FastAPI app here;
# ours-1thread (OMP_NUM_THREADS=1) and ours-2proc (2 uvicorn workers, 1 thread each) are diagnostics
# for what the profile suggests, run on the same app code.
SERVERS = ["ours", "litserve", "litserve-2w", "kserve", "fastapi-noop", "ours-1thread", "ours-2proc"]


@dataclass(frozen=True)
class Workload:
    name: str
    input: tuple[int, ...]
    weight: tuple[int, ...]
    padding: int = 1


WORKLOADS = {
    "seed": Workload("seed 2x1x3x3", (2, 1, 3, 3), (2, 1, 3, 3)),
    "1x64": Workload("1x64x56x56", (1, 64, 56, 56), (64, 64, 3, 3)),
    "8x64": Workload("8x64x56x56", (8, 64, 56, 56), (64, 64, 3, 3)),
}


@dataclass(frozen=True)
class Server:
    name: str
    command: list[str]
    ready_path: str
    env: dict[str, str]


def servers(args: argparse.Namespace) -> dict[str, Server]:
    peers = [args.peers_python, "-m"]

    def ours(name: str, **env: str) -> Server:
        """`python -m app` on the CPU, quiet logs, plus `env`."""
        base = {"CONV_HOST": "127.0.0.1", "CONV_PORT": str(args.port), "CONV_LOG_LEVEL": "warning", "CONV_DEVICE": "cpu"}
        return Server(name, [args.ours_python, "-m", "app"], "/readyz", base | env)

    return {
        "ours": ours("ours"),
        "litserve": Server(
            "litserve",
            [*peers, "bench.peers.litserve_server", "--port", str(args.port), "--algorithm", args.algorithm]
            + ["--workers-per-device", str(args.litserve_workers), "--api-servers", str(args.litserve_api_servers)]
            + (["--fast-queue"] if args.litserve_fast_queue else []),
            "/health",
            {},
        ),
        # Diagnostic: the same app with one intra-op thread (the profile shows tiny convs losing to thread wake-ups).
        "ours-1thread": ours("ours-1thread", OMP_NUM_THREADS="1"),
        # Our scale-out form on one host: CONV_PROCESSES=2 (2 uvicorn worker processes, 1 torch thread each).
        "ours-2proc": ours("ours-2proc", CONV_PROCESSES="2"),
        "fastapi-noop": Server(
            "fastapi-noop",
            [args.ours_python, "-m", "bench.peers.noop_server", "--port", str(args.port)],
            "/readyz",
            {},
        ),
        # LitServe's scale-out form: 2 inference workers (1 intra-op thread each) behind 2 API server processes.
        "litserve-2w": Server(
            "litserve-2w",
            [*peers, "bench.peers.litserve_server", "--port", str(args.port), "--algorithm", args.algorithm]
            + ["--workers-per-device", "2", "--api-servers", "2"],
            "/health",
            {},
        ),
        "kserve": Server(
            "kserve",
            [
                *peers,
                "bench.peers.kserve_server",
                "--port",
                str(args.port),
                "--algorithm",
                args.algorithm,
                "--workers",
                str(args.kserve_workers),
            ],
            "/v2/models/conv2d/ready",
            {},
        ),
    }


def variants(server: str, workload: str) -> list[formats.Variant]:
    if server == "ours":
        # Parity on only where a goal asks for it (the seed case): it adds F.conv2d's time to every request.
        if workload == "seed":
            return [formats.ours("list"), formats.ours("base64"), formats.ours("list", parity=True)]
        return [formats.ours("list"), formats.ours("base64"), formats.ours_v2_binary()]
    if server in ("litserve", "litserve-2w"):
        return [formats.litserve("list", server=server), formats.litserve("base64", server=server)]
    if server == "fastapi-noop":
        return [formats.noop()] if workload == "seed" else []
    if server == "ours-1thread":
        return [formats.ours("list", parity=True, server=server)] if workload == "seed" else []
    if server == "ours-2proc":
        if workload == "seed":
            return [formats.ours("list", parity=True, server=server), formats.ours("base64", server=server)]
        return [formats.ours_v2_binary(server=server)]
    return [formats.kserve(binary=False), formats.kserve(binary=True)]


def make_tensors(workload: Workload) -> dict[str, np.ndarray]:
    generator = torch.Generator().manual_seed(0)
    return {
        "input": torch.randn(workload.input, generator=generator).numpy(),
        "weight": (torch.randn(workload.weight, generator=generator) * 0.1).numpy(),
        "bias": torch.randn(workload.weight[0], generator=generator).numpy(),
    }


def pure_compute_ms(workload: Workload, algorithm: str, reps: int) -> float:
    """Median of kernels.conv2d in this process, on the tensors the servers get, with the servers' thread count
    and malloc settings (`measure` calls keep_freed_memory, as our server does by default). Compiled kernels
    (kernels/compiled.py) are compiled during the warm-up, as the servers have theirs by the time they are
    measured: in the default background mode the timed calls would run eager beside the compile thread."""
    tensors = {name: torch.from_numpy(value) for name, value in make_tensors(workload).items()}
    times = []
    with torch.no_grad(), compiled.mode("sync"):
        for rep in range(reps + 2):
            start = time.perf_counter()
            kernels.conv2d(tensors["input"], tensors["weight"], tensors["bias"], padding=workload.padding, algorithm=algorithm)
            if rep >= 2:  # the first two are warm-up
                times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


# --- servers -----------------------------------------------------------------------------------------


AUTOGROUP = Path("/proc/self/autogroup")


def prioritize(nice: int) -> int | None:
    """This process, and the servers and wrk it starts (they inherit it), at `nice`; -> the autogroup's old niceness.

    With the kernel's autogroup scheduling, CPU is shared between sessions before niceness counts,
    so the session's autogroup gets the same niceness; the servers stay in this session for that.
    """
    os.setpriority(os.PRIO_PROCESS, 0, nice)
    if not AUTOGROUP.exists():
        return None
    old = int(AUTOGROUP.read_text().split()[-1])  # "/autogroup-7 nice 0"
    AUTOGROUP.write_text(str(nice))
    return old


def start(server: Server, port: int, log_dir: Path, timeout_s: float = 120) -> subprocess.Popen:
    log = open(log_dir / f"{server.name}.log", "wb")  # noqa: SIM115 - lives as long as the server
    process = subprocess.Popen(
        server.command, cwd=REPO, env={**os.environ, **server.env}, stdout=log, stderr=subprocess.STDOUT, process_group=0
    )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{server.name} exited with {process.returncode}; see {log_dir / (server.name + '.log')}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}{server.ready_path}", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop(process)
    raise RuntimeError(f"{server.name} was not ready within {timeout_s:.0f} s; see {log_dir / (server.name + '.log')}")


def stop(process: subprocess.Popen) -> None:
    """SIGTERM to the server's own process group (it may have spawned workers), SIGKILL if it lingers."""
    for sig, wait_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def tree_cpu_seconds(process: subprocess.Popen) -> float:
    """CPU seconds used so far by the server and every process it spawned."""
    try:
        root = psutil.Process(process.pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for proc in tree:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has been busy, all processes."""
    times = psutil.cpu_times()
    return times.user + times.nice + times.system + times.irq + times.softirq + getattr(times, "steal", 0.0)


def wait_idle(process: subprocess.Popen, timeout_s: float = 180) -> None:
    """Wait until the server's processes use < 5% CPU: requests wrk left in flight must not bleed into the next run."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        before = tree_cpu_seconds(process)
        time.sleep(0.25)
        if tree_cpu_seconds(process) - before < 0.25 * 0.05:
            return
    print(f"  warning: the server was still busy {timeout_s:.0f} s after the run; the next figures may be pessimistic", flush=True)


def measured_run(process: subprocess.Popen, *wrk_args) -> dict:
    """run_wrk, plus how many cores the server, wrk and everything else on the machine kept busy meanwhile.

    "other_cores" is load that is neither the server nor wrk (other users of the machine): well above
    0.1 it means the run competed for the 2 cores and its figures are pessimistic.
    """
    server_before, busy_before, children_before = tree_cpu_seconds(process), busy_cpu_seconds(), os.times()
    start = time.perf_counter()
    stats = run_wrk(*wrk_args)
    wall = time.perf_counter() - start
    children_after = os.times()
    wrk_cpu = (children_after.children_user - children_before.children_user) + (
        children_after.children_system - children_before.children_system
    )
    server_cpu = tree_cpu_seconds(process) - server_before
    other = busy_cpu_seconds() - busy_before - server_cpu - wrk_cpu
    return stats | {"server_cores": server_cpu / wall, "wrk_cores": wrk_cpu / wall, "other_cores": max(0.0, other / wall)}


# --- one variant -------------------------------------------------------------------------------------


def check_answer(variant: formats.Variant, url: str, body: bytes, headers: dict, expected: np.ndarray) -> float:
    """One request; its output must match F.conv2d (unless the variant computes nothing). -> its seconds."""
    start = time.perf_counter()
    response = httpx.post(url, content=body, headers={"Content-Type": variant.content_type, **headers}, timeout=300)
    seconds = time.perf_counter() - start
    if response.status_code != 200:
        raise RuntimeError(f"{variant.label}: HTTP {response.status_code}: {response.text[:500]}")
    if variant.decode is not None:
        output = variant.decode(response.content, dict(response.headers))
        if output.shape != expected.shape or not np.allclose(output, expected, atol=1e-3, rtol=1e-3):
            raise RuntimeError(f"{variant.label}: wrong answer (shape {output.shape}, expected {expected.shape})")
    return seconds


def run_wrk(url: str, body_path: Path, variant: formats.Variant, headers: dict, connections: int, duration_s: int) -> dict:
    env = {
        **os.environ,
        "WRK_BODY": str(body_path),
        "WRK_CONTENT_TYPE": variant.content_type,
        "WRK_HEADERS": ";".join(f"{name}: {value}" for name, value in headers.items()),
    }
    command = ["wrk", "-t1", f"-c{connections}", f"-d{duration_s}s", "--timeout", "120s", "--latency", "-s", str(LUA), url]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=duration_s + 180)
    line = next((line for line in done.stdout.splitlines() if line.startswith("WRK_JSON ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr or done.stdout}")
    stats = json.loads(line.removeprefix("WRK_JSON "))
    errors = sum(stats[key] for key in ("connect_errors", "read_errors", "write_errors", "status_errors", "timeouts"))
    completed = stats["requests"] > 0
    return {
        "rps": stats["requests"] / (stats["duration_us"] / 1e6),
        "p50_ms": stats["p50_us"] / 1e3 if completed else None,
        "p99_ms": stats["p99_us"] / 1e3 if completed else None,
        "requests": stats["requests"],
        "errors": errors,
    }


def server_timing(variant: formats.Variant, url: str, body: bytes, headers: dict, samples: int, budget_s: float = 15) -> dict:
    """Medians of our server's timing_ms over sequential requests (up to `samples`, about `budget_s`), and the client's round trip."""
    fields: dict[str, list[float]] = {}
    deadline = time.monotonic() + budget_s
    with httpx.Client(timeout=300) as client:
        for index in range(samples):
            if index >= 3 and time.monotonic() > deadline:
                break
            start = time.perf_counter()
            response = client.post(url, content=body, headers={"Content-Type": variant.content_type, **headers})
            round_trip = (time.perf_counter() - start) * 1e3
            timing = (
                formats.v2_binary_timing(response.content, response.headers)
                if variant.encoding == "v2-binary"
                else response.json()["timing_ms"]
            )
            for name, value in {**timing, "client_round_trip": round_trip}.items():
                fields.setdefault(name, []).append(value)
    return {name: statistics.median(values) for name, values in fields.items()}


# --- the whole comparison ----------------------------------------------------------------------------


def duration_for(args: argparse.Namespace, request_s: float, connections: int) -> int | None:
    """--duration, stretched (up to --max-duration) so that about --min-requests complete for slow variants.

    The servers run one conv at a time, so at concurrency c the first answers come back after about c
    requests' time: (c + min_requests) requests' worth of time leaves min_requests after the ramp.
    None: that needs more than twice --max-duration (e.g. 16 clients of a 5 s request), so the run is
    skipped; it could not give figures in bounded time, and its backlog would take minutes to drain.
    """
    needed = (args.min_requests + (connections if connections > 1 else 0)) * request_s * 1.2
    if connections > 1 and needed > 2 * args.max_duration:
        return None
    return int(max(args.duration, min(args.max_duration, math.ceil(needed))))


def measure_variant(
    process: subprocess.Popen,
    variant: formats.Variant,
    key: str,
    body: bytes,
    headers: dict,
    request_s: float,
    args: argparse.Namespace,
    work_dir: Path,
) -> list[dict]:
    """Warm up, then --repeat wrk runs at each concurrency; -> one row per concurrency (the fastest run).

    `request_s`: one request's time from the answer check; the warm-up's p50 replaces it when it has one.
    """
    url = f"http://127.0.0.1:{args.port}{variant.path}"
    body_path = work_dir / f"{key}-{variant.server}-{variant.encoding}.body"
    body_path.write_bytes(body)
    warm = run_wrk(url, body_path, variant, headers, 1, args.warmup)
    wait_idle(process)
    request_s = warm["p50_ms"] / 1e3 if warm["p50_ms"] is not None else request_s
    rows = []
    for connections in CONCURRENCY:
        duration = duration_for(args, request_s, connections)
        row = {"workload": key, "server": variant.server, "encoding": variant.encoding, "kind": variant.kind, "parity": variant.parity}
        row |= {"c": connections, "body_bytes": len(body)}
        if duration is None:
            print(f"  {WORKLOADS[key].name:14} {variant.label:26} c={connections:<3} skipped: {request_s:.1f} s per request", flush=True)
            rows.append(row | {"skipped": True, "rps": 0.0, "p50_ms": None, "p99_ms": None, "requests": 0, "errors": 0})
            continue
        # Best of --repeat: the machine may be shared, and interference only ever slows a run down.
        runs = []
        for _ in range(args.repeat):
            runs.append(measured_run(process, url, body_path, variant, headers, connections, duration))
            wait_idle(process)
        stats = max(runs, key=lambda run: run["rps"]) | {"runs_rps": [round(run["rps"], 1) for run in runs]}
        rows.append(row | {"duration_s": duration, **stats})
        if stats["p50_ms"] is not None and connections == 1:
            request_s = stats["p50_ms"] / 1e3  # a better estimate than the warm-up's for the next concurrency
        p50, p99 = (f"{stats[name]:9.2f}" if stats[name] is not None else "      n/a" for name in ("p50_ms", "p99_ms"))
        print(
            f"  {WORKLOADS[key].name:14} {variant.label:26} c={connections:<3} {stats['rps']:9.1f} req/s"
            f"  p50 {p50} ms  p99 {p99} ms  n={stats['requests']} in {duration} s"
            f"  cores: server {stats['server_cores']:.2f} wrk {stats['wrk_cores']:.2f} other {stats['other_cores']:.2f}"
            + (f"  ERRORS {stats['errors']}" if stats["errors"] else "")
            + (f"  (best of req/s {stats['runs_rps']})" if len(runs) > 1 else ""),
            flush=True,
        )
    return rows


def measure(args: argparse.Namespace, work_dir: Path) -> dict:
    conv = {"args": {"padding": 1}, "algorithm": args.algorithm}
    workloads = {key: WORKLOADS[key] for key in args.workloads}
    inputs = {key: make_tensors(workload) for key, workload in workloads.items()}
    expected = {}
    for key, tensors in inputs.items():
        as_torch = {name: torch.from_numpy(value) for name, value in tensors.items()}
        expected[key] = F.conv2d(as_torch["input"], as_torch["weight"], as_torch["bias"], padding=workloads[key].padding).numpy()
    results: dict = {"rows": [], "compute_ms": {}, "timing_ms": {}, "load_avg_1m": {"start": os.getloadavg()[0]}}
    # Our server keeps freed blocks (CONV_MALLOC_REUSE); with glibc's defaults the in-process figure
    # would include fresh-page faults the server does not pay (measured 20-49 ms for the same 8x64 conv).
    keep_freed_memory()
    for key, workload in workloads.items():
        results["compute_ms"][key] = pure_compute_ms(workload, args.algorithm, reps=args.compute_reps)
        threads = torch.get_num_threads()
        print(f"pure compute {workload.name}: {results['compute_ms'][key]:.3f} ms (median, in-process, {threads} threads)", flush=True)
    for server in (servers(args)[name] for name in args.servers):
        print(f"starting {server.name}: {' '.join(server.command)}", flush=True)
        process = start(server, args.port, work_dir)
        try:
            for key in workloads:
                for variant in variants(server.name, key):
                    body, headers = variant.build(inputs[key], conv)
                    url = f"http://127.0.0.1:{args.port}{variant.path}"
                    request_s = check_answer(variant, url, body, headers, expected[key])
                    results["rows"] += measure_variant(process, variant, key, body, headers, request_s, args, work_dir)
                    if server.name == "ours" and not variant.parity:
                        results["timing_ms"][f"{key} {variant.encoding}"] = server_timing(variant, url, body, headers, args.timing_samples)
        finally:
            stop(process)
    results["load_avg_1m"]["end"] = os.getloadavg()[0]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--workloads", type=lambda text: text.split(","), default=list(WORKLOADS), help=f"comma-separated, from {list(WORKLOADS)}"
    )
    parser.add_argument("--servers", type=lambda text: text.split(","), default=SERVERS, help=f"comma-separated, from {SERVERS}")
    parser.add_argument("--duration", type=int, default=5, help="seconds of load per (variant, concurrency); wrk takes whole seconds")
    parser.add_argument("--min-requests", type=int, default=10, help="stretch a slow variant's runs until about this many complete")
    parser.add_argument("--max-duration", type=int, default=20, help="the longest a stretched run may last (s)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per (variant, concurrency); the fastest is kept")
    parser.add_argument("--warmup", type=int, default=1, help="seconds of c=1 load before each variant's runs")
    parser.add_argument("--algorithm", default="auto", help="the algorithm every server runs (kernels.conv2d's choice by default)")
    parser.add_argument("--port", type=int, default=8109)
    parser.add_argument("--compute-reps", type=int, default=15)
    parser.add_argument("--timing-samples", type=int, default=9, help="sequential requests whose timing_ms our server reports")
    parser.add_argument("--ours-python", default=str(REPO / ".venv" / "bin" / "python"))
    parser.add_argument("--peers-python", default=str(REPO / ".venv-peers" / "bin" / "python"))
    parser.add_argument("--litserve-workers", type=int, default=1, help="LitServe workers_per_device")
    parser.add_argument("--litserve-api-servers", type=int, default=1, help="LitServe num_api_servers")
    parser.add_argument("--litserve-fast-queue", action="store_true", help="LitServe fast_queue (ZeroMQ)")
    parser.add_argument("--kserve-workers", type=int, default=1, help="KServe uvicorn workers")
    parser.add_argument(
        "--nice",
        type=int,
        default=0,
        help="run this process, the servers and wrk at this niceness (negative needs root): for a shared machine",
    )
    parser.add_argument("--json", type=Path, help="write every row, timing and machine fact here")
    parser.add_argument("--markdown", type=Path, help="write the tables here as markdown")
    parser.add_argument("--plots", type=Path, help="directory for serve_ratio.png and serve_latency.png")
    args = parser.parse_args()
    if unknown := set(args.workloads) - set(WORKLOADS):
        parser.error(f"unknown workloads {sorted(unknown)}; choose from {list(WORKLOADS)}")
    if unknown := set(args.servers) - set(SERVERS):
        parser.error(f"unknown servers {sorted(unknown)}; choose from {SERVERS}")
    if subprocess.run(["which", "wrk"], capture_output=True).returncode != 0:
        sys.exit("wrk is not installed: run bash bench/setup_peers.sh (apt-get install wrk)")

    from bench.peers import report

    old_nice = prioritize(args.nice) if args.nice else None
    try:
        with tempfile.TemporaryDirectory(prefix="serve_compare-") as work_dir:
            results = measure(args, Path(work_dir))
    finally:
        if old_nice is not None:
            AUTOGROUP.write_text(str(old_nice))  # the session's other processes get their share back
    results["machine"] = report.machine()
    results["command"] = " ".join([Path(sys.executable).name, "-m", "bench.serve_compare", *sys.argv[1:]])
    results["settings"] = {key: value for key, value in vars(args).items() if key not in ("json", "markdown", "plots")}
    results["settings"] = json.loads(json.dumps(results["settings"], default=str))
    text = report.tables(results, WORKLOADS)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(report.markdown(results, WORKLOADS))
    if args.plots:
        report.plots(results, WORKLOADS, args.plots)


if __name__ == "__main__":
    main()
