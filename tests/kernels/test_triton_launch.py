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
    """Launches as on a GPU with Triton >= 3.3, with a driver on stream 7."""
    monkeypatch.setattr(triton_launch, "_INTERPRETED", False)
    monkeypatch.setattr(triton_launch, "_SUPPORTED", True)
    active = SimpleNamespace(get_current_device=lambda: 0, get_current_stream=lambda device: 7)
    monkeypatch.setattr(triton_launch, "driver", SimpleNamespace(active=active))


def grid(meta):
    return (triton_launch.cdiv(100, meta["BLOCK"]),)


def test_first_call_goes_through_triton_later_ones_launch_the_compiled_kernel(compiled_path):
    kernel, x, y = Autotuned(), torch.zeros(64), torch.zeros(64)
    launch = triton_launch.Launch(kernel, grid, (100,), {"HAS_BIAS": True})
    for _ in range(3):
        launch(x, y)
    assert len(kernel.triton_launches) == 1
    (compiled,) = kernel.fn.compiled.values()
    # Every bound argument in parameter order: tensors, scalars, the constexprs, the tuned BLOCK, GROUP's default.
    assert compiled.runs == [((2, 1, 1), 7, (x, y, 100, True, 64, 4))] * 2


def test_each_alignment_gets_its_own_compiled_kernel(compiled_path):
    """Triton compiles 16-byte-aligned pointers into vector loads: the one thing a Launch reads per call."""
    kernel, x, y = Autotuned(), torch.zeros(64), torch.zeros(64)
    launch = triton_launch.Launch(kernel, grid, (100,), {"HAS_BIAS": True})
    launch(x, y)
    launch(x[1:], y)  # 4 bytes off: another specialisation, so through Triton again
    assert len(kernel.triton_launches) == 2 and len(kernel.fn.compiled) == 2
    launch(x[1:], y)
    launch(x, y)
    assert len(kernel.triton_launches) == 2
    assert [len(compiled.runs) for compiled in kernel.fn.compiled.values()] == [1, 1]
    (unaligned_run,) = [c for c in kernel.fn.compiled.values() if c.runs[0][2][0] is not x][0].runs
    assert unaligned_run[2][0].data_ptr() == x.data_ptr() + 4


def test_interpreter_always_goes_through_triton(monkeypatch):
    monkeypatch.setattr(triton_launch, "_INTERPRETED", True)
    kernel = Autotuned()
    launch = triton_launch.Launch(kernel, grid, (100,), {"HAS_BIAS": True})
    for _ in range(2):
        launch(torch.zeros(4))
    assert len(kernel.triton_launches) == 2 and not kernel.fn.compiled


class Recorder:
    """Stand-ins for Triton's first launch and the compiled kernels it returns: what each layer launched, and how."""

    def __init__(self) -> None:
        self.through_triton: list = []  # kernels whose launch went through Triton's path
        self.direct: list[tuple] = []  # (kernel, tensors) of the direct launches

    def first_launch(self, kernel, grid, tensors, scalars, constexprs):
        self.through_triton.append(kernel)
        config = kernel.configs[0].kwargs if hasattr(kernel, "configs") else {}
        dims = (*(grid({**constexprs, **config}) if callable(grid) else grid), 1, 1)[:3]
        recorder = self

        class Compiled:
            function = packed_metadata = None

            @staticmethod
            def run(*args):
                recorder.direct.append((kernel, args[9 : 9 + len(tensors)]))

        return Compiled, dims, ()


@pytest.fixture
def recorder(compiled_path, monkeypatch):
    """Our kernels' launches recorded instead of run (on CPU, with the interpreter's configs), with fresh layer plans."""
    kernels = pytest.importorskip("kernels")
    if "triton" not in kernels.names() or "cpu" not in kernels.algorithms()["triton"]["devices"]:
        pytest.skip("needs the triton algorithm on cpu (TRITON_INTERPRET=1): on a GPU test_triton.py checks the real launches")
    recorder = Recorder()
    monkeypatch.setattr(triton_launch, "_first_launch", recorder.first_launch)
    clear_plans()
    yield recorder
    clear_plans()  # the plans now hold stand-in kernels


