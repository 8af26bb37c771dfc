"""kernels/triton_launch.py: which launches go through Triton's own path, and what the direct ones pass.

Without a GPU there is no compiled kernel, so these tests drive `launch` with stand-ins for Triton's
autotuner, JIT function, compiled kernel and driver. On a GPU, tests/kernels/test_triton.py checks the
real thing: repeated calls (the direct path) against the oracle, and no second pass through Triton.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("triton")

from kernels import triton_launch  # noqa: E402
from kernels.memo import BoundedMemo  # noqa: E402


class Compiled:
    """A CompiledKernel: records what `run` is given."""

    function, packed_metadata = "function", "packed"

    def __init__(self) -> None:
        self.runs: list[tuple] = []

    def run(self, grid_x, grid_y, grid_z, stream, function, packed, launch_metadata, enter_hook, exit_hook, *args):
        assert (function, packed, launch_metadata, enter_hook, exit_hook) == ("function", "packed", None, None, None)
        self.runs.append(((grid_x, grid_y, grid_z), stream, args))


class JitFunction:
    """A JITFunction of (x_ptr, y_ptr, n, HAS_BIAS, BLOCK, GROUP=4): one compiled kernel per specialisation."""

    arg_names = ["x_ptr", "y_ptr", "n", "HAS_BIAS", "BLOCK", "GROUP"]
    params = [SimpleNamespace(default=None)] * 5 + [SimpleNamespace(default=4)]

    def __init__(self) -> None:
        self.compiled: dict[tuple, Compiled] = {}

    def warmup(self, *args, grid, **options):
        key = (tuple((a.dtype, a.data_ptr() % 16) if isinstance(a, torch.Tensor) else a for a in args), tuple(sorted(options.items())))
        return self.compiled.setdefault(key, Compiled())


class Autotuned:
    """An Autotuner: `kernel[grid](...)` is Triton's path; it picks BLOCK=64 and sets best_config."""

    def __init__(self) -> None:
        self.fn = JitFunction()
        self.triton_launches: list[tuple] = []
        self.best_config = None

    def __getitem__(self, grid):
        def run(*args, **constexprs):
            self.best_config = SimpleNamespace(kwargs={"BLOCK": 64}, all_kwargs=lambda: {"BLOCK": 64, "num_warps": 4})
            self.triton_launches.append((grid({**constexprs, "BLOCK": 64}), args, constexprs))

        return run


@pytest.fixture
def compiled_path(monkeypatch):
    """launch() as on a GPU with Triton >= 3.3, with a fresh memo and a driver on stream 7."""
    monkeypatch.setattr(triton_launch, "_INTERPRETED", False)
    monkeypatch.setattr(triton_launch, "_SUPPORTED", True)
    monkeypatch.setattr(triton_launch, "_COMPILED", BoundedMemo(16))
    active = SimpleNamespace(get_current_device=lambda: 0, get_current_stream=lambda device: 7)
    monkeypatch.setattr(triton_launch, "driver", SimpleNamespace(active=active))


def grid(meta):
    return (triton_launch.cdiv(100, meta["BLOCK"]),)


def test_first_call_goes_through_triton_later_ones_launch_the_compiled_kernel(compiled_path):
    kernel, x, y = Autotuned(), torch.zeros(64), torch.zeros(64)
    for _ in range(3):
        triton_launch.launch(kernel, grid, (x, y), 100, HAS_BIAS=True)
    assert len(kernel.triton_launches) == 1
    (compiled,) = kernel.fn.compiled.values()
    # Every bound argument in parameter order: tensors, scalars, the constexprs, the tuned BLOCK, GROUP's default.
    assert compiled.runs == [((2, 1, 1), 7, (x, y, 100, True, 64, 4))] * 2


class OnDevice:
    """A tensor's stand-in on another device (what the key reads: dtype, data_ptr, get_device)."""

    def __init__(self, tensor: torch.Tensor, device: int) -> None:
        self.dtype, self.tensor, self.device = tensor.dtype, tensor, device

    def data_ptr(self) -> int:
        return self.tensor.data_ptr()

    def get_device(self) -> int:
        return self.device


@pytest.mark.parametrize(
    "change",
    ["dtype", "alignment", "device", "scalar", "constexpr"],
)
def test_what_triton_specialises_on_is_in_the_key(compiled_path, change):
    kernel, x, y = Autotuned(), torch.zeros(64), torch.zeros(64)
    triton_launch.launch(kernel, grid, (x, y), 100, HAS_BIAS=True)
    other = {
        "dtype": lambda: triton_launch.launch(kernel, grid, (x.half(), y), 100, HAS_BIAS=True),
        "alignment": lambda: triton_launch.launch(kernel, grid, (x[1:], y), 100, HAS_BIAS=True),
        "device": lambda: triton_launch.launch(kernel, grid, (OnDevice(x, 1), y), 100, HAS_BIAS=True),
        "scalar": lambda: triton_launch.launch(kernel, grid, (x, y), 101, HAS_BIAS=True),
        "constexpr": lambda: triton_launch.launch(kernel, grid, (x, y), 100, HAS_BIAS=False),
    }[change]
    other()
    assert len(kernel.triton_launches) == 2, f"a different {change} reused the compiled kernel"
    other()
    assert len(kernel.triton_launches) == 2 and sum(len(c.runs) for c in kernel.fn.compiled.values()) == 1


def test_interpreter_always_goes_through_triton(monkeypatch):
    monkeypatch.setattr(triton_launch, "_INTERPRETED", True)
    kernel = Autotuned()
    for _ in range(2):
        triton_launch.launch(kernel, grid, (torch.zeros(4),), 100, HAS_BIAS=True)
    assert len(kernel.triton_launches) == 2 and not kernel.fn.compiled


@pytest.mark.parametrize(("a", "b", "expected"), [(0, 64, 0), (1, 64, 1), (64, 64, 1), (65, 64, 2), (100352, 128, 784)])
def test_cdiv(a, b, expected):
    assert triton_launch.cdiv(a, b) == expected
