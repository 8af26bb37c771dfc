"""Tables, goal checks and plots for bench/serve_compare.py's results.

Results: {"rows": [{"workload", "server", "encoding", "kind", "parity", "c", "body_bytes", "rps",
"p50_ms", "p99_ms", "requests", "errors"}], "compute_ms": {workload: ms}, "timing_ms": {"<workload>
<encoding>": {"decode", "queue", "compute", "reference", "encode", "total", "client_round_trip"}}}.
Ratios are ours / peer against our variant of the same kind (text or binary), parity off, same c.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

# The goals, checked against the measured rows.
GOAL_SEED_VS_LITSERVE = 8.0  # ours (parity on) req/s / LitServe req/s, seed case, c=16
GOAL_LARGE_P50 = 0.1  # ours p50 / best peer p50, 8x64x56x56, our best encoding
GOAL_OVERHEAD = 1.25  # end-to-end p50 / pure compute, 8x64x56x56
PEERS = ("litserve", "litserve-2w", "kserve")  # fastapi-noop is a ceiling, not a peer


def machine() -> dict:
    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), "?"
    )
    memory_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal"))
    wrk = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.splitlines()[:1]
    versions = {}
    for package in ("torch", "litserve", "kserve", "fastapi", "uvicorn", "starlette", "orjson"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    os_name = next(
        (line.split("=", 1)[1].strip('"') for line in Path("/etc/os-release").read_text().splitlines() if line.startswith("PRETTY_NAME")),
        "?",
    )
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(memory_kb / 2**20, 1),
        "os": os_name,
        "python": platform.python_version(),
        "wrk": wrk[0].split(" Copyright")[0] if wrk else None,
        "versions": versions,
    }


def _ours_for(rows: list[dict], peer: dict) -> dict | None:
    """Our parity-off row to hold against a peer's: the same encoding where we have it (v2-binary against
    KServe's), else the same kind (text lists, or base64/binary), same workload and concurrency."""
    candidates = [
        row
        for row in rows
        if row["server"].startswith("ours")
        and not row["parity"]
        and row["workload"] == peer["workload"]
        and row["c"] == peer["c"]
        and row["kind"] == peer["kind"]
    ]
    same_encoding = [row for row in candidates if row["encoding"] == peer["encoding"]]
    return (same_encoding or candidates or [None])[0]


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _size(num_bytes: int) -> str:
    for unit, scale in (("MB", 1e6), ("KB", 1e3)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.1f} {unit}"
    return f"{num_bytes} B"


def _workload_rows(results: dict, key: str) -> list[list[str]]:
    rows = [row for row in results["rows"] if row["workload"] == key]
    table = []
    for row in sorted(rows, key=lambda row: (row["c"], row["server"] != "ours", row["server"], row["encoding"], row["parity"])):
        ours = _ours_for(rows, row) if row["server"] in (*PEERS, "fastapi-noop") else None
        ratio_rps = f"{ours['rps'] / row['rps']:.2f}x" if ours and row["rps"] else "-"
        ratio_p50 = f"{ours['p50_ms'] / row['p50_ms']:.2f}x" if ours and ours["p50_ms"] and row["p50_ms"] else "-"
        table.append(
            [
                row["server"],
                row["encoding"] + (" +parity" if row["parity"] else ""),
                str(row["c"]),
                f"{row['rps']:.1f}",
                _ms(row["p50_ms"]),
                _ms(row["p99_ms"]),
                "skipped" if row.get("skipped") else str(row["requests"]) + (f" ({row['errors']} err)" if row["errors"] else ""),
                _size(row["body_bytes"]),
                ratio_rps,
                ratio_p50,
                f"{row['server_cores']:.1f}/{row['wrk_cores']:.1f}/{row['other_cores']:.1f}" if "other_cores" in row else "-",
            ]
        )
    return table


WORKLOAD_HEADER = [
    "server",
    "encoding",
    "c",
    "req/s",
    "p50 ms",
    "p99 ms",
    "n",
    "request",
    "ours/peer req/s",
    "ours/peer p50",
    "cores srv/wrk/other",
]
TIMING_HEADER = [
    "workload",
    "encoding",
    "decode",
    "queue",
    "compute",
    "encode",
    "server total",
    "client round trip",
    "wrk p50 c=1",
    "pure compute",
    "p50 / compute",
]


def _best(rows: list[dict], key: str, c: int, server: str | None) -> dict | None:
    """Our best parity-off variant (server="ours"), or the best peer variant (server=None), by p50."""
    pool = [
        row
        for row in rows
        if row["workload"] == key
        and row["c"] == c
        and not row["parity"]
        and (row["server"].startswith("ours") if server == "ours" else (row["server"] in PEERS))
    ]
    pool = [row for row in pool if row["p50_ms"] is not None]
    return min(pool, key=lambda row: row["p50_ms"]) if pool else None


