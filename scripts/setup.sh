#!/usr/bin/env bash
# Creates .venv and installs the project with its dev tools. Idempotent; safe to run on a fresh machine.
# Without an NVIDIA GPU it installs the CPU build of torch (a bare `torch` would pull a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "scripts/setup.sh: needs Python >= 3.11; '$PYTHON' is $("$PYTHON" --version 2>/dev/null || echo "not found") (set PYTHON=...)" >&2
    exit 1
fi
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
stamp=.venv/.installed-$(cat pyproject.toml scripts/setup.sh | sha1sum | cut -c1-12)
if [ -f "$stamp" ]; then
    exit 0
fi
.venv/bin/python -m pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    if [ -n "${TORCH_SPEC:-}" ]; then
        .venv/bin/python -m pip install -q "$TORCH_SPEC"
    elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        .venv/bin/python -m pip install -q "torch>=2.4"
    elif ! .venv/bin/python -m pip install -q "torch==2.13.0+cpu" 2>/dev/null; then
        # The CPU build: this project's machines keep 2.13.0+cpu on local disk (pip's find-links); elsewhere it
        # comes from PyTorch's CPU index, since PyPI's Linux wheels are the multi-GB CUDA builds.
        .venv/bin/python -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
    fi
fi
.venv/bin/python -m pip install -q -e ".[dev]"
rm -f .venv/.installed-*
touch "$stamp"