def clear_plans() -> None:
    from kernels import triton_depthwise, triton_fwd, triton_grad_input, triton_grad_weight

    for plan in (
        triton_fwd.forward_plan,
        triton_grad_input.grad_input_plan,
        triton_grad_weight.grad_weight_plan,
        triton_depthwise.depthwise_forward_plan,
        triton_depthwise.depthwise_grad_input_plan,
        triton_depthwise.depthwise_grad_weight_plan,
    ):
        plan.cache_clear()


def forward_backward(input: torch.Tensor, weight: torch.Tensor, groups: int = 1) -> None:
    import kernels

    input, weight = input.detach().requires_grad_(), weight.detach().requires_grad_()
    output = kernels.conv2d(input, weight, None, 2, 1, 1, groups, algorithm="triton")
    torch.autograd.grad(output, [input, weight], torch.ones_like(output))


@pytest.mark.parametrize("groups", [1, 8], ids=["gemm", "depthwise"])
def test_a_layer_goes_through_triton_once_per_dtype_shape_and_alignment(recorder, groups, monkeypatch):
    """The layer plans hold the Launches; a plan is keyed on what a compile depends on besides alignment."""
    from kernels import triton_conv

    # One precision for both dtypes (on a GPU float16 and bfloat16 share one), so only the dtype tells them apart.
    monkeypatch.setattr(triton_conv, "_dot_precision", lambda dtype, device: "ieee")
    x = torch.randn(2, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    w = torch.randn(8, 8 // groups, 3, 3)
    forward_backward(x, w, groups)
    kernels_of_a_step = list(recorder.through_triton)
    assert len(kernels_of_a_step) >= 4  # forward, grad_input's phases, grad_weight and its sum
    assert not recorder.direct

    forward_backward(torch.randn_like(x), torch.randn_like(w), groups)  # fresh tensors, same layer
    assert recorder.through_triton == kernels_of_a_step
    assert [kernel for kernel, _ in recorder.direct] == kernels_of_a_step

    for other in (x.half(), x[:1], x[:, :, 1:]):  # another dtype, batch, height: another plan
        before = len(recorder.through_triton)
        forward_backward(other, w.to(other.dtype), groups)
        assert len(recorder.through_triton) == before + len(kernels_of_a_step), other.shape

    # The same layer with an input 4 bytes off 16-byte alignment: its forward goes through Triton again.
    storage = torch.empty(x.numel() + 1)[1:]
    unaligned = storage.view(2, 6, 6, 8).copy_(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    before, direct = len(recorder.through_triton), len(recorder.direct)
    forward_backward(unaligned, w, groups)
    assert recorder.through_triton[before] is kernels_of_a_step[0]
    # Direct launches get the call's own tensors: the forward reads the input where it lies, no copy.
    forward_backward(unaligned, w, groups)
    forward_input = next(tensors[0] for kernel, tensors in recorder.direct[direct:] if kernel is kernels_of_a_step[0])
    assert forward_input.data_ptr() == unaligned.data_ptr()


@pytest.mark.parametrize(("a", "b", "expected"), [(0, 64, 0), (1, 64, 1), (64, 64, 1), (65, 64, 2), (100352, 128, 784)])
def test_cdiv(a, b, expected):
    assert triton_launch.cdiv(a, b) == expected


def test_host_benchmark_runs_and_counts_each_layers_launches():
    """bench/triton_host.py (our GPU path's host time, launches stubbed) runs here, and a forward+backward of
    bench_gpu's shapes at an H200's size makes the launches the plans say: one per kernel, per stride phase
    of grad_input, two for grad_weight (partial sums, ordered reduction), two for a tap-split forward."""
    import os
    import subprocess
    import sys

    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-m", "bench.triton_host", "--reps", "1", "--calls", "2"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    launches = {line[:24].strip(): line.split()[-3:] for line in done.stdout.splitlines() if line.count("/") == 1 and "float16" in line}
    assert launches == {
        "stem 3->64 7x7 s2 @224": ["1", "/", "3"],  # no input gradient: forward, grad_weight's two
        "64->64 3x3 @56": ["1", "/", "4"],
        "64->256 1x1 @56": ["1", "/", "4"],
        "128->128 3x3 s2 @56": ["1", "/", "7"],  # grad_input: one launch per stride phase (4)
        "256->256 3x3 @14": ["1", "/", "4"],
        "512->512 3x3 @7": ["2", "/", "5"],  # ~100 output tiles for 132 SMs: the forward splits its taps
        "dw 256 3x3 @14": ["1", "/", "4"],
    }, done.stdout