def _timing_rows(results: dict) -> list[list[str]]:
    table = []
    for name, timing in results["timing_ms"].items():
        key, encoding = name.split(" ", 1)
        wrk = next(
            (
                row
                for row in results["rows"]
                if row["workload"] == key
                and row["server"] == "ours"
                and row["encoding"] == encoding
                and not row["parity"]
                and row["c"] == 1
            ),
            None,
        )
        compute = results["compute_ms"][key]
        table.append(
            [key, encoding]
            + [_ms(timing.get(field)) for field in ("decode", "queue", "compute", "encode", "total", "client_round_trip")]
            + [_ms(wrk["p50_ms"]) if wrk else "-", f"{compute:.2f}", f"{wrk['p50_ms'] / compute:.2f}x" if wrk and wrk["p50_ms"] else "-"]
        )
    return table


def goals(results: dict) -> list[tuple[str, str, bool | None]]:
    """(goal, measured, met) for each of the issue's goals; met is None when its rows were not run."""
    rows = results["rows"]
    checks: list[tuple[str, str, bool | None]] = []
    ours_parity = max(
        (row for row in rows if row["workload"] == "seed" and row["server"].startswith("ours") and row["parity"] and row["c"] == 16),
        key=lambda row: row["rps"],
        default=None,
    )
    litserve = [row for row in rows if row["workload"] == "seed" and row["server"].startswith("litserve") and row["c"] == 16]
    goal = f"seed case, c=16: ours (list, parity on) >= {GOAL_SEED_VS_LITSERVE:g}x LitServe's best req/s"
    if ours_parity and litserve:
        best = max(litserve, key=lambda row: row["rps"])
        ratio = ours_parity["rps"] / best["rps"]
        measured = (
            f"{ours_parity['rps']:.0f} ({ours_parity['server']}) vs {best['rps']:.0f} ({best['server']} {best['encoding']}) = {ratio:.2f}x"
        )
        noop = next((row for row in rows if row["workload"] == "seed" and row["server"] == "fastapi-noop" and row["c"] == 16), None)
        if noop and noop["rps"]:
            # The ceiling, measured in the same run: steadier than a ratio to a peer when the host's speed drifts.
            measured += f"; the no-op FastAPI endpoint (one process) {noop['rps']:.0f}, so {GOAL_SEED_VS_LITSERVE:g}x LitServe = "
            measured += f"{GOAL_SEED_VS_LITSERVE * best['rps'] / noop['rps']:.2f}x it, ours {ours_parity['rps'] / noop['rps']:.2f}x it"
        checks.append((goal, measured, ratio >= GOAL_SEED_VS_LITSERVE))
    else:
        checks.append((goal, "not run", None))
    for c in (1, 16):
        ours, peer = _best(rows, "8x64", c, "ours"), _best(rows, "8x64", c, None)
        goal = f"8x64x56x56, c={c}: ours best p50 <= {GOAL_LARGE_P50:g}x best peer's p50"
        if ours and peer:
            ratio = ours["p50_ms"] / peer["p50_ms"]
            measured = f"{ours['p50_ms']:.1f} ms ({ours['encoding']}) vs {peer['p50_ms']:.1f} ms ({peer['server']} {peer['encoding']}) = {ratio:.2f}x"
            checks.append((goal, measured, ratio <= GOAL_LARGE_P50))
        else:
            checks.append((goal, "not run", None))
    ours = _best(rows, "8x64", 1, "ours")
    goal = f"8x64x56x56: serving overhead (end-to-end p50 at c=1 / pure compute) <= {GOAL_OVERHEAD:g}"
    if ours and "8x64" in results["compute_ms"]:
        compute, source = _pure_compute(results, ours)
        ratio = ours["p50_ms"] / compute
        checks.append(
            (goal, f"{ours['p50_ms']:.1f} ms ({ours['encoding']}) / {compute:.1f} ms ({source}) = {ratio:.2f}", ratio <= GOAL_OVERHEAD)
        )
    else:
        checks.append((goal, "not run", None))
    return checks


def _pure_compute(results: dict, row: dict) -> tuple[float, str]:
    """The smaller of the in-process pure compute and our server's own compute stage for the row: the stricter ratio.

    Both vary by 20-50% between processes on a shared 2-core host, so the goal is not met by a slow
    in-process measurement alone.
    """
    in_process = results["compute_ms"]["8x64"]
    in_server = results["timing_ms"].get(f"8x64 {row['encoding']}", {}).get("compute")
    if in_server is not None and in_server < in_process:
        return in_server, "server's compute stage"
    return in_process, "in-process"


