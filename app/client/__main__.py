"""`python -m app.client forward|backward --input x.pt --weight w.pt [...]`: call the service, print the parity table.

Tensors are read from .pt (torch.save of a tensor) or .npy files; --out writes the result the same way
(backward: a dict of tensors in .pt, or .npz of arrays). Exit status: 0 when parity is ok (or was not
asked for), 1 when it is not, 2 for a client or server error (printed with the server's detail).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from app.client._core import BackwardResult, Client, ForwardResult
from app.client.errors import ClientError

_TENSORS = ("output", "grad_input", "grad_weight", "grad_bias")


class InputError(Exception):
    """A local file the CLI cannot read or write: exit status 2, like a server error, never 1 (parity)."""


# What --out may end with, per command: forward writes the output, backward a dict of gradients.
OUT_SUFFIXES = {"forward": (".pt", ".npy"), "backward": (".pt", ".npz")}


def load(path: str) -> Any:
    try:
        if path.endswith(".npy"):
            return np.load(path)
        import torch

        value = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # missing, unreadable, not an array or tensor file: whatever numpy or torch raise
        raise InputError(f"{path}: {error}") from None
    if not isinstance(value, torch.Tensor):
        raise InputError(f"{path}: expected a tensor saved with torch.save, got {type(value).__name__}")
    return value


def save(path: str, result: ForwardResult | BackwardResult) -> None:
    tensors = {name: getattr(result, name) for name in _TENSORS if getattr(result, name, None) is not None}
    try:
        if path.endswith(".npy"):
            np.save(path, _numpy(tensors["output"]))
        elif path.endswith(".npz"):
            np.savez(path, **{name: _numpy(value) for name, value in tensors.items()})
        else:
            import torch

            to_torch = {name: _torch(value) for name, value in tensors.items()}
            torch.save(to_torch["output"] if isinstance(result, ForwardResult) else to_torch, path)
    except (OSError, RuntimeError) as error:  # torch.save says RuntimeError for a missing directory
        raise InputError(f"{path}: {error}") from None


def _numpy(value: Any) -> np.ndarray:
    """A numeric numpy array: bfloat16 (numpy has none; ml_dtypes' is stored as raw 2-byte records) as float32, exactly."""
    if isinstance(value, np.ndarray):
        return value.astype(np.float32) if value.dtype.name == "bfloat16" else value
    return (value.float() if str(value.dtype) == "torch.bfloat16" else value).numpy()


def _torch(value: Any) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        return value
    if value.dtype.name == "bfloat16":  # ml_dtypes' bfloat16, from numpy inputs: torch.from_numpy refuses it
        return torch.from_numpy(value.astype(np.float32)).to(torch.bfloat16)
    return torch.from_numpy(np.asarray(value))


def pair(text: str) -> int | list[int] | str:
    """ "2" -> 2, "2,1" -> [2, 1]; "same" / "valid" as they are."""
    if text in ("same", "valid"):
        return text
    parts = [int(part) for part in text.split(",")]
    if len(parts) not in (1, 2):
        raise argparse.ArgumentTypeError(f"expected an int or h,w, got {text!r}")
    return parts[0] if len(parts) == 1 else parts


def parity_table(result: ForwardResult | BackwardResult) -> str:
    lines = [f"algorithm {result.algorithm} on {result.device}, {result.dtype}"]
    parity = result.parity
    if parity is None:
        return "\n".join([*lines, "parity: not computed"])
    lines.append(f"{'tensor':<12} {'max_abs_err':>12} {'max_rel_err':>12}  allclose  close")
    for name, entry in parity["tensors"].items():
        # A server before `close` existed judged by allclose alone.
        close = entry.get("close", entry["allclose"])
        errors = f"{_number(entry['max_abs_err']):>12} {_number(entry['max_rel_err']):>12}"
        lines.append(f"{name:<12} {errors}  {'yes' if entry['allclose'] else 'no':<8}  {'yes' if close else 'NO'}")
    verdict = "ok" if parity["ok"] else "NOT ok"
    lines.append(f"parity {verdict} against {parity['reference']} (atol {parity['atol']:g}, rtol {parity['rtol']:g})")
    exact = parity.get("exact")
    if exact:
        lines.append(f"against {exact['reference']}:")
        lines.append(f"{'tensor':<12} {'ours max_abs':>12} {'torch max_abs':>13}")
        for name, sides in exact["tensors"].items():
            lines.append(f"{name:<12} {_number(sides['ours']['max_abs_err']):>12} {_number(sides['torch']['max_abs_err']):>13}")
    return "\n".join(lines)


def _number(value: float | str) -> str:
    return value if isinstance(value, str) else f"{value:.3e}"


def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(prog="python -m app.client", description="Call conv-as-a-service and print the parity table.")
    commands = main.add_subparsers(dest="command", required=True)
    for name in ("forward", "backward"):
        command = commands.add_parser(name, help=f"/{name}")
        command.add_argument("--url", default=os.environ.get("CONV_URL", "http://127.0.0.1:8000"), help="server (CONV_URL)")
        command.add_argument("--api-key", default=os.environ.get("CONV_API_KEY"), help="Bearer key (CONV_API_KEY)")
        command.add_argument("--input", required=True, help=".pt or .npy, (N, C_in, H, W)")
        command.add_argument("--weight", required=True, help=".pt or .npy, (C_out, C_in/groups, kH, kW)")
        command.add_argument("--bias", help=".pt or .npy, (C_out,)")
        command.add_argument("--stride", type=pair)
        command.add_argument("--padding", type=pair, help='int, h,w, "same" or "valid"')
        command.add_argument("--dilation", type=pair)
        command.add_argument("--groups", type=int)
        command.add_argument("--padding-mode", choices=["zeros", "reflect", "replicate", "circular"])
        command.add_argument("--algorithm")
        command.add_argument("--dtype", choices=["float64", "float32", "float16", "bfloat16"])
        command.add_argument("--exact", action="store_true", help="also compare with a float64 oracle")
        command.add_argument("--encoding", choices=["base64", "flat", "list"], default="base64")
        command.add_argument("--out", help="write the result: .pt or .npy (forward), .pt or .npz (backward)")
        if name == "backward":
            command.add_argument("--grad-output", help=".pt or .npy, the output's shape")
            command.add_argument("--loss", choices=["sum", "mean_square"])
    return main


def main(argv: list[str] | None = None) -> int:
    command_line = parser()
    args = command_line.parse_args(argv)
    if args.out and not args.out.endswith(OUT_SUFFIXES[args.command]):
        command_line.error(f"--out for {args.command} must end with {' or '.join(OUT_SUFFIXES[args.command])}, got {args.out!r}")
    try:
        return _run(args)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    options = {
        key: getattr(args, key)
        for key in ("stride", "padding", "dilation", "groups", "padding_mode", "algorithm", "dtype", "loss")
        if getattr(args, key, None) is not None
    }
    if args.exact:
        options["exact"] = True
    tensors = {"input": load(args.input), "weight": load(args.weight), "bias": load(args.bias) if args.bias else None}
    try:
        with Client(args.url, args.api_key, encoding=args.encoding) as client:
            if args.command == "forward":
                result: ForwardResult | BackwardResult = client.forward(**tensors, **options)
            else:
                grad_output = load(args.grad_output) if args.grad_output else None
                result = client.backward(**tensors, grad_output=grad_output, **options)
    except ClientError as error:
        print(f"error {error}", file=sys.stderr)
        return 2
    except httpx.HTTPError as error:
        print(f"error: {args.url}: {error}", file=sys.stderr)
        return 2
    print(parity_table(result))
    if args.out:
        save(args.out, result)
        print(f"wrote {Path(args.out)}")
    return 0 if result.parity is None or result.parity["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
