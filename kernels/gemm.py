"""The CPU algorithms' big matrix products: oneDNN's matmul where it beats torch's BLAS on this CPU.

Why: torch's CPU matmul calls MKL, and MKL takes its generic code path on CPUs it does not recognise.
On this project's machines since 2026-11-28 (AMD EPYC with AVX-512, 2 threads) MKL ran our GEMMs at
190-210 GFLOP/s and oneDNN's matmul, which JIT-compiles for the CPU it finds, at 360-410 GFLOP/s: the
Winograd, im2col and 1x1 GEMMs of the benchmark shapes took 1.7-2.4x longer through MKL
(docs/performance.md, round 18). On the earlier AVX2 EPYC the two were within -10%..+23% of each other.

So the backend is measured, not assumed: the first product big enough to matter (or the service's
warm-up) times both on one fixed GEMM and keeps oneDNN only if it is clearly faster (`ONEDNN_MARGIN`);
`set_backend` (the service's CONV_GEMM) pins one. The only entry point to oneDNN's fp32 matmul in torch
is `torch.ops.mkldnn._linear_pointwise`, a private op (Inductor's): it is used only where it exists and
only as a plain GEMM, never for a convolution (those stay the oracle's).

`mm`, `bmm` and `products` mirror torch.mm / torch.bmm. oneDNN's op has no autograd formula, no batching
rule and no out= form, so they keep torch's matmul wherever autograd records (double backward), under
torch.func transforms, in traced code, for float64 and for products too small to pay its ~10 us call;
an out= result from oneDNN is copied into place.
"""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager

import torch
from torch.autograd import forward_ad

BACKENDS = ("auto", "onednn", "torch")

# Below this many multiply-adds oneDNN's per-call cost (~10 us here) outweighs its faster loop
# (measured, 2 threads: 1M MACs a tie, 2M 34 vs 41 us, 4M 52 vs 77 us).
MIN_MACS = 1 << 21

# A strided x (a transposed view, say) is copied to row-major first, which pays off from this many output columns
# (the copy is M*K elements, the product M*K*N multiply-adds).
COPY_MIN_COLUMNS = 32

# oneDNN is kept when the calibration GEMM runs at least this much faster through it (on a CPU where
# the two are close, torch's matmul is the one with out= buffers and no private op).
ONEDNN_MARGIN = 1.15
CALIBRATION_ROUNDS = 15  # ~4 ms in all here

_onednn_linear = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
_onednn_linear_add = getattr(_onednn_linear, "binary", None)  # the same GEMM, adding a tensor in its epilogue
_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", None)


class _State:
    def __init__(self) -> None:
        self.setting = "auto"
        self.chosen: str | None = None  # what "auto" measured, once per process
        self.lock = threading.Lock()


_state = _State()


def _after_fork_in_child() -> None:
    """A lock held by a parent's thread at the fork would never be released in the child."""
    _state.lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def set_backend(name: str) -> None:
    """Backend for big float32 CPU products: "auto" (measure once), "onednn" (where it can run) or "torch" (torch.matmul)."""
    if name not in BACKENDS:
        raise ValueError(f"GEMM backend must be one of {list(BACKENDS)}, got {name!r}")
    _state.setting = name


@contextmanager
def using(name: str):
    """Run a block under another backend setting (benchmarks comparing the two), as `compiled.mode` does for compiling."""
    previous = _state.setting
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def backend() -> str:
    """The backend big float32 CPU products take now: "onednn" or "torch" (measures once under "auto")."""
    if _state.setting == "torch" or not _onednn_available():
        return "torch"
    if _state.setting == "onednn":
        return "onednn"
    if _state.chosen is None:
        with _state.lock:
            if _state.chosen is None:
                _state.chosen = _calibrate()
    return _state.chosen


