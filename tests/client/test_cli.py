"""`python -m app.client`: .pt and .npy in, the parity table out, results written, errors with the server's detail."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from app.client.__main__ import main
from tests.integration.conftest import ROOT


def _files(tmp_path, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x, w, b = (
        torch.randn(2, 3, 6, 6, generator=generator),
        torch.randn(4, 3, 3, 3, generator=generator),
        torch.randn(4, generator=generator),
    )
    torch.save(x, tmp_path / "x.pt")
    np.save(tmp_path / "w.npy", w.numpy())
    torch.save(b, tmp_path / "b.pt")
    return x, w, b


def test_forward_as_a_subprocess(open_server, tmp_path) -> None:
    x, w, b = _files(tmp_path)
    command = [sys.executable, "-m", "app.client", "forward", "--url", open_server.url, "--input", str(tmp_path / "x.pt")]
    command += ["--weight", str(tmp_path / "w.npy"), "--bias", str(tmp_path / "b.pt"), "--stride", "2,1", "--padding", "1"]
    command += ["--out", str(tmp_path / "y.pt")]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "max_abs_err" in done.stdout and "output" in done.stdout and "parity ok" in done.stdout
    output = torch.load(tmp_path / "y.pt")
    torch.testing.assert_close(output, F.conv2d(x, w, b, stride=(2, 1), padding=1), atol=1e-5, rtol=1e-4)


def test_backward_npz_out(open_server, tmp_path, capsys) -> None:
    x, w, b = _files(tmp_path, 1)
    grad_output = torch.randn(2, 4, 6, 6)
    np.save(tmp_path / "g.npy", grad_output.numpy())
    np.save(tmp_path / "x.npy", x.numpy())
    argv = ["backward", "--url", open_server.url, "--input", str(tmp_path / "x.npy"), "--weight", str(tmp_path / "w.npy")]
    argv += [
        "--bias",
        str(tmp_path / "b.pt"),
        "--padding",
        "same",
        "--grad-output",
        str(tmp_path / "g.npy"),
        "--out",
        str(tmp_path / "grads.npz"),
    ]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert all(name in table for name in ("grad_input", "grad_weight", "grad_bias", "parity ok"))
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    F.conv2d(*leaves, padding="same").backward(grad_output)
    grads = np.load(tmp_path / "grads.npz")
    np.testing.assert_allclose(grads["grad_weight"], leaves[1].grad.numpy(), atol=1e-4, rtol=1e-4)


def test_forward_pt_out_with_exact_and_encoding(open_server, tmp_path, capsys) -> None:
    x, w, _ = _files(tmp_path, 2)
    argv = ["forward", "--url", open_server.url, "--input", str(tmp_path / "x.pt"), "--weight", str(tmp_path / "w.npy")]
    assert main([*argv, "--encoding", "flat", "--exact", "--dtype", "float64", "--out", str(tmp_path / "y.npy")]) == 0
    assert "float64" in capsys.readouterr().out
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), F.conv2d(x.double(), w.double()).numpy(), atol=1e-10)


def test_error_exit_status_and_detail(open_server, tmp_path, capsys) -> None:
    _files(tmp_path)
    argv = ["forward", "--url", open_server.url, "--input", str(tmp_path / "x.pt"), "--weight", str(tmp_path / "w.npy"), "--groups", "2"]
    assert main(argv) == 2
    assert "error 422" in capsys.readouterr().err


def test_client_imports_nothing_of_the_server() -> None:
    """Users copy app/client alone: it must need only httpx and numpy (torch optional)."""
    code = "import sys, app.client; print(sorted(m for m in sys.modules if m.split('.')[0] in ('fastapi', 'pydantic', 'orjson', 'kernels', 'starlette') or m in ('app.main', 'app.service', 'app.codec')))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr


def test_local_file_errors_exit_2_not_1(open_server, tmp_path, capsys) -> None:
    """Exit 1 means "parity not ok": a missing or unreadable file, a non-tensor .pt, an unwritable or
    unknown --out are errors (2), with a message and no traceback."""
    _files(tmp_path)
    torch.save({"not": "a tensor"}, tmp_path / "dict.pt")
    (tmp_path / "bad.npy").write_bytes(b"not numpy")
    base = ["forward", "--url", open_server.url, "--weight", str(tmp_path / "w.npy")]
    for name in ("missing.pt", "dict.pt", "bad.npy"):
        assert main([*base, "--input", str(tmp_path / name)]) == 2
        assert name in capsys.readouterr().err
    assert main([*base, "--input", str(tmp_path / "x.pt"), "--out", str(tmp_path / "no" / "dir" / "y.pt")]) == 2
    assert "y.pt" in capsys.readouterr().err
    with pytest.raises(SystemExit) as unknown:
        main([*base, "--input", str(tmp_path / "x.pt"), "--out", str(tmp_path / "y.txt")])
    assert unknown.value.code == 2 and "--out for forward must end with .pt or .npy" in capsys.readouterr().err


def test_bfloat16_numpy_results_are_written_as_numbers_and_exact_is_printed(open_server, tmp_path, capsys) -> None:
    """bfloat16 results of .npy inputs (ml_dtypes arrays): .pt gets a bfloat16 tensor, .npy float32 values
    (exact), not raw 2-byte records; --exact prints the float64 comparison."""
    x, w, _ = _files(tmp_path, 3)
    np.save(tmp_path / "x.npy", x.numpy())
    base = ["forward", "--url", open_server.url, "--input", str(tmp_path / "x.npy"), "--weight", str(tmp_path / "w.npy")]
    assert main([*base, "--dtype", "bfloat16", "--out", str(tmp_path / "y.pt"), "--exact"]) == 0
    assert "torch max_abs" in capsys.readouterr().out
    assert main([*base, "--dtype", "bfloat16", "--out", str(tmp_path / "y.npy")]) == 0
    as_torch, as_numpy = torch.load(tmp_path / "y.pt"), np.load(tmp_path / "y.npy")
    assert as_torch.dtype == torch.bfloat16 and as_numpy.dtype == np.float32
    expected = F.conv2d(x.bfloat16().double(), w.bfloat16().double())
    torch.testing.assert_close(as_torch.double(), expected, atol=0.1, rtol=0.05)
    np.testing.assert_array_equal(as_numpy, as_torch.float().numpy())
