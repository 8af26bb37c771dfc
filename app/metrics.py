"""Prometheus metrics: requests by endpoint / status / algorithm, latency, queue depth, in-flight, device memory.

Each app has its own registry (tests build many apps in one process). Counters and histograms are
fed by `MetricsMiddleware`; gauges that describe the workers are read when /metrics is scraped.

Several server processes (CONV_PROCESSES > 1): a scrape reaches one of them, so `python -m app` gives them
a shared directory (PROMETHEUS_MULTIPROC_DIR) before they import prometheus_client, which then keeps
every value in per-process files there; /metrics adds up all processes' counters and histograms, and
the gauges of the live ones, which each process refreshes every GAUGE_REFRESH_S.
"""

from __future__ import annotations

import asyncio
import os
import re
import resource
import time
from collections.abc import Iterable

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.admission import MemoryBudget
from app.config import METRICS_DIR_VARIABLE
from app.processes import alive
from app.worker import DeviceWorker

ENDPOINTS = ("/forward", "/backward", "/healthz", "/readyz", "/info", "/metrics")
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
SHARED_DIR = os.environ.get(METRICS_DIR_VARIABLE)
GAUGE_REFRESH_S = 1.0
_LIVE_GAUGE_FILE = re.compile(r"gauge_live\w*_(\d+)\.db")


class Metrics:
    def __init__(self) -> None:
        self.shared_dir = SHARED_DIR
        self.registry = CollectorRegistry()
        # Across processes a gauge is the sum over the live ones (queue depths, busy workers, bytes held, memory).
        live = {"multiprocess_mode": "livesum"}
        self.requests = Counter(
            "conv_requests", "HTTP requests by endpoint, status and algorithm", ["endpoint", "status", "algorithm"], registry=self.registry
        )
        self.latency = Histogram(
            "conv_request_duration_seconds",
            "Request latency, arrival to last byte",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.stage = Histogram(
            "conv_stage_duration_seconds", "Time per stage of compute requests", ["stage"], buckets=_LATENCY_BUCKETS, registry=self.registry
        )
        self.in_flight = Gauge("conv_in_flight_requests", "Compute requests being handled now", registry=self.registry, **live)
        self.queue_depth = Gauge("conv_queue_depth", "Jobs waiting for a device", ["device"], registry=self.registry, **live)
        self.busy = Gauge("conv_device_busy", "1 while the device worker is running a job", ["device"], registry=self.registry, **live)
        self.dropped = Gauge(
            "conv_jobs_dropped", "Queued jobs dropped without running (deadline or client gone)", ["device"], registry=self.registry, **live
        )
        self.inflight_bytes = Gauge(
            "conv_inflight_bytes", "Bytes held by requests in progress (CONV_MAX_INFLIGHT_BYTES admission)", registry=self.registry, **live
        )
        self.memory = Gauge(
            "conv_device_memory_bytes",
            "Device memory: CUDA allocated / reserved, CPU peak RSS",
            ["device", "kind"],
            registry=self.registry,
            **live,
        )

        # Labelled children by label values: `labels()` costs ~3 us a call, and a request makes ~8.
        self._children: dict[tuple, object] = {}

    def _child(self, metric, *values: str):
        key = (metric, values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    def observe_stages(self, timing_ms: dict[str, float]) -> None:
        for stage, milliseconds in timing_ms.items():
            if stage != "total":
                self._child(self.stage, stage).observe(milliseconds / 1e3)

    def count(self, endpoint: str, status: str, algorithm: str, seconds: float) -> None:
        """One finished HTTP request."""
        self._child(self.requests, endpoint, status, algorithm).inc()
        self._child(self.latency, endpoint).observe(seconds)

    def refresh(self, workers: Iterable[DeviceWorker], budget: MemoryBudget | None = None) -> None:
        """Set the gauges that describe this process's workers and admission budget."""
        if budget is not None:
            self.inflight_bytes.set(budget.held_bytes)
        for worker in workers:
            self.queue_depth.labels(worker.name).set(worker.queue_depth)
            self.busy.labels(worker.name).set(1 if worker.busy else 0)
            self.dropped.labels(worker.name).set(worker.dropped)
            if worker.device.type == "cuda":
                self.memory.labels(worker.name, "allocated").set(torch.cuda.memory_allocated(worker.device))
                self.memory.labels(worker.name, "reserved").set(torch.cuda.memory_reserved(worker.device))
            else:
                # ru_maxrss is KiB on Linux.
                self.memory.labels(worker.name, "peak_rss").set(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)

    def render(self, workers: Iterable[DeviceWorker], budget: MemoryBudget | None = None) -> bytes:
        """The exposition text: this process's metrics, or with a shared directory every process's."""
        self.refresh(workers, budget)
        if self.shared_dir is None:
            return generate_latest(self.registry)
        _forget_dead_processes(self.shared_dir)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, self.shared_dir)
        return generate_latest(registry)


async def keep_gauges_current(metrics: Metrics, workers: Iterable[DeviceWorker], budget: MemoryBudget) -> None:
    """With a shared directory: another process may answer the next scrape, so refresh this one's gauges now and then."""
    while True:
        await asyncio.sleep(GAUGE_REFRESH_S)
        metrics.refresh(workers, budget)


def _forget_dead_processes(shared_dir: str) -> None:
    """Drop the live gauges of processes that are gone (a worker the supervisor restarted): their counts stay."""
    for name in os.listdir(shared_dir):
        match = _LIVE_GAUGE_FILE.fullmatch(name)
        if match and not alive(int(match.group(1))):
            multiprocess.mark_process_dead(int(match.group(1)), shared_dir)


def _v2_endpoint(path: str) -> str:
    """V2 infer paths (one per model and version) count as one endpoint; the rest of /v2 as another."""
    if path.startswith("/v2/models/") and path.endswith("/infer"):
        return "/v2/infer"
    return "/v2" if path == "/v2" or path.startswith("/v2/") else "other"


class MetricsMiddleware:
    """Counts every HTTP request; routes put the algorithm that ran in request.state.algorithm."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        endpoint = path if path in ENDPOINTS else _v2_endpoint(path)
        compute = endpoint in ("/forward", "/backward", "/v2/infer")
        status = {"code": 500}
        start = time.perf_counter()

        async def send_with_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        if compute:
            self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_with_status)
        finally:
            if compute:
                self.metrics.in_flight.dec()
            algorithm = scope.get("state", {}).get("algorithm", "")
            self.metrics.count(endpoint, str(status["code"]), algorithm, time.perf_counter() - start)