def _text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]
    lines = [
        "  ".join(cell.ljust(width) if index < 2 else cell.rjust(width) for index, (cell, width) in enumerate(zip(line, widths)))
        for line in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if index < 2 else "---:" for index in range(len(header))) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _title(workload) -> str:
    shape = lambda dims: "x".join(map(str, dims))  # noqa: E731
    return f"{workload.name}: input {shape(workload.input)}, weight {shape(workload.weight)}, padding {workload.padding}"


def _goal_lines(results: dict) -> list[str]:
    mark = {True: "MET", False: "MISSED", None: "NOT RUN"}
    return [f"[{mark[met]}] {goal}: {measured}" for goal, measured, met in goals(results)]


def tables(results: dict, workloads: dict) -> str:
    parts = []
    for key, workload in workloads.items():
        if any(row["workload"] == key for row in results["rows"]):
            parts.append(f"== {_title(workload)} ==\n{_text_table(WORKLOAD_HEADER, _workload_rows(results, key))}")
    if results["timing_ms"]:
        parts.append("== our server: where the time goes (ms, medians; c=1) ==\n" + _text_table(TIMING_HEADER, _timing_rows(results)))
    parts.append("== goals ==\n" + "\n".join(_goal_lines(results)))
    return "\n\n".join(parts)


def markdown(results: dict, workloads: dict) -> str:
    parts = []
    for key, workload in workloads.items():
        if any(row["workload"] == key for row in results["rows"]):
            parts.append(f"#### {_title(workload)}\n\n{_markdown_table(WORKLOAD_HEADER, _workload_rows(results, key))}")
    if results["timing_ms"]:
        parts.append("#### Our server: where the time goes (ms, medians, c=1)\n\n" + _markdown_table(TIMING_HEADER, _timing_rows(results)))
    parts.append("#### Goals\n\n" + "\n".join(f"- {line}" for line in _goal_lines(results)))
    return "\n\n".join(parts) + "\n"


def plots(results: dict, workloads: dict, directory: Path) -> list[Path]:
    """serve_ratio.png: ours-best / peer-best req/s per workload; serve_latency.png: p50 (c=1) vs request size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    directory.mkdir(parents=True, exist_ok=True)
    rows = results["rows"]
    keys = [key for key in workloads if any(row["workload"] == key for row in rows)]
    peers = sorted({row["server"] for row in rows} & set(PEERS))
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for axis, c in zip(axes, (1, 16)):
        width = 0.8 / max(1, len(peers))
        for index, peer in enumerate(peers):
            ratios = []
            for key in keys:
                ours = [
                    row["rps"] for row in rows if row["workload"] == key and row["c"] == c and row["server"] == "ours" and not row["parity"]
                ]
                theirs = [row["rps"] for row in rows if row["workload"] == key and row["c"] == c and row["server"] == peer]
                ratios.append(max(ours) / max(theirs) if ours and theirs and max(theirs) > 0 else float("nan"))
            positions = [position + (index - (len(peers) - 1) / 2) * width for position in range(len(keys))]
            bars = axis.bar(positions, ratios, width, label=f"vs {peer}")
            axis.bar_label(bars, fmt="%.2fx", fontsize=8)
        axis.axhline(1.0, color="black", linewidth=0.8)
        axis.set_xticks(range(len(keys)), [workloads[key].name for key in keys])
        axis.set_yscale("log")
        axis.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%gx"))
        axis.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        axis.set_title(f"concurrency {c}")
        axis.set_ylabel("ours / peer req/s (best encoding each, parity off)")
        axis.legend()
    figure.suptitle("Throughput ratio, ours / peer (> 1: we serve more)")
    figure.tight_layout()
    ratio_path = directory / "serve_ratio.png"
    figure.savefig(ratio_path, dpi=110)
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(8, 5))
    series = sorted({(row["server"], row["encoding"], row["parity"]) for row in rows})
    for server, encoding, parity in series:
        points = sorted(
            (row["body_bytes"], row["p50_ms"])
            for row in rows
            if (row["server"], row["encoding"], row["parity"]) == (server, encoding, parity) and row["c"] == 1 and row["p50_ms"] is not None
        )
        if len(points) < 2:
            continue
        style = "-" if server == "ours" else "--"
        axis.plot([size for size, _ in points], [p50 for _, p50 in points], style, marker="o", label=f"{server} {encoding}")
    for key in keys:
        if key in results["compute_ms"]:
            axis.axhline(results["compute_ms"][key], color="grey", linewidth=0.6, linestyle=":")
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel("request body (bytes)")
    axis.set_ylabel("p50 latency at c=1 (ms)")
    axis.set_title("Latency vs payload size (dotted: pure compute per workload)")
    axis.legend(fontsize=8)
    axis.grid(True, which="both", linewidth=0.3)
    figure.tight_layout()
    latency_path = directory / "serve_latency.png"
    figure.savefig(latency_path, dpi=110)
    plt.close(figure)
    return [ratio_path, latency_path]
