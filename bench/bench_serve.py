"""End-to-end latency and throughput against a real uvicorn on loopback.

Starts `python -m app` on a free port, waits for /readyz, then drives it from this process with
httpx.AsyncClient at concurrency 1 and 16 and reports p50 / p99 latency and requests per second for:
  (a) the seed notebook's case: input 2x1x3x3, 2 filters 3x3, padding 1, tensors as nested lists;
  (b) input 8x64x56x56, 64 filters 3x3, padding 1, tensors in base64 (about 6.4 MB up, 6.4 MB down).
Every request asks for parity (ours and F.conv2d both run); --no-parity measures ours alone.

    .venv/bin/python -m bench.bench_serve                       # a few minutes on 2 CPU cores
    .venv/bin/python -m bench.bench_serve --seed-requests 400 --big-requests 32 --url http://host:8000

A benchmark, not a test: it checks only that every answer is 200 with parity ok.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import orjson
import torch

ROOT = Path(__file__).resolve().parents[1]


def _b64(tensor: torch.Tensor) -> dict:
    return {"shape": list(tensor.shape), "dtype": "float32", "b64": base64.b64encode(tensor.contiguous().numpy().tobytes()).decode()}


def seed_body(parity: bool) -> bytes:
    generator = torch.Generator().manual_seed(0)
    x, w, b = (
        torch.randn(2, 1, 3, 3, generator=generator),
        torch.randn(2, 1, 3, 3, generator=generator),
        torch.randn(2, generator=generator),
    )
    return orjson.dumps({"input": x.tolist(), "weight": w.tolist(), "bias": b.tolist(), "padding": 1, "parity": parity})


def big_body(parity: bool) -> bytes:
    generator = torch.Generator().manual_seed(0)
    x, w = torch.randn(8, 64, 56, 56, generator=generator), torch.randn(64, 64, 3, 3, generator=generator) * 0.05
    return orjson.dumps({"input": _b64(x), "weight": _b64(w), "padding": 1, "encoding": "base64", "parity": parity})


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server() -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = {**os.environ, "CONV_HOST": "127.0.0.1", "CONV_PORT": str(port), "CONV_LOG_LEVEL": "warning", "CONV_QUEUE_SIZE": "64"}
    process = subprocess.Popen([sys.executable, "-m", "app"], cwd=ROOT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        if process.poll() is not None:
            raise SystemExit(f"server exited with {process.returncode}")
        time.sleep(0.2)
    process.terminate()
    raise SystemExit("server not ready in 180 s")


async def drive(url: str, path: str, body: bytes, requests: int, concurrency: int) -> dict:
    latencies: list[float] = []
    server_ms: list[float] = []
    remaining = iter(range(requests))
    headers = {"content-type": "application/json"}

    async def client_loop(client: httpx.AsyncClient) -> None:
        for _ in remaining:
            start = time.perf_counter()
            response = await client.post(path, content=body, headers=headers)
            latencies.append(time.perf_counter() - start)
            if response.status_code != 200:
                raise SystemExit(f"{path} answered {response.status_code}: {response.text[:300]}")
            result = orjson.loads(response.content)
            if result["parity"] is not None and not result["parity"]["ok"]:
                raise SystemExit(f"parity failed: {result['parity']}")
            server_ms.append(result["timing_ms"]["total"])

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        await client.post(path, content=body, headers=headers)  # warm the connection and the shapes
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    ordered = sorted(latencies)
    return {
        "p50_ms": statistics.median(ordered) * 1e3,
        "p99_ms": ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))] * 1e3,
        "req_s": len(ordered) / elapsed,
        "server_ms": statistics.median(server_ms),
        "n": len(ordered),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="an already running server (default: start one)")
    parser.add_argument("--seed-requests", type=int, default=300)
    parser.add_argument("--big-requests", type=int, default=16)
    parser.add_argument("--no-parity", action="store_true")
    args = parser.parse_args()
    parity = not args.no_parity
    process, url = (None, args.url) if args.url else start_server()
    try:
        info = httpx.get(f"{url}/info").json()
        print(f"server {url}: torch {info['torch']}, devices {[d['name'] for d in info['devices']]}, parity {'on' if parity else 'off'}")
        cases = [
            ("seed 2x1x3x3 list", "/forward", seed_body(parity), args.seed_requests),
            ("seed 2x1x3x3 list", "/backward", seed_body(parity), args.seed_requests),
            ("8x64x56x56 base64", "/forward", big_body(parity), args.big_requests),
        ]
        print(f"{'case':<20} {'path':<10} {'conc':>4} {'n':>5} {'p50 ms':>9} {'p99 ms':>9} {'req/s':>8} {'server p50 ms':>14}")
        for name, path, body, requests in cases:
            for concurrency in (1, 16):
                figures = asyncio.run(drive(url, path, body, requests, concurrency))
                print(
                    f"{name:<20} {path:<10} {concurrency:>4} {figures['n']:>5} {figures['p50_ms']:>9.1f} {figures['p99_ms']:>9.1f}"
                    f" {figures['req_s']:>8.1f} {figures['server_ms']:>14.1f}",
                    flush=True,
                )
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=30)


if __name__ == "__main__":
    main()
