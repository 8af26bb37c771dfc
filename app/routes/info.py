"""GET /info: versions, devices, algorithms and what each supports, compiled CPU kernels, dtypes with tolerances, limits."""

from __future__ import annotations

import platform
from typing import Any

import torch
from fastapi import APIRouter

import app
import kernels
from app.codec import DTYPE_NAMES
from app.deps import SettingsDep, WorkersDep
from app.service import default_device
from kernels import compiled, gemm
from kernels.tolerances import TOLERANCES

router = APIRouter()


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return getattr(triton, "__version__", None)


def _device_info(name: str) -> dict[str, Any]:
    if not name.startswith("cuda"):
        return {"name": name, "type": "cpu", "description": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    properties = torch.cuda.get_device_properties(torch.device(name))
    return {
        "name": name,
        "type": "cuda",
        "description": properties.name,
        "capability": f"{properties.major}.{properties.minor}",
        "memory_bytes": properties.total_memory,
    }


@router.get("/info", summary="Versions, devices, algorithms, dtypes and limits")
async def info(settings: SettingsDep, workers: WorkersDep) -> dict[str, Any]:
    return {
        "version": app.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
        "devices": [{**_device_info(name), "ready": worker.ready, "healthy": worker.healthy} for name, worker in workers.items()],
        "default_device": default_device(settings, workers) if workers else None,
        "algorithms": kernels.algorithms(),
        "compiled_kernels": compiled.stats(),
        "cpu_gemm": gemm.backend(),
        "dtypes": {DTYPE_NAMES[dtype]: {"atol": atol, "rtol": rtol} for dtype, (atol, rtol) in TOLERANCES.items()},
        "encodings": ["list", "flat", "base64"],
        "non_finite": {"NaN": "NaN", "+inf": "Infinity", "-inf": "-Infinity"},
        "losses": ["sum", "mean_square"],
        "padding_modes": ["zeros", "reflect", "replicate", "circular"],
        "auth": settings.api_key is not None,
        "limits": {
            "max_body_bytes": settings.max_body_bytes,
            "max_tensor_elements": settings.max_tensor_elements,
            "max_macs": settings.max_macs,
            "reference_max_macs": settings.reference_max_macs,
            "workspace_bytes": settings.workspace_bytes,
            "queue_size": settings.queue_size,
            "request_timeout_s": settings.request_timeout_s,
        },
    }