def mm(a: torch.Tensor, b: torch.Tensor, *, bias: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """torch.mm(a, b) (torch.addmm(bias, a, b) with a bias (N,)): a (M, K) @ b (K, N) -> (M, N), or into out (any view)."""
    if _onednn_for(a, b, bias):
        product = _onednn_linear(a.contiguous(), b.t(), bias, "none", [], "")
        return product if out is None else out.copy_(product)
    if bias is not None:
        return torch.addmm(bias, a, b, out=out) if out is not None else torch.addmm(bias, a, b)
    return torch.matmul(a, b, out=out) if out is not None else torch.mm(a, b)


def bmm(a: torch.Tensor, b: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """torch.bmm(a, b): a (B, M, K) @ b (B, K, N) -> (B, M, N), or into out (any view). a may be expanded
    (stride 0 over B: one matrix against a batch); through oneDNN that is B GEMMs, each copied into place."""
    if a.shape[0] and _onednn_for(a[0], b[0]):
        out = a.new_empty(a.shape[0], a.shape[1], b.shape[2]) if out is None else out
        for index in range(a.shape[0]):
            out[index].copy_(_onednn_linear(a[index].contiguous(), b[index].t(), None, "none", [], ""))
        return out
    return torch.bmm(a, b, out=out) if out is not None else torch.bmm(a, b)


def products(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """torch.bmm(a, b).unbind(0), except that through oneDNN each product is its own tensor (no copy into a batch):
    for a consumer that reads the B products separately (Winograd's output transform)."""
    if a.shape[0] and _onednn_for(a[0], b[0]):
        # unbind: one call for all 16 operands of Winograd's products, where indexing, .contiguous() and .t() per product
        # took ~5 us each (80 us of a 1.7 ms call at 64x56, batch 4)
        rows, columns = a.contiguous().unbind(0), b.transpose(1, 2).unbind(0)
        return tuple(_onednn_linear(x, w, None, "none", [], "") for x, w in zip(rows, columns))
    return torch.bmm(a, b).unbind(0)


def sum_of_products(pairs: list[tuple[torch.Tensor, torch.Tensor]], *, bias: torch.Tensor | None = None) -> torch.Tensor:
    """bias + sum_i a_i @ b_i: each a_i (M, K_i) @ b_i (K_i, N) -> (M, N), a new tensor.

    Through oneDNN each product after the first adds the running sum in the GEMM's own epilogue (its fused binary
    add), while the sum's block is in cache: a separate add would read and write the whole sum once more per
    product. Elsewhere torch's addmm_ accumulates in place, which stays differentiable for double backward (it
    saves its two factors, not the sum)."""
    (first, first_right), rest = pairs[0], pairs[1:]
    if _onednn_linear_add is not None and _onednn_for(first, first_right, bias):
        total = _onednn_linear(first.contiguous(), first_right.t(), bias, "none", [], "")
        for a, b in rest:
            total = _onednn_linear_add(a.contiguous(), total, b.t(), None, "add")
        return total
    total = torch.mm(first, first_right) if bias is None else torch.addmm(bias, first, first_right)
    for a, b in rest:
        total.addmm_(a, b)
    return total


def routes_to_onednn(dtype: torch.dtype) -> bool:
    """Whether big CPU products of `dtype` go through oneDNN here: for callers that pick a GEMM orientation."""
    return dtype == torch.float32 and backend() == "onednn"


def onednn_takes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether `mm(a, b)` would run on oneDNN: for callers whose best form differs between the backends."""
    return _onednn_for(a, b)


def _onednn_for(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether a (M, K) @ b (K, N) goes through oneDNN: as its x (row-major) and w = b^T (any strides)."""
    if bias is not None and (bias.dtype != torch.float32 or (bias.requires_grad and torch.is_grad_enabled())):
        return False
    return _may_use_onednn(a, b.t()) and backend() == "onednn"


def _may_use_onednn(x: torch.Tensor, w: torch.Tensor) -> bool:
    if x.dtype != torch.float32 or w.dtype != torch.float32 or x.device.type != "cpu" or x.dim() != 2:
        return False
    if x.shape[0] * x.shape[1] * w.shape[0] < MIN_MACS:
        return False
    if not x.is_contiguous() and w.shape[0] < COPY_MIN_COLUMNS:  # oneDNN's op copies a strided x: worth it for enough columns
        return False
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad):
        return False
    if _functorch_active is None or _functorch_active() or getattr(forward_ad, "_current_level", 0) >= 0:
        return False
    return type(x) is torch.Tensor and type(w) is torch.Tensor and not torch.compiler.is_compiling()


def _onednn_available() -> bool:
    return _onednn_linear is not None and torch.backends.mkldnn.is_available()


def _calibrate(clock=time.perf_counter) -> str:
    """Time one (1024 x 256) @ (256 x 64) product (16M MACs) both ways, interleaved; the fastest of CALIBRATION_ROUNDS each.

    The fastest, not the median: whatever else runs (at the service's start-up its parser process imports torch
    beside the warm-up) only adds time, and a median of 5 picked torch's matmul in 1 of 40 trials on a quiet host
    and in some server start-ups (oneDNN is ~2x faster here); the fastest of 15 kept oneDNN in 40 of 40, also with
    two busy loops beside it (docs/performance.md, round 24)."""
    try:
        generator = torch.Generator().manual_seed(0)
        x, w = torch.randn(1024, 256, generator=generator), torch.randn(64, 256, generator=generator)
        products = {"onednn": lambda: _onednn_linear(x, w, None, "none", [], ""), "torch": lambda: torch.mm(x, w.t())}
        if not torch.allclose(products["onednn"](), products["torch"](), rtol=1e-4, atol=1e-3):
            return "torch"
        times: dict[str, list[float]] = {name: [] for name in products}
        for _ in range(CALIBRATION_ROUNDS + 1):
            for name, product in products.items():
                start = clock()
                product()
                times[name].append(clock() - start)
        fastest = {name: min(values[1:]) for name, values in times.items()}  # the first call warms up
    except Exception:  # a torch whose op has another signature or rejects these arguments: torch's matmul stays
        return "torch"
    return "onednn" if fastest["torch"] >= ONEDNN_MARGIN * fastest["onednn"] else "torch"
